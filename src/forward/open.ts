/**
 * Opens a checkpoint for a reference forward pass by its own format's semantics: a Hugging Face
 * model directory through its `config.json` architecture, a Megatron torch_dist (or
 * fsdp_dtensor) run through its training args, legacy Megatron rank files and NxD rank files
 * rank by rank (the latter with the HF config
 * named by `--hf-model`). Formats and architectures without a reference forward are refused by
 * name.
 */
import { join } from 'node:path';
import { detectFormat, openCheckpoint } from '../checkpoints/registry.js';
import { commonArgs, openMegatron } from '../megatron/checkpoint.js';
import { isFile } from '../megatron/run-dir.js';
import { readTextFile } from '../io/file.js';
import type { CheckpointSource } from '../formats/types.js';
import { fp8SchemeOf, withFp8Dequantized } from '../formats/fp8-block.js';
import { withMxfp4Dequantized } from '../formats/mxfp4.js';
import { packQuantizedSchemeOf, withInt4Dequantized } from '../formats/pack-quantized.js';
import { badInput, unsupported } from '../util/errors.js';
import type { ModelReader } from './decoder.js';
import type { Routing } from './math.js';
import { HF_DENSE_ARCHITECTURES, hfDense } from './hf-dense.js';
import { HF_MOE_ARCHITECTURES, hfMoe } from './hf-moe.js';
import { hfDims, hfNum, type HfConfig } from './hf-config.js';
import { argsShape, megatronGpt, type MegatronShape } from './megatron-gpt.js';
import { nxdLlama, nxdStore } from './nxd-llama.js';
import { isLegacyRun, openLegacyForward } from './megatron-legacy.js';
import { isNxdPath, openNxdShards } from '../nxd/shards.js';
import { WeightStore } from './weights.js';

export const REFERENCE_ARCHITECTURES: readonly string[] = [...HF_DENSE_ARCHITECTURES, ...HF_MOE_ARCHITECTURES];

export interface OpenedModel {
  readonly model: ModelReader;
  /** Where the model's shape was read from. */
  readonly config: string;
  close(): Promise<void>;
}

export interface OpenForwardOptions {
  /** Largest fp32 row block one read produces. */
  readonly blockBytes: number;
  /** An HF model directory describing a Megatron checkpoint saved without training args. */
  readonly hfModel?: string;
}

async function readConfig(file: string): Promise<HfConfig> {
  let text: string;
  try {
    text = await readTextFile(file);
  } catch (e) {
    throw badInput(`${file}: cannot read it (${(e as Error).message}); the reference forward needs the model's config.json`, file);
  }
  try {
    return JSON.parse(text) as HfConfig;
  } catch (e) {
    throw badInput(`${file}: not valid JSON (${(e as Error).message})`, file);
  }
}

function architectureOf(cfg: HfConfig, file: string): string {
  const a = (cfg.architectures as unknown[] | undefined)?.[0];
  if (typeof a !== 'string') throw badInput(`${file}: no "architectures" entry; cannot tell which forward pass the model has`, file);
  return a;
}

function hfReader(store: WeightStore, cfg: HfConfig, file: string): ModelReader {
  const arch = architectureOf(cfg, file);
  if ((HF_DENSE_ARCHITECTURES as readonly string[]).includes(arch)) return hfDense(store, cfg, file);
  if ((HF_MOE_ARCHITECTURES as readonly string[]).includes(arch)) return hfMoe(store, cfg, file);
  throw unsupported(`${file}: ${arch} has no reference forward pass (verify --logits covers ${REFERENCE_ARCHITECTURES.join(', ')})`, file);
}

/** A Megatron checkpoint's shape from an HF config (for checkpoints saved without training args). */
export function hfConfigShape(cfg: HfConfig, file: string): MegatronShape {
  const arch = architectureOf(cfg, file);
  if (!REFERENCE_ARCHITECTURES.includes(arch)) throw unsupported(`${file}: ${arch} has no reference forward pass`, file);
  const mt = String(cfg.model_type);
  const experts = mt === 'mixtral' ? hfNum(cfg, 'num_local_experts', file) : mt === 'qwen3_moe' ? hfNum(cfg, cfg.num_experts === undefined ? 'num_local_experts' : 'num_experts', file) : 0;
  const dense = new Set(Array.isArray(cfg.mlp_only_layers) ? (cfg.mlp_only_layers as number[]) : []);
  const step = mt === 'qwen3_moe' ? hfNum(cfg, 'decoder_sparse_step', file, 1) : 1;
  const rule: Routing['rule'] = mt === 'mixtral' || cfg.norm_topk_prob === true ? 'softmax-topk-renorm' : 'softmax-topk';
  return {
    dims: hfDims(cfg, file),
    layers: hfNum(cfg, 'num_hidden_layers', file),
    qkvBias: mt === 'qwen2' || cfg.attention_bias === true,
    qkNorm: mt === 'qwen3' || mt === 'qwen3_moe',
    tied: cfg.tie_word_embeddings === true,
    ...(experts > 0 ? { moe: { experts, routing: { topK: hfNum(cfg, 'num_experts_per_tok', file), rule }, isMoe: (i: number) => !dense.has(i) && (i + 1) % step === 0 } } : {}),
    from: `${file} (no training args in the checkpoint)`,
  };
}

export async function openForForward(path: string, opts: OpenForwardOptions): Promise<OpenedModel> {
  if (await isNxdPath(path)) {
    const file = join(opts.hfModel ?? path, 'config.json');
    if (!(await isFile(file))) throw badInput(`${path}: NxD shards carry no model config; name the model's HF directory with --hf-model`, path);
    const cfg = await readConfig(file);
    const shards = await openNxdShards(path);
    try {
      return { model: nxdLlama(nxdStore(shards, path, opts.blockBytes), shards.tp, cfg, file), config: file, close: () => shards.close() };
    } catch (e) {
      await shards.close();
      throw e;
    }
  }
  if (await isLegacyRun(path)) return openLegacyForward(path, opts.blockBytes);
  const format = (await detectFormat(path)).name;
  if (format === 'megatron') {
    const m = await openMegatron(path);
    try {
      const args = commonArgs(m.common);
      let shape: MegatronShape;
      if (args) shape = argsShape(args, join(m.resolved.iterDir, 'common.pt'));
      else {
        const dir = opts.hfModel ?? join(m.resolved.iterDir, 'hf');
        const file = join(dir, 'config.json');
        if (!opts.hfModel && !(await isFile(file))) throw badInput(`${path}: no training args in common.pt and no hf/config.json; name the model's HF directory with --hf-model`, path);
        shape = hfConfigShape(await readConfig(file), file);
      }
      const store = new WeightStore(m.source, opts.blockBytes);
      return { model: megatronGpt(store, shape, m.source.metadata.get('layout')), config: shape.from, close: () => m.source.close() };
    } catch (e) {
      await m.source.close();
      throw e;
    }
  }
  let src = await openCheckpoint(path);
  try {
    const file = join(src.root, 'config.json');
    const cfg = await readConfig(file);
    src = await dequantized(src, cfg, file);
    const store = new WeightStore(src, opts.blockBytes);
    return { model: hfReader(store, cfg, file), config: file, close: () => src.close() };
  } catch (e) {
    await src.close();
    throw e;
  }
}

/** Quantization methods whose weights are read as their references dequantise them. */
const READ_QUANTIZED = ['fp8', 'compressed-tensors', 'mxfp4'];

/**
 * The source with its quantized weights read as bf16 the way the reference dequantises them (FP8
 * with its block scales, compressed-tensors INT4, MXFP4: the format layer's views, the same the
 * conversion reads through); any other quantization method is refused by name.
 */
async function dequantized(src: CheckpointSource, cfg: HfConfig, file: string): Promise<CheckpointSource> {
  const q = cfg.quantization_config as Record<string, unknown> | undefined | null;
  const method = q && typeof q === 'object' ? q.quant_method : undefined;
  if (method !== undefined && !READ_QUANTIZED.includes(method as string)) {
    throw unsupported(`${file}: quantization_config quant_method ${JSON.stringify(method)} has no reference forward (${READ_QUANTIZED.join(', ')} weights are read dequantised)`, file);
  }
  return withInt4Dequantized(withFp8Dequantized(withMxfp4Dequantized(src), fp8SchemeOf(cfg, file)), packQuantizedSchemeOf(cfg, file));
}

