/**
 * A Megatron checkpoint's model config, recovered and synthesized: from a reference HF directory
 * (`--hf-model`, or the checkpoint's own `hf/`), else Megatron-Bridge's run_config.yaml, else the
 * training args in common.pt (then a config.json is synthesized for HF outputs); the args a
 * Megatron output records (what MLM reads back with --use-checkpoint-args); and a Megatron
 * checkpoint seen lazily under its HF names.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { openMegatron, commonArgs } from '../megatron/checkpoint.js';
import { configJson, JsonFloat } from '../formats/config-json.js';
import { produceBox } from '../lazy/expr.js';
import type { CheckpointSource } from '../formats/types.js';
import type { OutputFile, SourceTensor, TargetTensor } from '../lazy/types.js';
import { PyFloat, PyGlobal, asNumber, type PyValue } from '../pickle/values.js';
import { badInput, isErrno, usage } from '../util/errors.js';
import { dtypeInfo, type DType } from '../tensor/dtype.js';
import { paddedVocab, textConfig, validateConfig, type HfLayout, type ModelConfig, type MoeConfig } from '../models/config.js';
import { parse as parseYaml } from 'yaml';
import { familyById, familyForHfConfig, familyForMegatron } from '../models/registry.js';
import { buildExport, fc1Gating, mainDtype } from './map.js';
import { familyOf } from '../models/registry.js';
import { targetView } from '../lazy/view.js';
import type { Family } from '../models/spec.js';
import { readTextFile } from '../io/file.js';

async function readJson(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readTextFile(path);
  } catch (e) {
    // Missing is the common case; anything else (a named pipe, too large, unreadable) says itself.
    if (isErrno(e) && e.code === 'ENOENT') throw badInput(`${path}: missing (an HF model directory needs its config.json)`, path);
    throw e;
  }
  try {
    const j = JSON.parse(text) as unknown;
    if (typeof j !== 'object' || j === null || Array.isArray(j)) throw new Error('not an object');
    return j as Record<string, unknown>;
  } catch (e) {
    throw badInput(`${path}: not a JSON object (${(e as Error).message})`, path);
  }
}

export async function configFromHfDir(dir: string): Promise<ModelConfig> {
  const file = join(dir, 'config.json');
  const cfg = await readJson(file);
  return familyForHfConfig(cfg, file).fromHf(cfg, file);
}

/**
 * The config refined by what an HF checkpoint's tensor names and shapes tell (`Family.fromHfNames`:
 * fused or input-major experts, name prefixes, MTP layers and copies) — for every reader of HF
 * tensors, not only the import (verify, dcp-to-hf check them through the same map).
 */
export function withHfLayout(cfg: ModelConfig, src: CheckpointSource, opts: { readonly dropMtp?: boolean } = {}): ModelConfig {
  return familyOf(cfg).fromHfNames?.(cfg, [...src.tensors.keys()], { ...opts, shapeOf: (n) => src.tensors.get(n)?.shape }) ?? cfg;
}

/** The dtype of a Megatron checkpoint's weights (what most of its bytes are in). */
export function storedDtype(src: CheckpointSource): DType {
  return mainDtype(src);
}

/**
 * A Megatron checkpoint (any layout) seen as its HF-named tensors, lazily — for conversions that
 * start from HF names (NxD). `configPath` is the HF config.json it maps with (`--hf-model`, or the
 * checkpoint's own `hf/`); checkpoints without one need `hfModel`.
 */
export async function openMegatronAsHf(path: string, opts: { hfModel?: string; allowUnmapped?: boolean }): Promise<{ source: CheckpointSource; configPath: string; cfg: ModelConfig }> {
  const meg = await openMegatron(path);
  try {
    const mc = await megatronConfig(meg, { hfModel: opts.hfModel });
    if (!mc.refDir) throw usage(`${path}: records no HF config (hf/config.json); give --hf-model <reference HF dir>`);
    const exp = buildExport(mc.cfg, meg.source, { dtype: 'keep', allowUnmapped: opts.allowUnmapped });
    const view = sourceFromTargets(path, exp.tensors, meg.source.root);
    return { source: { ...view, dataFiles: meg.source.dataFiles, close: () => meg.source.close() }, configPath: join(mc.refDir, 'config.json'), cfg: mc.cfg };
  } catch (e) {
    await meg.source.close();
    throw e;
  }
}

/** Lazy targets exposed as a source (for chaining maps: Megatron → HF names → Megatron). */
export function sourceFromTargets(path: string, targets: readonly TargetTensor[], root: string): CheckpointSource {
  const tensors = new Map<string, SourceTensor>();
  for (const t of targets) tensors.set(t.name, { name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, where: t.describe, read: (b, o) => produceBox(t, b, o) });
  return { format: 'megatron', path, root, tensors, objects: new Map(), metadata: new Map(), dataFiles: [], sideFiles: [], close: async () => undefined };
}

/** Canonical targets under the names a local-spec (non-TE) model has: unfused norms. */
export function localSpecNames(fam: Family, targets: ReadonlyMap<string, TargetTensor>, spec: 'te' | 'local'): Map<string, TargetTensor> {
  if (spec === 'te') return new Map(targets);
  const own = fam.localSpecName;
  if (own) return new Map([...targets].map(([name, t]) => [own(name), own(name) === name ? t : targetView(t, { name: own(name) })]));
  const LOCAL: Array<[RegExp, string]> = [
    [/\.self_attention\.linear_qkv\.layer_norm_weight$/, '.input_layernorm.weight'],
    [/\.mlp\.linear_fc1\.layer_norm_weight$/, '.pre_mlp_layernorm.weight'],
  ];
  const out = new Map<string, TargetTensor>();
  for (const [name, t] of targets) {
    const rule = LOCAL.find(([re]) => re.test(name));
    const n = rule ? name.replace(rule[0], rule[1]) : name;
    out.set(n, n === name ? t : targetView(t, { name: n }));
  }
  return out;
}

/** rope_theta from a transformers 4 (`rope_theta`) or 5 (`rope_parameters.rope_theta`) config. */
function ropeTheta(hf: Readonly<Record<string, unknown>>): number {
  if (typeof hf.rope_theta === 'number') return hf.rope_theta;
  const rp = hf.rope_parameters as Record<string, unknown> | undefined;
  return typeof rp?.rope_theta === 'number' ? rp.rope_theta : 10000;
}

/**
 * Position-embedding fields megatron-core computes with but has no weight for, which `verify
 * --logits` showed missing: Llama 3.1's rope scaling (`use_rope_scaling` + `rope_scaling_factor`;
 * megatron-core's RotaryEmbedding._apply_scaling fixes low/high frequency factors 1 and 4 and
 * 8192 original positions, the values every published Llama 3.x config has) and Mistral's sliding
 * window (`window_size` (W - 1, 0): megatron-core's get_sliding_window_causal_mask keeps
 * positions i - window_size[0] … i, transformers' sliding_window W keeps W of them).
 */
function positionArgs(hf: Readonly<Record<string, unknown>>): Record<string, PyValue> {
  const out: Record<string, PyValue> = {};
  const rp = (hf.rope_scaling ?? hf.rope_parameters) as Record<string, unknown> | null | undefined;
  if (rp && (rp.rope_type ?? rp.type) === 'llama3') {
    out.use_rope_scaling = true;
    out.rope_scaling_factor = new PyFloat(typeof rp.factor === 'number' ? rp.factor : 8);
  }
  const mt = hf.model_type;
  if ((mt === 'mistral' || mt === 'mixtral') && typeof hf.sliding_window === 'number' && hf.use_sliding_window !== false) {
    out.window_size = [hf.sliding_window - 1, 0];
  }
  return out;
}

/** The training-args fields MLM reads back with --use-checkpoint-args. */
export function megatronArgs(c: ModelConfig, o: { tp: number; pp: number; divisor: number; dtype: DType; iteration: number }): Record<string, PyValue> {
  // A VL wrapper's text fields (rope, norms, positions) live in its text_config.
  const hf = textConfig(c.hf ?? {});
  const f = (x: unknown, d: number): PyFloat => new PyFloat(typeof x === 'number' ? x : d);
  return {
    num_layers: c.numLayers,
    hidden_size: c.hiddenSize,
    ffn_hidden_size: c.ffnHiddenSize,
    num_attention_heads: c.numAttentionHeads,
    group_query_attention: c.numQueryGroups !== c.numAttentionHeads,
    num_query_groups: c.numQueryGroups,
    kv_channels: c.kvChannels,
    max_position_embeddings: typeof hf.max_position_embeddings === 'number' ? hf.max_position_embeddings : 4096,
    vocab_size: c.vocabSize,
    padded_vocab_size: paddedVocab(c.vocabSize, o.divisor, o.tp),
    make_vocab_size_divisible_by: o.divisor,
    untie_embeddings_and_output_weights: !c.tieEmbeddings,
    add_qkv_bias: c.qkvBias,
    add_bias_linear: false,
    qk_layernorm: c.qkNorm,
    normalization: 'RMSNorm',
    norm_epsilon: f(hf.rms_norm_eps, 1e-5),
    // One flag for the model, from the family table (a family may still override it below).
    swiglu: fc1Gating(familyOf(c), c) !== 'plain',
    position_embedding_type: 'rope',
    rotary_base: ropeTheta(hf),
    ...positionArgs(hf),
    tensor_model_parallel_size: o.tp,
    pipeline_model_parallel_size: o.pp,
    params_dtype: new PyGlobal('torch', dtypeInfo(o.dtype).torchDtype!),
    bf16: o.dtype === 'BF16',
    fp16: o.dtype === 'F16',
    iteration: o.iteration,
    ...(familyOf(c).megatronArgs?.(c) ?? {}),
    shardshift_family: c.family,
  };
}

/**
 * The model section of a Megatron-Bridge `run_config.yaml` (flat provider fields, or the newer
 * builder form with a nested `transformer:` mapping), as a plain field map.
 */
async function runConfigModel(iterDir: string): Promise<Map<string, unknown> | undefined> {
  const path = join(iterDir, 'run_config.yaml');
  let text: string;
  try {
    text = await readTextFile(path);
  } catch {
    return undefined;
  }
  let doc: unknown;
  try {
    // Plain YAML: MB's custom tags are written as mappings (_target_, _call_), never as YAML tags.
    doc = parseYaml(text, { customTags: [], uniqueKeys: false });
  } catch (e) {
    throw badInput(`${path}: not valid YAML (${(e as Error).message})`, path);
  }
  const model = (doc as Record<string, unknown> | null)?.model as Record<string, unknown> | undefined;
  if (!model || typeof model !== 'object') return undefined;
  const fields = new Map<string, unknown>(Object.entries(model));
  const tr = model.transformer;
  if (tr && typeof tr === 'object') for (const [k, v] of Object.entries(tr as Record<string, unknown>)) fields.set(k, v);
  return fields;
}

/**
 * Where a Megatron checkpoint's model fields come from: Megatron-Bridge's run_config.yaml model
 * section (provider field names, `_target_` naming the provider class) or MLM's training args in
 * common.pt (which shardshift's own outputs extend with `shardshift_family`). The two name a few
 * fields differently; everything else is read the same way.
 */
interface MegatronFields {
  readonly get: (k: string) => unknown;
  readonly where: string;
  /** Megatron-Bridge's provider class, lower-cased ('' for training args). */
  readonly target: string;
  readonly numQueryGroups: (heads: number, need: (k: string) => number) => number;
  readonly vocabSize: (need: (k: string) => number, n: (k: string) => number | undefined) => number;
  readonly tied: boolean;
  readonly hybrid: boolean;
  readonly recordedFamily?: string;
}

function runConfigFields(m: Map<string, unknown>): MegatronFields {
  const target = String(m.get('_target_') ?? '').toLowerCase();
  return {
    get: (k) => m.get(k),
    where: 'model section',
    target,
    numQueryGroups: (heads) => (typeof m.get('num_query_groups') === 'number' ? (m.get('num_query_groups') as number) : heads),
    vocabSize: (need) => need('vocab_size'),
    tied: m.get('share_embeddings_and_output_weights') !== false,
    hybrid: m.get('hybrid_override_pattern') !== undefined || m.get('hybrid_layer_pattern') !== undefined || /mamba|hybrid|nemotronh/.test(target),
  };
}

function argsFields(args: NonNullable<ReturnType<typeof commonArgs>>): MegatronFields {
  const fam = args.get('shardshift_family');
  return {
    get: (k) => args.get(k),
    where: 'args',
    target: '',
    numQueryGroups: (heads, need) => (args.get('group_query_attention') === true ? need('num_query_groups') : heads),
    vocabSize: (need, n) => n('vocab_size') ?? need('padded_vocab_size'),
    tied: args.get('untie_embeddings_and_output_weights') !== true,
    hybrid: args.get('hybrid_override_pattern') !== undefined || args.get('is_hybrid_model') === true,
    ...(typeof fam === 'string' && familyById(fam) ? { recordedFamily: fam } : {}),
  };
}

/** A ModelConfig from a Megatron checkpoint's recorded fields (when no HF config is at hand). */
function configFromMegatron(f: MegatronFields, file: string): ModelConfig {
  const n = (k: string): number | undefined => {
    const v = f.get(k);
    return typeof v === 'number' ? v : asNumber(v as PyValue);
  };
  const need = (k: string): number => {
    const v = n(k);
    if (v === undefined) throw badInput(`${file}: ${f.where} has no ${k}; give --hf-model <reference HF dir>`, file);
    return v;
  };
  // MLA's sizes (q/kv LoRA ranks, rope/nope head dims) and its router (groups, scaling) live in the HF config.
  if (f.get('multi_latent_attention') === true) throw badInput(`${file}: a multi-latent-attention (DeepSeek-V3 / Kimi K2) model's config is not rebuilt from ${f.where === 'args' ? 'the training args' : 'run_config.yaml'} yet; give --hf-model <reference HF dir>`, file);
  if (f.hybrid) throw badInput(`${file}: a hybrid (Mamba) model's config is not ${f.where === 'args' ? 'rebuilt from the training args' : 'read from run_config.yaml'} yet; give --hf-model <reference HF dir>`, file);
  const qkNorm = f.get('qk_layernorm') === true;
  const qkvBias = f.get('add_qkv_bias') === true;
  const moe = moeFromMegatron(f.get, file);
  const family = f.recordedFamily ?? familyForMegatron({ target: f.target, moe: moe !== undefined, qkNorm, qkvBias, expertBias: moe?.routerBias === true, ...(typeof f.get('moe_router_score_function') === 'string' ? { scoreFunction: f.get('moe_router_score_function') as string } : {}) }, file).id;
  const heads = need('num_attention_heads');
  const hidden = need('hidden_size');
  const c: ModelConfig = {
    ...(moe ? { moe } : {}),
    family,
    numLayers: need('num_layers'),
    hiddenSize: hidden,
    ffnHiddenSize: need('ffn_hidden_size'),
    numAttentionHeads: heads,
    numQueryGroups: f.numQueryGroups(heads, need),
    kvChannels: n('kv_channels') ?? hidden / heads,
    vocabSize: f.vocabSize(need, n),
    tieEmbeddings: f.tied,
    qkvBias,
    qkNorm,
    // megatron-core's MTP block (MLM arg and Megatron-Bridge provider field alike).
    ...(n('mtp_num_layers') ? { mtpLayers: n('mtp_num_layers')! } : {}),
  };
  validateConfig(c, file);
  return c;
}

type FieldGetter = (mlmArgName: string) => unknown;

/**
 * The MoE section from Megatron's config fields (MLM args or Megatron-Bridge provider fields:
 * `num_experts` / `num_moe_experts`, `moe_router_topk`, `moe_ffn_hidden_size`, shared experts,
 * expert bias, `moe_layer_freq`), or undefined for dense models.
 */
function moeFromMegatron(get: (k: string) => unknown, file: string): MoeConfig | undefined {
  const n = (k: string): number | undefined => {
    const v = get(k);
    return typeof v === 'number' ? v : asNumber(v as PyValue);
  };
  const E = n('num_experts') ?? n('num_moe_experts');
  if (!E) return undefined;
  const F = n('moe_ffn_hidden_size') ?? n('ffn_hidden_size');
  if (!F) throw badInput(`${file}: an MoE config (${E} experts) without moe_ffn_hidden_size or ffn_hidden_size`, file);
  const freq = get('moe_layer_freq');
  const list = Array.isArray(freq) ? (freq as unknown[]).map((x) => Number(x) === 1) : undefined;
  const shared = n('moe_shared_expert_intermediate_size');
  return {
    numExperts: E,
    topK: n('moe_router_topk') ?? 2,
    ffnHiddenSize: F,
    ...(shared ? { sharedExpertFfn: shared, sharedExpertGate: get('moe_shared_expert_gate') === true } : {}),
    ...(get('moe_router_enable_expert_bias') === true ? { routerBias: true } : {}),
    ...(list && list.some((x) => !x) ? { moeLayers: list } : {}),
  };
}

/** Megatron-Bridge provider field names for the MLM args hfConfigFor reads. */
const MB_FIELD: Record<string, string> = { max_position_embeddings: 'seq_length', norm_epsilon: 'layernorm_epsilon' };

/** An HF config.json for a config that came from Megatron args or run_config.yaml. */
function hfConfigFor(c: ModelConfig, field: FieldGetter, dtype: DType): Record<string, unknown> {
  const fam = familyById(c.family)!;
  const num = (k: string, d: number): number => {
    const v = field(k);
    return typeof v === 'number' ? v : (asNumber(v as PyValue) ?? d);
  };
  return {
    architectures: [fam.architectures[0]],
    model_type: fam.modelType,
    hidden_size: c.hiddenSize,
    intermediate_size: c.ffnHiddenSize,
    num_hidden_layers: c.numLayers,
    num_attention_heads: c.numAttentionHeads,
    num_key_value_heads: c.numQueryGroups,
    head_dim: c.kvChannels,
    vocab_size: c.vocabSize,
    max_position_embeddings: num('max_position_embeddings', 4096),
    rms_norm_eps: new JsonFloat(num('norm_epsilon', 1e-5)),
    rope_theta: new JsonFloat(num('rotary_base', 10000)),
    ...(field('use_rope_scaling') === true
      ? { rope_scaling: { rope_type: 'llama3', factor: new JsonFloat(num('rope_scaling_factor', 8)), low_freq_factor: new JsonFloat(1), high_freq_factor: new JsonFloat(4), original_max_position_embeddings: 8192 } }
      : {}),
    tie_word_embeddings: c.tieEmbeddings,
    hidden_act: 'silu',
    ...(fam.hfConfig?.(c, field) ?? {}),
    torch_dtype: dtype === 'F32' ? 'float32' : dtype === 'F16' ? 'float16' : 'bfloat16',
  };
}

/**
 * The model config of a Megatron checkpoint: from `--hf-model`, else the checkpoint's own `hf/`,
 * else Megatron-Bridge's run_config.yaml, else the training args in common.pt (then a config.json
 * is synthesized for HF outputs).
 */
export async function megatronConfig(
  meg: Awaited<ReturnType<typeof openMegatron>>,
  opts: { hfModel?: string; dtype?: DType },
): Promise<{ cfg: ModelConfig; refDir?: string; extra: OutputFile[]; notes: string[] }> {
    const notes = [`iteration: ${meg.resolved.how}`];
    const ownHf = join(meg.resolved.iterDir, 'hf');
    let refDir: string | undefined = opts.hfModel;
    if (!refDir && (await stat(join(ownHf, 'config.json')).then(() => true, () => false))) refDir = ownHf;
    let cfg: ModelConfig;
    const extra: OutputFile[] = [];
    if (refDir) {
      cfg = await configFromHfDir(refDir);
      notes.push(`config and tokenizer from ${refDir === ownHf ? 'the checkpoint\'s hf/ directory' : refDir}`);
    } else {
      const args = commonArgs(meg.common);
      const rc = await runConfigModel(meg.resolved.iterDir);
      let fields: FieldGetter;
      if (rc) {
        cfg = configFromMegatron(runConfigFields(rc), join(meg.resolved.iterDir, 'run_config.yaml'));
        fields = (k) => rc.get(MB_FIELD[k] ?? k);
        notes.push('config from run_config.yaml (Megatron-Bridge); config.json synthesized, no tokenizer carried');
      } else if (args) {
        cfg = configFromMegatron(argsFields(args), join(meg.resolved.iterDir, 'common.pt'));
        fields = (k) => args.get(k);
        notes.push('config.json synthesized from the training args in common.pt (no tokenizer carried)');
      } else {
        throw badInput(`${meg.resolved.iterDir}: no recorded config (hf/config.json, run_config.yaml, or args in common.pt); give --hf-model <reference HF dir>`, meg.resolved.iterDir);
      }
      const bytes = Buffer.from(configJson(hfConfigFor(cfg, fields, opts.dtype ?? storedDtype(meg.source))));
      extra.push({ relPath: 'config.json', size: bytes.length, parts: [bytes] });
    }
  cfg = megatronLayout(cfg, meg, notes);
  return { cfg, refDir, extra, notes };
}

/**
 * What a Megatron checkpoint itself says beyond its config: the HF layout recorded at import
 * (`shardshift_hf_layout`: fused experts, a name prefix), and the MTP layers it really holds —
 * counted where the config records none, and none where the config records some but the
 * checkpoint (trained without MTP, or converted with --drop-mtp) has no `mtp.*` tensors.
 */
function megatronLayout(cfg: ModelConfig, meg: Awaited<ReturnType<typeof openMegatron>>, notes: string[]): ModelConfig {
  let out = cfg;
  const rec = commonArgs(meg.common)?.get('shardshift_hf_layout');
  if (typeof rec === 'string') {
    try {
      out = { ...out, hfLayout: JSON.parse(rec) as HfLayout };
    } catch {
      throw badInput(`${meg.resolved.iterDir}: args.shardshift_hf_layout is not JSON (${rec.slice(0, 60)})`, meg.resolved.iterDir);
    }
  }
  const wrap = familyOf(out).megatronPrefix?.(out)?.prefix ?? '';
  const ks = [...meg.source.tensors.keys()]
    .map((n) => (wrap && n.startsWith(wrap) ? n.slice(wrap.length) : n))
    .map((n) => /^mtp\.layers\.(\d+)\./.exec(n)?.[1])
    .filter((k): k is string => k !== undefined)
    .map(Number);
  const held = ks.length ? Math.max(...ks) + 1 : 0;
  if (out.mtpLayers === undefined && held > 0) out = { ...out, mtpLayers: held };
  else if (out.mtpLayers && held === 0) {
    notes.push(`MTP: the config records ${out.mtpLayers} layer(s), the checkpoint holds none (exported without)`);
    out = { ...out, mtpLayers: 0 };
  }
  return out;
}
