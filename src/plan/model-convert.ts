/**
 * Hugging Face ↔ Megatron-Core torch_dist conversions (`convert --to megatron`, `--to hf`): the
 * model config and family, the parameter map, the full plan, then the same atomic streaming
 * output as format conversions.
 *
 * A Megatron output keeps the HF config, generation config and tokenizer files under
 * `iter_XXXXXXX/hf/`, so provenance stays with the weights and the export back to HF needs no
 * reference model (one can still be given with `--hf-model`).
 */
import { join } from 'node:path';
import { openCheckpoint } from '../checkpoints/registry.js';
import { withMxfp4Dequantized } from '../formats/mxfp4.js';
import { fp8SchemeOf, withFp8Dequantized } from '../formats/fp8-block.js';
import { packQuantizedSchemeOf, withInt4Dequantized } from '../formats/pack-quantized.js';
import { writeSafetensors } from '../formats/safetensors.js';
import { openMegatron, writeMegatron } from '../megatron/checkpoint.js';
import { iterDirName, type CkptFormat } from '../megatron/run-dir.js';
import { writeMegatronLegacy } from '../megatron/legacy.js';
import { SHARDED_NORMS_ARG } from '../megatron/parallel.js';
import { writeMegatronFsdp } from '../megatron/fsdp.js';
import { listSideFiles } from '../formats/side-files.js';
import { configJson, parseConfigJson, withoutTopLevelKey } from '../formats/config-json.js';
import { mxfp4Pair } from '../tensor/mxfp4-quantize.js';
import type { Family } from '../models/spec.js';
import { fp8BlockPair } from '../tensor/fp8-block-quantize.js';
import { castTo, asProduced } from '../lazy/expr.js';
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import { badInput, unsupported, usage } from '../util/errors.js';
import { numelOf, type DType } from '../tensor/dtype.js';
import { paddedVocab, type ModelConfig } from '../models/config.js';
import { buildExport, buildImport, type SkipRule, type Skipped, gateUpTest, fc1Gating } from '../bridge/map.js';
import { torchDistExtraState } from '../bridge/megatron-keys.js';
import { familyOf } from '../models/registry.js';
import { checkComplete, filePlan, type ConvertPlan, type ConvertResult, finish } from './convert.js';
import { writeOutput } from '../exec/output.js';
import type { ProgressEvent } from '../exec/executor.js';
import { configFromHfDir, localSpecNames, withHfLayout, megatronArgs, megatronConfig, sourceFromTargets, storedDtype } from '../bridge/megatron-config.js';
import { modelSourceKind } from './sources.js';
import { readTextFile } from '../io/file.js';

export interface ModelConvertOptions {
  /** Megatron output format: torch_dist (default) or the legacy per-rank `torch` files. */
  ckptFormat?: CkptFormat;
  /** Layer names of legacy outputs: TransformerEngine-fused norms (te, default) or the local spec's. */
  megatronSpec?: 'te' | 'local';
  /** Skip source tensors the model map has no place for, instead of failing. */
  allowUnmapped?: boolean;
  dtype?: DType;
  tp?: number;
  pp?: number;
  /** Expert-parallel size (MoE): rank files of legacy outputs; recorded in torch_dist args. */
  ep?: number;
  /** Expert tensor-parallel size (MoE; default tp). */
  etp?: number;
  makeVocabSizeDivisibleBy?: number;
  iteration?: number;
  /** Reference HF model directory (config, tokenizer) for exports, and for NxD sources. */
  hfModel?: string;
  /** Leave the multi-token-prediction layers out on purpose (listed in the plan). */
  dropMtp?: boolean;
  /** Exports: write the weights the family's hub checkpoints store quantized in that layout (GPT-OSS: mxfp4). */
  quantize?: 'mxfp4' | 'fp8';
  /** Reading an NxD source: its layout flags (as the NxD converter names them). */
  nxd?: import('./nxd-convert.js').NxdConvertOptions;
  maxMemory?: number;
  maxShardSize?: number;
  dcpFiles?: number;
  overwrite?: boolean;
  /** Keep an output that already is this finished conversion (batch conversions re-run over a run directory). */
  reuseComplete?: boolean;
  /** Hash whole source files into the output manifest. */
  hashSource?: boolean;
  dryRun?: boolean;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run; a directory output keeps its finished files for a resume (as after Ctrl-C). */
  signal?: AbortSignal;
  /**
   * The HF source's weights, already opened (a hub model streamed through `plan/hub-source.ts`);
   * `srcPath` is then the directory of its config and side files. Closed with the run.
   */
  weights?: CheckpointSource;
}

/** HF's `torch_dtype` / `dtype` string → DType (default bf16). */
function hfDtype(cfg: Record<string, unknown> | undefined): DType {
  const s = (cfg?.torch_dtype ?? cfg?.dtype) as string | undefined;
  return s === 'float32' ? 'F32' : s === 'float16' ? 'F16' : 'BF16';
}

/**
 * To Megatron: from an HF directory, or — resharding — from another Megatron checkpoint (any
 * format, any TP/PP), whose tensors are first mapped to HF names and then laid out again; all of
 * it lazily, so nothing is read twice and memory stays bounded. `ckptFormat: 'torch'` writes
 * legacy per-rank files for the requested TP×PP.
 */
export async function convertHfToMegatron(srcPath: string, out: string, opts: ModelConvertOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  const kind = await modelSourceKind(srcPath);
  if (kind === 'missing') throw usage(`${srcPath}: no such file or directory`);
  if (kind === 'file') throw usage(`${srcPath}: give the HF model directory (with config.json), not a file`);
  const fromMegatron = kind === 'megatron';
  const fromNxd = kind === 'nxd';
  const meg = fromMegatron ? await openMegatron(srcPath) : undefined;
  let src: CheckpointSource | undefined;
  try {
    let cfg: ModelConfig;
    let sideDir: string | undefined;
    const notes: string[] = [];
    let skippedBefore: Skipped[] = [];
    if (meg) {
      const mc = await megatronConfig(meg, opts);
      const mtpIn = mtpChoice(mc.cfg, opts, /^(language_model\.)?mtp\./);
      cfg = mtpIn.cfg;
      sideDir = mc.refDir;
      notes.push(...mc.notes, ...mtpIn.notes, `resharding a Megatron checkpoint (${meg.source.metadata.get('layout') ?? 'torch_dist'})`);
      // Megatron → HF names (keeping the stored dtype) → Megatron again.
      const exp = buildExport(cfg, meg.source, { dtype: 'keep', allowUnmapped: opts.allowUnmapped, skip: mtpIn.skip });
      skippedBefore = exp.skipped;
      src = sourceFromTargets(srcPath, exp.tensors, meg.source.root);
    } else if (fromNxd) {
      if (!opts.hfModel) throw usage(`${srcPath}: an NxD checkpoint does not record its model config; give --hf-model <reference HF dir>`);
      cfg = await configFromHfDir(opts.hfModel);
      const { openNxdAsHf } = await import('./nxd-convert.js');
      src = await openNxdAsHf(srcPath, { ...opts.nxd, config: join(opts.hfModel, 'config.json') });
      sideDir = opts.hfModel;
      notes.push('NxD shards read as their HF-named full state, then mapped to Megatron');
    } else {
      cfg = await configFromHfDir(srcPath);
      // Quantized hub weights (GPT-OSS's MXFP4 experts, DeepSeek-V3's block-scaled FP8) read as the bf16 tensors their references dequantise them to.
      const hfSrc = await dequantizedSource(opts.weights ?? (await openCheckpoint(srcPath)), cfg);
      src = hfSrc;
      sideDir = hfSrc.root;
      const recorded = cfg.mtpLayers ?? 0;
      cfg = withHfLayout(cfg, hfSrc, { dropMtp: opts.dropMtp });
      if (recorded > 0 && !cfg.mtpLayers) notes.push(`MTP: the config records ${recorded} layer(s), the checkpoint holds none (transformers saves none): converted without`);
    }
    const mtp = mtpChoice(cfg, opts, familyOf(cfg).mtpHfNames?.(cfg) ?? /^mtp\./);
    cfg = mtp.cfg;
    notes.push(...mtp.notes);
    const tp = opts.tp ?? 1;
    const pp = opts.pp ?? 1;
    checkAttentionTp(cfg, tp);
    if (cfg.ffnHiddenSize % tp !== 0) throw usage(`--tp ${tp} does not divide ffn_hidden_size ${cfg.ffnHiddenSize}`);
    const mamba = cfg.hybrid?.pattern.includes('M') ? cfg.hybrid.mamba : undefined;
    if (mamba && (mamba.numHeads % tp !== 0 || mamba.numGroups % tp !== 0)) throw usage(`--tp ${tp} does not divide the ${mamba.numHeads} Mamba heads and ${mamba.numGroups} groups`);
    // Legacy and fsdp writers would need the per-rank regrouping of Mamba in_proj/conv1d (z_r, x_r, B_r, C_r, dt_r).
    if (cfg.hybrid && opts.ckptFormat && opts.ckptFormat !== 'torch_dist') throw unsupported(`--ckpt-format ${opts.ckptFormat} is not supported for ${cfg.family} (hybrid Mamba) models yet; use torch_dist`);
    if (cfg.numLayers % pp !== 0) throw usage(`--pp ${pp} does not divide the ${cfg.numLayers} layers`);
    const ep = opts.ep ?? 1;
    const etp = opts.etp ?? tp;
    if (!cfg.moe && (ep > 1 || (opts.etp ?? 1) > 1)) throw usage(`--ep ${ep}${opts.etp ? ` --etp ${opts.etp}` : ''}: expert parallelism applies to MoE models; ${cfg.family} is dense`);
    if (cfg.moe && cfg.moe.numExperts % ep !== 0) throw usage(`--ep ${ep} does not divide the ${cfg.moe.numExperts} experts`);
    if (cfg.moe && cfg.moe.ffnHiddenSize % etp !== 0) throw usage(`--etp ${etp} does not divide the experts' ffn hidden size ${cfg.moe.ffnHiddenSize}`);
    if (cfg.moe?.sharedExpertFfn && cfg.moe.sharedExpertFfn % tp !== 0) throw usage(`--tp ${tp} does not divide the shared experts' ffn hidden size ${cfg.moe.sharedExpertFfn}`);
    if (opts.ckptFormat && opts.ckptFormat !== 'torch_dist' && familyOf(cfg).splitKeys) {
      // Their GDN in_proj / conv1d TP layout ([q_r; k_r; v_r; z_r; b_r; a_r] per rank) is not in parallel.ts yet.
      throw unsupported(`--ckpt-format ${opts.ckptFormat} is not supported for ${familyOf(cfg).description} yet; write torch_dist (the default)`);
    }
    const divisor = opts.makeVocabSizeDivisibleBy ?? 128;
    const dtype = opts.dtype ?? 'BF16';
    const { targets, entries, skipped, dtypes } = buildImport(cfg, src, { tp, makeVocabSizeDivisibleBy: divisor, dtype, allowUnmapped: opts.allowUnmapped, spec: opts.megatronSpec, skip: mtp.skip });
    const iteration = opts.iteration ?? 0;
    const args = {
      ...megatronArgs(cfg, { tp, pp, divisor, dtype, iteration }),
      ...(cfg.moe ? { expert_model_parallel_size: ep, expert_tensor_parallel_size: etp } : {}),
      // What the HF names said and the config does not: the export writes the same layout back.
      ...(cfg.hfLayout ? { shardshift_hf_layout: JSON.stringify(cfg.hfLayout) } : {}),
    };
    const legacy = opts.ckptFormat === 'torch';
    // megatron-core's local spec builds MLA's down projections column-parallel, TE's duplicated: rank files differ.
    if (legacy && cfg.mla && tp > 1 && opts.megatronSpec === 'local') throw unsupported(`--ckpt-format torch --megatron-spec local at --tp ${tp}: the local spec splits MLA's down projections over TP where TE duplicates them, and that split is not written yet; use the TE spec (the default) or torch_dist`);
    // A VL wrapper's Megatron model keeps its language model under a prefix (language_model.) and its
    // vision tower on the first pipeline stage; legacy rank files key and split neither so.
    if (legacy && familyOf(cfg).megatronPrefix?.(cfg)) throw unsupported(`--ckpt-format torch: ${familyOf(cfg).description} is a vision-language wrapper (Megatron-Bridge's model holds its language model under ${familyOf(cfg).megatronPrefix!(cfg)!.prefix} and the vision tower beside it), which legacy rank files are not written for; use --ckpt-format torch_dist`, srcPath);
    if (legacy && tp > 1 && familyOf(cfg).legacyTpRefusal) throw unsupported(`--ckpt-format torch --tp ${tp}: ${familyOf(cfg).legacyTpRefusal}; write --tp 1 or torch_dist`, srcPath);
    // Megatron-Bridge's FullDimKNorm replicates the k norm's rows when TP exceeds the KV heads (a
    // shard per KV head, held by several ranks): that layout is not written.
    if (legacy && familyOf(cfg).tpShardedNorms && tp > cfg.numQueryGroups) throw unsupported(`--ckpt-format torch --tp ${tp}: ${familyOf(cfg).description} splits its full-width k norm by KV head, and with more TP ranks than its ${cfg.numQueryGroups} KV heads the ranks would share shards, which is not written; use --tp ${cfg.numQueryGroups} or less, or torch_dist`, srcPath);
    // Legacy rank files carry one `swiglu` flag, and their reader splits every fc1 over TP by it.
    if (legacy && fc1Gating(familyOf(cfg), cfg) === 'mixed') throw unsupported(`--ckpt-format torch: ${familyOf(cfg).description} has both gated ([gate; up]) and plain linear_fc1 tensors, and legacy rank files record one swiglu flag for the whole model; use --ckpt-format torch_dist`, srcPath);
    const fsdp = opts.ckptFormat === 'fsdp_dtensor';
    const files = fsdp
      ? writeMegatronFsdp(targets, { iteration, files: opts.dcpFiles })
      : legacy
      ? writeMegatronLegacy(localSpecNames(familyOf(cfg), targets, opts.megatronSpec ?? 'te'), {
          tp,
          pp,
          ep,
          etp,
          numLayers: cfg.numLayers,
          iteration,
          gateUp: gateUpTest(cfg),
          ...(familyOf(cfg).tpShardedNorms ? { shardedNorms: familyOf(cfg).tpShardedNorms } : {}),
          args: { ...args, ckpt_format: 'torch', ...(familyOf(cfg).tpShardedNorms ? { [SHARDED_NORMS_ARG]: [...familyOf(cfg).tpShardedNorms!] } : {}) },
          extraStateModules: (i) => familyOf(cfg).extraStateModules(cfg, i),
          blockExtraState: (familyOf(cfg).blocks?.(cfg) ?? []).flatMap((b) => Array.from({ length: b.layers }, (_, i) => b.extraStateModules(i).map((m) => `${b.prefix}${i}.${m}`)).flat()),
        })
      : writeMegatron(entries, { iteration, files: opts.dcpFiles, args, objects: torchDistExtraState(familyOf(cfg), cfg) });
    const iterDir = iterDirName(iteration);
    const side = sideDir ? await listSideFiles(sideDir, (n) => /\.(safetensors|bin|pt|pth|distcp)$|\.index\.json$|^\.metadata$|^metadata\.json$/.test(n)) : [];
    // Tensors Megatron keeps once (DeepSeek-V3's MTP embedding / head copies) must really be copies of
    // their originals (an HF source's; a Megatron source's were written from the one tensor).
    const copies = meg ? [] : hfCopyPairs(cfg, src);
    if (copies.length && opts.dryRun) notes.push(`${copies.length} tensor(s) Megatron keeps once (${copies.map((c) => c.copy.name).join(', ')}) are compared with their originals when the conversion runs`);
    const plan: ConvertPlan = {
      source: { path: srcPath, format: meg ? 'megatron' : fromNxd ? 'nxd' : `hf (${src.format})`, tensors: (meg?.source ?? src).tensors.size, bytes: [...(meg?.source ?? src).tensors.values()].reduce((n, t) => n + t.byteLength, 0) },
      target: { path: out, format: fsdp ? 'megatron fsdp_dtensor' : legacy ? `megatron torch (legacy), TP=${tp} PP=${pp}` : 'megatron torch_dist', kind: 'dir' },
      files: filePlan(files),
      dropped: [],
      skipped: [...skippedBefore, ...skipped],
      dtype,
      dtypeExceptions: dtypes,
      sideFiles: side.map((s) => `${iterDir}/hf/${s}`),
      totalBytes: files.reduce((n, f) => n + f.size, 0),
      notes: [
        ...notes,
        `family ${cfg.family}: ${cfg.numLayers} layers, hidden ${cfg.hiddenSize}, ${cfg.numAttentionHeads} heads / ${cfg.numQueryGroups} query groups, head dim ${cfg.kvChannels}, ffn ${cfg.ffnHiddenSize}`,
        `vocab ${cfg.vocabSize} → padded ${paddedVocab(cfg.vocabSize, divisor, tp)} (make_vocab_size_divisible_by ${divisor} × tp ${tp})`,
        cfg.tieEmbeddings ? 'tied embeddings: no output_layer' : 'untied embeddings: output_layer from lm_head',
        legacy
          ? `dtype ${dtype}; ${tp * pp * ep} rank files (TP ${tp} × PP ${pp}${ep > 1 ? ` × EP ${ep}` : ''}), layers numbered per stage${ep > 1 ? ', experts per EP rank' : ''}`
          : `dtype ${dtype}; tp ${tp}, pp ${pp}${cfg.moe ? `, ep ${ep}, etp ${etp}` : ''} recorded in common.pt args (torch_dist tensors are global)`,
        ...(cfg.moe ? [`MoE: ${cfg.moe.numExperts} experts, top-${cfg.moe.topK}, expert ffn ${cfg.moe.ffnHiddenSize}${cfg.moe.sharedExpertFfn ? `, shared experts ffn ${cfg.moe.sharedExpertFfn}` : ''}`] : []),
      ],
    };
    const recorded = meg?.source ?? src;
    if (!opts.dryRun) for (const c of copies) await sameData(c.copy, c.main, src.path);
    return await finish(plan, t0, opts.dryRun, () =>
      writeOutput(srcPath, out, 'dir', files, side.map((s) => ({ from: join(sideDir!, s), to: `${iterDir}/hf/${s}` })), {
        ...opts,
        manifest: {
          command: `convert --to megatron --ckpt-format ${opts.ckptFormat ?? 'torch_dist'}`,
          sourceFormat: plan.source.format,
          targetFormat: plan.target.format,
          sourceDir: recorded.root,
          // Streamed shards are not kept on disk to be stamped; the hub commit and each shard's
          // verified sha256 pin them instead.
          sourceFiles: opts.weights ? [] : recorded.dataFiles,
        },
        beforeCommit: opts.weights?.settle ? () => opts.weights!.settle!() : undefined,
      }),
    );
  } finally {
    await (meg?.source ?? src)?.close();
  }
}

/** HF tensors the family's map keeps once (`GlobalParam.hfCopies`) that the source holds, with their originals. */
function hfCopyPairs(cfg: ModelConfig, src: CheckpointSource): Array<{ copy: SourceTensor; main: SourceTensor }> {
  const out: Array<{ copy: SourceTensor; main: SourceTensor }> = [];
  for (const g of familyOf(cfg).globalParams(cfg)) {
    const main = src.tensors.get(g.hf);
    for (const name of g.hfCopies ?? []) {
      const copy = src.tensors.get(name);
      if (copy && main) out.push({ copy, main });
    }
  }
  return out;
}

/** Refuses a "copy" whose bytes differ from its original (compared 16 MiB of rows at a time). */
async function sameData(copy: SourceTensor, main: SourceTensor, file: string): Promise<void> {
  if (copy.dtype !== main.dtype || copy.shape.join() !== main.shape.join()) {
    throw badInput(`${copy.name} (${copy.dtype} [${copy.shape.join(', ')}]) is not a copy of ${main.name} (${main.dtype} [${main.shape.join(', ')}]); megatron-core's MTP block shares the main tensor, so it cannot be carried (--drop-mtp leaves the MTP layer out)`, file, copy.name);
  }
  const rowBytes = copy.byteLength / (copy.shape[0] || 1);
  const step = Math.max(1, Math.floor((16 << 20) / Math.max(1, rowBytes)));
  const R = copy.shape[0] ?? 1;
  for (let r = 0; r < R; r += step) {
    const n = Math.min(step, R - r);
    const box = { start: [r, ...copy.shape.slice(1).map(() => 0)], size: [n, ...copy.shape.slice(1)] };
    const a = new Uint8Array(n * rowBytes);
    const b = new Uint8Array(n * rowBytes);
    await Promise.all([copy.read(box, a), main.read(box, b)]);
    if (!Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))) {
      throw badInput(`${copy.name} differs from ${main.name} (from row ${r} on); megatron-core's MTP block shares the main tensor, so this checkpoint's own copy cannot be carried (--drop-mtp leaves the MTP layer out)`, file, copy.name);
    }
  }
}

/** The quantization methods whose weights an HF source is read through (as bf16). */
const READ_QUANTIZED = ['mxfp4', 'fp8', 'compressed-tensors'];

/**
 * An HF checkpoint with its quantized weights read as their references dequantise them (MXFP4
 * pairs, FP8 + block scales, compressed-tensors INT4 triplets); a quantization method shardshift
 * cannot read is refused by name, before anything is planned.
 */
async function dequantizedSource(src: CheckpointSource, cfg: ModelConfig): Promise<CheckpointSource> {
  const hf = cfg.hf ?? {};
  const file = join(src.root, 'config.json');
  const q = hf.quantization_config as Record<string, unknown> | undefined | null;
  const method = q && typeof q === 'object' ? q.quant_method : undefined;
  try {
    if (method !== undefined && !READ_QUANTIZED.includes(method as string)) {
      throw unsupported(`${file}: quantization_config quant_method ${JSON.stringify(method)} is not read (shardshift reads ${READ_QUANTIZED.join(', ')} weights)`, file);
    }
    // Every scheme is read from the config first, so a config shardshift cannot read is what is reported.
    const fp8 = fp8SchemeOf(hf, file);
    const int4 = packQuantizedSchemeOf(hf, file);
    return await withInt4Dequantized(withFp8Dequantized(withMxfp4Dequantized(src), fp8), int4);
  } catch (e) {
    await src.close();
    throw e;
  }
}

/**
 * The multi-token-prediction layers a conversion carries: the config's (or the checkpoint's), or
 * none with `--drop-mtp` — then the source's MTP tensors are skipped by a named rule, never
 * silently (a known converter bug dropped whole shards that held any MTP key).
 */
function mtpChoice(cfg: ModelConfig, opts: ModelConvertOptions, names: RegExp): { cfg: ModelConfig; skip: SkipRule[]; notes: string[] } {
  if (opts.dropMtp) {
    return {
      cfg: { ...cfg, mtpLayers: 0 },
      skip: [{ pattern: names, reason: 'multi-token prediction layer dropped (--drop-mtp)', carriesData: true }],
      notes: cfg.mtpLayers ? [`MTP: ${cfg.mtpLayers} layer(s) dropped (--drop-mtp)`] : [],
    };
  }
  return { cfg, skip: [], notes: cfg.mtpLayers ? [`MTP: ${cfg.mtpLayers} multi-token-prediction layer(s) → megatron-core's MTP block (mtp.layers.*)`] : [] };
}

/**
 * megatron-core 0.16's tensor-parallel attention: every rank holds np/tp query heads, so TP must
 * divide the heads; the query groups must divide by TP, or TP by them (`num_query_groups < tp`,
 * transformer_config.py: then `linear_qkv`'s per-group interleaved rows are split evenly over the
 * ranks, no KV head duplicated — each KV head lives on the last rank of its group — which needs
 * the fused row count to divide by TP).
 */
function checkAttentionTp(cfg: ModelConfig, tp: number): void {
  const np = cfg.numAttentionHeads;
  const ng = cfg.numQueryGroups;
  if (np % tp !== 0) throw usage(`--tp ${tp} does not divide the ${np} attention heads (megatron-core gives every TP rank np/tp query heads)`);
  if (ng % tp !== 0 && tp % ng !== 0) {
    throw usage(`--tp ${tp} and the ${ng} query groups: megatron-core needs the query groups to be a multiple of TP, or TP a multiple of them`);
  }
  const rows = (np + 2 * ng) * cfg.kvChannels;
  if (rows % tp !== 0) throw usage(`--tp ${tp} does not divide linear_qkv's ${rows} rows ((${np} + 2 × ${ng}) × ${cfg.kvChannels})`);
}

/**
 * The reference config.json rewritten where it would misdescribe the exported weights, or
 * undefined when it is carried as it is: a hub config's `quantization_config` (GPT-OSS's mxfp4)
 * next to unquantised weights would make vLLM and transformers' GPU path read bf16 experts as
 * packed MXFP4 blocks; quantised weights (`--quantize`) need one, the hub's when the reference
 * has none.
 */
async function exportedConfig(path: string, cfg: ModelConfig, quantize: ModelConvertOptions['quantize'], notes: string[]): Promise<Buffer | undefined> {
  const hf = cfg.hf;
  const q = hf && 'quantization_config' in hf ? (hf.quantization_config as Record<string, unknown> | null) : undefined;
  const method = q && typeof q.quant_method === 'string' ? q.quant_method : undefined;
  if (quantize) {
    if (method === quantize) return undefined;
    const text = await readTextFile(path);
    const parsed = parseConfigJson(withoutTopLevelKey(text, 'quantization_config')) as Record<string, unknown>;
    notes.push(`config.json: quantization_config ${method ? `(${method}) replaced by` : 'added:'} the hub's ${quantize} one`);
    return Buffer.from(configJson({ ...parsed, quantization_config: familyOf(cfg).hubQuantized!.quantizationConfig }));
  }
  if (q === undefined) return undefined;
  notes.push(`config.json: quantization_config${method ? ` (${method})` : ''} dropped — the weights are written unquantised`);
  // Edited as text: every other byte as the reference has it (float fields stay floats).
  return Buffer.from(withoutTopLevelKey(await readTextFile(path), 'quantization_config'));
}

/**
 * The exported tensors with the weights the family's hub stores quantized replaced by their
 * quantized pair (MXFP4: `X_blocks`, `X_scales`, as transformers' quantize_to_mxfp4 makes them
 * from `X.to(bfloat16)`).
 */
function quantizedExport(cfg: ModelConfig, tensors: readonly TargetTensor[], method: 'mxfp4' | 'fp8', notes: string[], dtypes: Array<{ name: string; dtype: string; reason: string }>): TargetTensor[] {
  const fam = familyOf(cfg);
  const hq = fam.hubQuantized;
  if (!hq || hq.method !== method) throw usage(`--quantize ${method}: ${fam.description} has no ${method} hub layout (shardshift writes GPT-OSS's MXFP4 experts and DeepSeek-V3's block FP8 weights)`);
  if (method === 'fp8') return fp8Export(cfg, tensors, hq, notes, dtypes, fam.description);
  let n = 0;
  const out = tensors.flatMap((t): TargetTensor[] => {
    if (!hq.tensors.test(t.name)) return [t];
    n++;
    const pair = mxfp4Pair(asProduced(castTo(t, 'BF16')));
    const why = 'MXFP4 (--quantize mxfp4), as transformers\' quantize_to_mxfp4';
    dtypes.push({ name: `${t.name}_blocks`, dtype: 'U8', reason: why }, { name: `${t.name}_scales`, dtype: 'U8', reason: why });
    return [
      { kind: 'produced', name: `${t.name}_blocks`, dtype: 'U8', shape: pair.blocksShape, byteLength: numelOf(pair.blocksShape), describe: `mxfp4 blocks(${t.describe})`, produce: pair.blocks },
      { kind: 'produced', name: `${t.name}_scales`, dtype: 'U8', shape: pair.scalesShape, byteLength: numelOf(pair.scalesShape), describe: `mxfp4 scales(${t.describe})`, produce: pair.scales },
    ];
  });
  if (n === 0) throw badInput(`--quantize ${method}: the export holds none of the weights ${fam.description} quantizes (${hq.tensors.source})`);
  notes.push(`MXFP4: ${n} expert weights quantised from bf16 as transformers' quantize_to_mxfp4 (blocks and scales each read the bf16 rows)`);
  return out;
}

/** The weights DeepSeek-V3's hub stores in block FP8, quantized back as the reference quantizer does (`tensor/fp8-block-quantize.ts`). */
function fp8Export(cfg: ModelConfig, tensors: readonly TargetTensor[], hq: NonNullable<Family['hubQuantized']>, notes: string[], dtypes: Array<{ name: string; dtype: string; reason: string }>, what: string): TargetTensor[] {
  // The hub's FP8 layout has one weight per expert; fused experts would stay bf16 under a config claiming FP8.
  if (cfg.hfLayout?.experts === 'fused' || cfg.hfLayout?.mtpExperts === 'fused') throw unsupported('--quantize fp8: this checkpoint stores its experts fused (experts.gate_up_proj), which the FP8 hub layout (one weight per expert) does not have');
  const [br, bc] = hq.quantizationConfig.weight_block_size as [number, number];
  const why = `FP8 e4m3 with ${br}×${bc} block scales (--quantize fp8), as Megatron-Bridge's _quantize_fp8_2d_blocks`;
  let n = 0;
  const out = tensors.flatMap((t): TargetTensor[] => {
    if (!hq.tensors.test(t.name)) return [t];
    n++;
    const pair = fp8BlockPair(asProduced(castTo(t, 'BF16')), br, bc);
    dtypes.push({ name: t.name, dtype: 'F8_E4M3', reason: why }, { name: `${t.name}_scale_inv`, dtype: 'F32', reason: why });
    return [
      { kind: 'produced', name: t.name, dtype: 'F8_E4M3', shape: t.shape, byteLength: numelOf(t.shape), describe: `fp8 e4m3(${t.describe})`, produce: pair.weight },
      { kind: 'produced', name: `${t.name}_scale_inv`, dtype: 'F32', shape: pair.scalesShape, byteLength: numelOf(pair.scalesShape) * 4, describe: `fp8 block scales(${t.describe})`, produce: pair.scales },
    ];
  });
  if (n === 0) throw badInput(`--quantize fp8: the export holds none of the weights ${what} quantizes (${hq.tensors.source})`);
  notes.push(`FP8: ${n} weights quantised from bf16 in ${br}×${bc} blocks as Megatron-Bridge's block quantizer (weights and scales each read the bf16 block rows)`);
  return out;
}

export async function convertMegatronToHf(megPath: string, out: string, opts: ModelConvertOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  const meg = await openMegatron(megPath);
  const src = meg.source;
  try {
    const mc = await megatronConfig(meg, opts);
    const { refDir, extra, notes } = mc;
    const mtp = mtpChoice(mc.cfg, opts, /^(language_model\.)?mtp\./);
    const cfg = mtp.cfg;
    notes.push(...mtp.notes);
    // No HF config to say: keep the dtype the weights are stored in.
    const dtype = opts.dtype ?? (cfg.hf ? hfDtype(cfg.hf) : storedDtype(src));
    notes.push(`family ${cfg.family}, ${cfg.numLayers} layers, dtype ${dtype}`);
    const built = buildExport(cfg, src, { dtype, allowUnmapped: opts.allowUnmapped, skip: mtp.skip });
    const { skipped, dtypes } = built;
    const tensors = opts.quantize ? quantizedExport(cfg, built.tensors, opts.quantize, notes, dtypes) : built.tensors;
    const report = writeSafetensors(tensors, { maxShardSize: opts.maxShardSize });
    let side = refDir ? await listSideFiles(refDir, (n) => n.endsWith('.safetensors') || n.endsWith('.index.json') || n.endsWith('.bin') || n.endsWith('.pt')) : [];
    const own = refDir && side.includes('config.json') ? await exportedConfig(join(refDir, 'config.json'), cfg, opts.quantize, notes) : undefined;
    if (own) {
      side = side.filter((f) => f !== 'config.json');
      extra.push({ relPath: 'config.json', size: own.length, parts: [own] });
    }
    const files = [...report.files, ...extra];
    checkComplete(tensors, files);
    const plan: ConvertPlan = {
      source: { path: megPath, format: 'megatron torch_dist', tensors: src.tensors.size, bytes: [...src.tensors.values()].reduce((s, t) => s + t.byteLength, 0) },
      target: { path: out, format: 'hf (safetensors)', kind: 'dir' },
      files: filePlan(files),
      dropped: [],
      skipped,
      dtype,
      dtypeExceptions: dtypes,
      sideFiles: side,
      totalBytes: files.reduce((s, f) => s + f.size, 0),
      notes,
    };
    return await finish(plan, t0, opts.dryRun, () =>
      writeOutput(megPath, out, 'dir', files, side.map((s) => ({ from: join(refDir!, s), to: s })), {
        ...opts,
        manifest: { command: 'convert --to hf', sourceFormat: 'megatron torch_dist', targetFormat: 'hf (safetensors)', sourceDir: src.root, sourceFiles: src.dataFiles },
      }),
    );
  } finally {
    await src.close();
  }
}
