/**
 * Qwen3-Next (80B-A3B): a hybrid stack of gated delta-net (GDN) linear-attention layers and gated
 * full-attention layers (HF `layer_types`, default every `full_attention_interval`-th layer full),
 * MoE MLPs with a gated shared expert, zero-centred RMSNorms. Mapped as Megatron-Bridge's
 * `Qwen3NextBridge` maps it onto megatron-core 0.16's GPTModel with the experimental-attention
 * block spec (`experimental_attention_variant='gated_delta_net'`, `attention_output_gate`,
 * `layernorm_zero_centered_gamma`):
 *
 * - full attention: HF `q_proj` holds, per head, its query rows then its output-gate rows
 *   ([np, 2·hn, H]); Megatron `linear_qkv` rows per query group g are the group's query heads,
 *   then their gate heads, then key head g, then value head g;
 * - GDN: `in_proj` = [q; k; v; z; b; a] with each block over all heads, taken from HF's
 *   per-key-head grouped `in_proj_qkvz` ([nk, 2·dk + 2·r·dv, H], r = nv/nk) and `in_proj_ba`
 *   ([nk, 2·r, H]); conv1d (channels q|k|v), A_log, dt_bias, out_proj copied; the gated output
 *   norm `linear_attn.norm` is a plain RMSNorm in HF (weight ≈ 1) but zero-centred in Megatron
 *   (`out_norm.weight` = HF − 1);
 * - the other norms are zero-centred on both sides (copied);
 * - torch_dist stores `in_proj.weight` as six keys `.query/.key/.value/.z/.beta/.alpha` and
 *   `conv1d.weight` as three (`.query/.key/.value`), megatron-core's `_split_tensor_factory`;
 * - multi-token prediction (the hub's `mtp.*`, one layer) → megatron-core's MTP block as
 *   Megatron-Bridge's Qwen3-Next / Qwen3.5 bridges map it: `mtp.fc` → `mtp.layers.0.eh_proj`
 *   ([embedding; hidden] on both sides), `mtp.pre_fc_norm_embedding` / `_hidden` → `enorm` /
 *   `hnorm`, `mtp.norm` → `final_layernorm`, `mtp.layers.0.*` → `transformer_layer.*` — a
 *   full-attention layer of the decoder's kind (megatron-core builds the MTP layer from the last
 *   decoder layer's spec), experts per expert as the hub stores them. torch_dist keys MTP layers
 *   per layer (`MultiTokenPredictionBlock.sharded_state_dict`; `transformer_layer` is also the
 *   on-disk name of megatron-core ≥ 0.17's `mtp_model_layer`).
 */
import { badInput, unsupported } from '../util/errors.js';
import { fromHfConfig, isMoeLayer, num, partialRotaryFactor, textConfig, type ExpertLayout, type ModelConfig } from './config.js';
import { denseGlobals, denseMlpParams, moeArgs, moeExtraState, moeParams } from './dense.js';
import type { Block, CustomKind, Family, GlobalParam, LayerParam, PrecisionRule, SourcePart } from './spec.js';
import type { TargetTensor } from '../lazy/types.js';
import { PyFloat } from '../pickle/values.js';
import { rowConcat, rows, type RowSegment } from '../lazy/expr.js';
import { castBytes } from '../tensor/cast.js';
import { byteLength, numelOf, type DType } from '../tensor/dtype.js';

export type LayerType = 'linear_attention' | 'full_attention';

interface Gdn {
  readonly nk: number;
  readonly nv: number;
  readonly dk: number;
  readonly dv: number;
  readonly kernel: number;
}

/** The per-layer attention kinds of a Qwen3-Next HF config; unknown kinds are refused. */
export function layerTypes(cfg: Readonly<Record<string, unknown>>, numLayers: number, file: string): LayerType[] {
  if (cfg.layer_types !== undefined && cfg.layer_types !== null) {
    if (!Array.isArray(cfg.layer_types) || cfg.layer_types.length !== numLayers) {
      throw badInput(`${file}: layer_types must list one kind per layer (${numLayers}), got ${JSON.stringify(cfg.layer_types)}`, file);
    }
    return (cfg.layer_types as unknown[]).map((t, i) => {
      if (t === 'linear_attention' || t === 'full_attention') return t;
      throw badInput(`${file}: layer_types[${i}] is ${JSON.stringify(t)}; a Qwen3-Next layer is "linear_attention" (gated delta-net) or "full_attention"`, file);
    });
  }
  const every = num(cfg as Record<string, unknown>, 'full_attention_interval', file, 4);
  return Array.from({ length: numLayers }, (_, i) => ((i + 1) % every === 0 ? 'full_attention' : 'linear_attention'));
}

const gdnOf = new WeakMap<ModelConfig, Gdn>();

function gdn(c: ModelConfig): Gdn {
  let g = gdnOf.get(c);
  if (!g) gdnOf.set(c, (g = readGdn(c)));
  return g;
}

function readGdn(c: ModelConfig): Gdn {
  const h = hfOf(c);
  const g = {
    nk: num(h as Record<string, unknown>, 'linear_num_key_heads', 'config.json', 16),
    nv: num(h as Record<string, unknown>, 'linear_num_value_heads', 'config.json', 32),
    dk: num(h as Record<string, unknown>, 'linear_key_head_dim', 'config.json', 128),
    dv: num(h as Record<string, unknown>, 'linear_value_head_dim', 'config.json', 128),
    kernel: num(h as Record<string, unknown>, 'linear_conv_kernel_dim', 'config.json', 4),
  };
  return g;
}

/** The HF config the GDN shapes and the layer pattern come from (Megatron args alone do not carry them). */
function hfOf(c: ModelConfig): Readonly<Record<string, unknown>> {
  if (!c.hf) throw badInput(`a Qwen3-Next checkpoint needs its HF config (layer_types, linear_* head counts and dims): give --hf-model <reference HF dir>`);
  return textConfig(c.hf);
}

// Per config, computed once: the maps ask for every layer's kind many times over.
const typesOf = new WeakMap<ModelConfig, LayerType[]>();

function types(c: ModelConfig): LayerType[] {
  let t = typesOf.get(c);
  if (!t) typesOf.set(c, (t = layerTypes(hfOf(c), c.numLayers, 'config.json')));
  return t;
}

function partRows(p: SourcePart, start: number, count: number): RowSegment {
  return rows(p.src, start, count, p.prefix);
}

/** Gated full attention: HF q_proj per head [query; gate] → Megatron per group [queries; gates; k; v]. */
function gatedQkv(c: ModelConfig): CustomKind {
  const hn = c.kvChannels;
  const ng = c.numQueryGroups;
  const r = c.numAttentionHeads / ng;
  const per = (2 * r + 2) * hn;
  return {
    id: 'qkv-gated',
    toMegatron(name, [q, k, v], shape) {
      const segs: RowSegment[] = [];
      for (let g = 0; g < ng; g++) {
        for (let h = g * r; h < (g + 1) * r; h++) segs.push(partRows(q!, 2 * h * hn, hn));
        for (let h = g * r; h < (g + 1) * r; h++) segs.push(partRows(q!, 2 * h * hn + hn, hn));
        segs.push(partRows(k!, g * hn, hn), partRows(v!, g * hn, hn));
      }
      return rowConcat(name, q!.src.dtype, shape.slice(1), segs, `qkv-gated(${q!.src.name}, ${k!.src.name}, ${v!.src.name})`);
    },
    toHf([qn, kn, vn], src, shapes) {
      const rest = shapes[0]!.slice(1);
      const qs: RowSegment[] = [];
      for (let h = 0; h < c.numAttentionHeads; h++) {
        const g = Math.floor(h / r);
        const j = h % r;
        qs.push(partRows(src, g * per + j * hn, hn), partRows(src, g * per + (r + j) * hn, hn));
      }
      const d = src.src.dtype;
      return [
        rowConcat(qn!, d, rest, qs, `${src.src.name} query + gate heads`),
        rowConcat(kn!, d, rest, Array.from({ length: ng }, (_, g) => partRows(src, g * per + 2 * r * hn, hn)), `${src.src.name} key heads`),
        rowConcat(vn!, d, rest, Array.from({ length: ng }, (_, g) => partRows(src, g * per + (2 * r + 1) * hn, hn)), `${src.src.name} value heads`),
      ];
    },
  };
}

/** GDN input projection: HF per-key-head grouped qkvz / ba ↔ Megatron [q; k; v; z; b; a]. */
function gdnInProj(g: Gdn): CustomKind {
  const r = g.nv / g.nk;
  const P = 2 * g.dk + 2 * r * g.dv; // rows of one key head's group in in_proj_qkvz
  const qk = g.nk * g.dk;
  const vd = g.nv * g.dv;
  const blocks = (qkvz: SourcePart, ba: SourcePart): RowSegment[][] => {
    const per = (src: SourcePart, stride: number, off: number, n: number): RowSegment[] => Array.from({ length: g.nk }, (_, h) => partRows(src, h * stride + off, n));
    return [
      per(qkvz, P, 0, g.dk),
      per(qkvz, P, g.dk, g.dk),
      per(qkvz, P, 2 * g.dk, r * g.dv),
      per(qkvz, P, 2 * g.dk + r * g.dv, r * g.dv),
      per(ba, 2 * r, 0, r),
      per(ba, 2 * r, r, r),
    ];
  };
  return {
    id: 'gdn-in-proj',
    toMegatron(name, [qkvz, ba], shape) {
      return rowConcat(name, qkvz!.src.dtype, shape.slice(1), blocks(qkvz!, ba!).flat(), `gdn-in-proj(${qkvz!.src.name}, ${ba!.src.name})`);
    },
    toHf([qkvzName, baName], src, shapes) {
      const rest = shapes[0]!.slice(1);
      const starts = [0, qk, 2 * qk, 2 * qk + vd, 2 * qk + 2 * vd, 2 * qk + 2 * vd + g.nv];
      const qkvz: RowSegment[] = [];
      const ba: RowSegment[] = [];
      for (let h = 0; h < g.nk; h++) {
        qkvz.push(partRows(src, starts[0]! + h * g.dk, g.dk), partRows(src, starts[1]! + h * g.dk, g.dk), partRows(src, starts[2]! + h * r * g.dv, r * g.dv), partRows(src, starts[3]! + h * r * g.dv, r * g.dv));
        ba.push(partRows(src, starts[4]! + h * r, r), partRows(src, starts[5]! + h * r, r));
      }
      return [
        rowConcat(qkvzName!, src.src.dtype, rest, qkvz, `${src.src.name} q/k/v/z per key head`),
        rowConcat(baName!, src.src.dtype, rest, ba, `${src.src.name} b/a per key head`),
      ];
    },
  };
}

/** GDN input projection from Qwen3.5's separate flat `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a` (a row concatenation). */
function concatKind(counts: readonly number[]): CustomKind {
  return {
    id: 'concat',
    toMegatron: (name, pieces, shape) => rowConcat(name, pieces[0]!.src.dtype, shape.slice(1), pieces.map((p, k) => partRows(p, 0, counts[k]!)), `concat(${pieces.map((p) => p.src.name).join(', ')})`),
    toHf: (names, src, shapes) => {
      let at = 0;
      return names.map((n, k) => {
        const t = rowConcat(n, src.src.dtype, shapes[k]!.slice(1), [partRows(src, at, counts[k]!)], `${src.src.name} rows ${at}..${at + counts[k]!}`);
        at += counts[k]!;
        return t;
      });
    },
  };
}

/** x + delta elementwise (F32 / BF16 / F16: computed in double, rounded to the tensor's dtype). */
function offsetOf(name: string, p: SourcePart, delta: number, shape: readonly number[]): TargetTensor {
  const dtype: DType = p.src.dtype;
  if (dtype !== 'F32' && dtype !== 'BF16' && dtype !== 'F16') throw unsupported(`${p.src.name}: a ${delta > 0 ? '+' : ''}${delta} norm offset needs F32, BF16 or F16, not ${dtype}`, undefined, p.src.name);
  return { kind: 'produced',
    name,
    dtype,
    shape,
    byteLength: byteLength(dtype, numelOf(shape)),
    describe: `${p.src.name}${p.prefix.length ? `[${p.prefix.join(', ')}]` : ''} ${delta > 0 ? '+' : '−'} ${Math.abs(delta)}`,
    produce: async (box, out) => {
      await p.src.read({ start: [...p.prefix, ...box.start], size: [...p.prefix.map(() => 1), ...box.size] }, out);
      const n = numelOf(box.size);
      const f = dtype === 'F32' ? new Float32Array(out.buffer, out.byteOffset, n) : new Float32Array(castBytes(out, dtype, 'F32').buffer, 0, n);
      for (let k = 0; k < n; k++) f[k] = f[k]! + delta;
      if (dtype !== 'F32') out.set(castBytes(new Uint8Array(f.buffer, f.byteOffset, n * 4), 'F32', dtype));
    },
  };
}

/** HF plain RMSNorm weight ↔ Megatron zero-centred weight (Megatron-Bridge's RMSNorm2ZeroCenteredRMSNormMapping). */
const ZERO_CENTRED: CustomKind = {
  id: 'zero-centred-norm',
  toMegatron: (name, [p], shape) => offsetOf(name, p!, -1, shape),
  toHf: ([n], src, shapes) => [offsetOf(n!, src, 1, shapes[0]!)],
};

/** Qwen3.5's hub checkpoints store the GatedDeltaNet `A_log` and output norm in float32 (vLLM #51836): kept so. */
const GDN_STATE_PRECISION: PrecisionRule = { hf: 'keep-fp32', megatron: 'keep-fp32', why: 'GatedDeltaNet A_log / output norm: a float32 source keeps its precision' };

function fullAttentionParams(c: ModelConfig, L: string): LayerParam[] {
  const H = c.hiddenSize;
  const hn = c.kvChannels;
  const q = c.numAttentionHeads * hn;
  const kv = c.numQueryGroups * hn;
  const S = `${L}.self_attn`;
  return [
    { megatron: 'self_attention.linear_qkv.layer_norm_weight', hf: [`${L}.input_layernorm.weight`], kind: 'copy', hfShapes: [[H]], shape: [H], aliases: ['input_layernorm.weight'] },
    { megatron: 'self_attention.linear_qkv.weight', hf: ['q', 'k', 'v'].map((x) => `${S}.${x}_proj.weight`), kind: gatedQkv(c), hfShapes: [[2 * q, H], [kv, H], [kv, H]], shape: [2 * q + 2 * kv, H] },
    { megatron: 'self_attention.q_layernorm.weight', hf: [`${S}.q_norm.weight`], kind: 'copy', hfShapes: [[hn]], shape: [hn] },
    { megatron: 'self_attention.k_layernorm.weight', hf: [`${S}.k_norm.weight`], kind: 'copy', hfShapes: [[hn]], shape: [hn] },
    { megatron: 'self_attention.linear_proj.weight', hf: [`${S}.o_proj.weight`], kind: 'copy', hfShapes: [[H, q]], shape: [H, q] },
  ];
}

function gdnParams(c: ModelConfig, L: string, separate: boolean): LayerParam[] {
  const H = c.hiddenSize;
  const g = gdn(c);
  const qk = g.nk * g.dk;
  const vd = g.nv * g.dv;
  const r = g.nv / g.nk;
  const conv = 2 * qk + vd;
  const A = `${L}.linear_attn`;
  return [
    { megatron: 'self_attention.in_proj.layer_norm_weight', hf: [`${L}.input_layernorm.weight`], kind: 'copy', hfShapes: [[H]], shape: [H], aliases: ['input_layernorm.weight'] },
    separate
      ? { megatron: 'self_attention.in_proj.weight', hf: ['qkv', 'z', 'b', 'a'].map((x) => `${A}.in_proj_${x}.weight`), kind: concatKind([conv, vd, g.nv, g.nv]), hfShapes: [[conv, H], [vd, H], [g.nv, H], [g.nv, H]], shape: [2 * qk + 2 * vd + 2 * g.nv, H] }
      : { megatron: 'self_attention.in_proj.weight', hf: [`${A}.in_proj_qkvz.weight`, `${A}.in_proj_ba.weight`], kind: gdnInProj(g), hfShapes: [[g.nk * (2 * g.dk + 2 * r * g.dv), H], [2 * g.nv, H]], shape: [2 * qk + 2 * vd + 2 * g.nv, H] },
    { megatron: 'self_attention.conv1d.weight', hf: [`${A}.conv1d.weight`], kind: 'copy', hfShapes: [[conv, 1, g.kernel]], shape: [conv, 1, g.kernel] },
    { megatron: 'self_attention.A_log', hf: [`${A}.A_log`], kind: 'copy', hfShapes: [[g.nv]], shape: [g.nv], precision: GDN_STATE_PRECISION },
    { megatron: 'self_attention.dt_bias', hf: [`${A}.dt_bias`], kind: 'copy', hfShapes: [[g.nv]], shape: [g.nv] },
    { megatron: 'self_attention.out_norm.weight', hf: [`${A}.norm.weight`], kind: ZERO_CENTRED, hfShapes: [[g.dv]], shape: [g.dv], precision: GDN_STATE_PRECISION },
    { megatron: 'self_attention.out_proj.weight', hf: [`${A}.out_proj.weight`], kind: 'copy', hfShapes: [[H, vd]], shape: [H, vd] },
  ];
}

/** The MoE block of a layer at HF prefix `L` (`{i}` = layer), experts per expert or fused per layer. */
function moeBlockParams(c: ModelConfig, L: string, experts: ExpertLayout): LayerParam[] {
  const M = `${L}.mlp`;
  return moeParams(c, {
    norm: `${L}.post_attention_layernorm.weight`,
    router: `${M}.gate.weight`,
    gate: `${M}.experts.{e}.gate_proj.weight`,
    up: `${M}.experts.{e}.up_proj.weight`,
    down: `${M}.experts.{e}.down_proj.weight`,
    // transformers 5's fused layout (Qwen3.5-MoE hub checkpoints): gate_up_proj [E, 2F, H] = [gate; up] per expert, down_proj [E, H, F].
    ...(experts === 'fused' ? { fused: { gateUp: `${M}.experts.gate_up_proj`, down: `${M}.experts.down_proj` } } : {}),
    shared: { gate: `${M}.shared_expert.gate_proj.weight`, up: `${M}.shared_expert.up_proj.weight`, down: `${M}.shared_expert.down_proj.weight`, outputGate: `${M}.shared_expert_gate.weight` },
  });
}

/** The parameters of a decoder layer of kind `kind` whose HF names start with `L` (`{i}` = layer). */
function hybridLayerParams(c: ModelConfig, spec: HybridSpec, L: string, kind: LayerType, moe: boolean, experts: ExpertLayout): LayerParam[] {
  return [
    ...(kind === 'full_attention' ? fullAttentionParams(c, L) : gdnParams(c, L, spec.separateInProj)),
    ...(moe ? moeBlockParams(c, L, experts) : denseMlpParams(c, `${L}.mlp`, `${L}.post_attention_layernorm.weight`)),
  ];
}

function hybridExtraState(c: ModelConfig, kind: LayerType, moe: boolean): string[] {
  const attn = kind === 'full_attention' ? ['self_attention.linear_qkv', 'self_attention.linear_proj'] : ['self_attention.in_proj', 'self_attention.out_proj'];
  return moe ? [...attn, ...moeExtraState(c)] : [...attn, 'mlp.linear_fc1', 'mlp.linear_fc2'];
}

/**
 * megatron-core's MTP block for the hub's one `mtp.*` layer: the head tensors and a full-attention
 * transformer layer of the last decoder layer's MLP kind (MoE for MoE models), experts as the hub
 * stores the MTP experts.
 */
function mtpBlock(c: ModelConfig, spec: HybridSpec): Block {
  const H = c.hiddenSize;
  const moe = isMoeLayer(c, c.numLayers - 1);
  const norm = (megatron: string, hf: string): LayerParam => ({ megatron, hf: [hf], kind: 'copy', hfShapes: [[H]], shape: [H] });
  const inLayer = (p: LayerParam): LayerParam => ({ ...p, megatron: `transformer_layer.${p.megatron}`, ...(p.aliases ? { aliases: p.aliases.map((a) => `transformer_layer.${a}`) } : {}) });
  return {
    prefix: 'mtp.layers.',
    layers: c.mtpLayers ?? 0,
    keying: 'per-layer',
    params: () => [
      norm('enorm.weight', 'mtp.pre_fc_norm_embedding.weight'),
      norm('hnorm.weight', 'mtp.pre_fc_norm_hidden.weight'),
      { megatron: 'eh_proj.weight', hf: ['mtp.fc.weight'], kind: 'copy', hfShapes: [[H, 2 * H]], shape: [H, 2 * H] },
      ...hybridLayerParams(c, spec, 'mtp.layers.{i}', 'full_attention', moe, c.hfLayout?.mtpExperts ?? 'per-expert').map(inLayer),
      norm('final_layernorm.weight', 'mtp.norm.weight'),
    ],
    extraStateModules: () => ['eh_proj', ...hybridExtraState(c, 'full_attention', moe).map((m) => `transformer_layer.${m}`)],
  };
}

/** A VL wrapper's vision tower, carried through Megatron as the wrapper model holds it. */
export interface VisionTower {
  readonly globals: (c: ModelConfig) => readonly GlobalParam[];
  readonly block: (c: ModelConfig) => Block;
}

export interface HybridSpec {
  readonly id: string;
  readonly architectures: readonly string[];
  readonly modelType: string;
  readonly description: string;
  /** Qwen3.5: separate flat in_proj_qkv / _z / _b / _a (else Qwen3-Next's grouped qkvz / ba). */
  readonly separateInProj: boolean;
  /** MoE MLPs (else dense MLPs in every layer). */
  readonly moe: boolean;
  /** The HF prefix of the text model: `model.` (causal LM) or `model.language_model.` (VL wrapper). */
  readonly hfModel?: string;
  /** A vision-language wrapper (`*ForConditionalGeneration`): text under `text_config`, its vision tower, Megatron names under `language_model.`. */
  readonly vision?: VisionTower;
}


/** MTP layers the config records (`mtp_num_hidden_layers`, or DeepSeek-style `num_nextn_predict_layers`); undefined when it says nothing. */
function configMtpLayers(t: Record<string, unknown>, file: string): number | undefined {
  const v = t.mtp_num_hidden_layers ?? t.num_nextn_predict_layers;
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw badInput(`${file}: mtp_num_hidden_layers is ${JSON.stringify(v)}, expected a whole number`, file);
  return v;
}

/** A Qwen3-Next-style hybrid GDN / gated-attention family. */
export function hybridFamily(spec: HybridSpec): Family {
  const prefixOf = (c: ModelConfig): string => c.hfLayout?.textPrefix ?? spec.hfModel ?? 'model.';
  return {
    id: spec.id,
    architectures: spec.architectures,
    modelType: spec.modelType,
    description: spec.description,
    // megatron-core keys the experimental-attention hybrid stack per layer (non-homogeneous).
    keying: () => 'per-layer',
    fromHfNames(c, names): ModelConfig {
      const layout: { experts?: ExpertLayout; mtpExperts?: ExpertLayout; textPrefix?: string } = { ...c.hfLayout };
      // A Qwen3.5 causal LM loaded from a VL checkpoint is re-saved by transformers with the wrapper's prefix.
      if (!spec.vision && names.some((n) => n.startsWith('model.language_model.'))) layout.textPrefix = 'model.language_model.';
      if (names.some((n) => /\.layers\.\d+\.mlp\.experts\.gate_up_proj$/.test(n) && !n.startsWith('mtp.'))) layout.experts = 'fused';
      if (names.some((n) => /^mtp\.layers\.\d+\.mlp\.experts\.gate_up_proj$/.test(n))) layout.mtpExperts = 'fused';
      let mtpLayers = c.mtpLayers;
      if (mtpLayers === undefined) {
        // The config may not record MTP (Qwen3-Next's has no field): the checkpoint's mtp.layers.<k> tell.
        const ks = names.map((n) => /^mtp\.layers\.(\d+)\./.exec(n)?.[1]).filter((k): k is string => k !== undefined).map(Number);
        if (ks.length) mtpLayers = Math.max(...ks) + 1;
        if (mtpLayers !== undefined && mtpLayers > 1) throw unsupported(`${mtpLayers} MTP layers (mtp.layers.0 … ${mtpLayers - 1}); the Qwen hub layout has one`);
      }
      return { ...c, ...(mtpLayers !== undefined ? { mtpLayers } : {}), ...(Object.keys(layout).length ? { hfLayout: layout } : {}) };
    },
    fromHf(whole, file): ModelConfig {
      const cfg = textConfig(whole);
      if (spec.vision && cfg === whole) throw badInput(`${file}: a ${spec.architectures[0]} config needs its text_config`, file);
      const tie = whole.tie_word_embeddings ?? cfg.tie_word_embeddings;
      // An all-MoE stack has no dense MLP and its config no intermediate_size (Qwen3.5-35B-A3B): Megatron's ffn_hidden_size is the experts'.
      const ffn = cfg.intermediate_size ?? (spec.moe ? cfg.moe_intermediate_size : undefined);
      const base = { ...fromHfConfig(spec.id, { ...cfg, tie_word_embeddings: tie, intermediate_size: ffn }, file, { qkvBias: false, qkNorm: true }), hf: whole };
      layerTypes(cfg, base.numLayers, file);
      const nk = num(cfg, 'linear_num_key_heads', file, 16);
      const nv = num(cfg, 'linear_num_value_heads', file, 32);
      if (nv % nk !== 0) throw badInput(`${file}: linear_num_value_heads (${nv}) is not a multiple of linear_num_key_heads (${nk})`, file);
      const mtp = configMtpLayers(cfg, file);
      if (mtp !== undefined && mtp > 1) throw unsupported(`${file}: ${mtp} MTP layers; the Qwen hub layout has one (mtp.fc, mtp.norm, mtp.layers.0)`, file);
      const withMtp = mtp === undefined ? base : { ...base, mtpLayers: mtp };
      if (!spec.moe) return withMtp;
      const numExperts = num(cfg, cfg.num_experts === undefined ? 'num_local_experts' : 'num_experts', file);
      const topK = num(cfg, 'num_experts_per_tok', file, 10);
      if (topK > numExperts) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds the ${numExperts} experts`, file);
      const step = num(cfg, 'decoder_sparse_step', file, 1);
      const only = Array.isArray(cfg.mlp_only_layers) ? (cfg.mlp_only_layers as unknown[]).map(Number) : [];
      const moeLayers = Array.from({ length: base.numLayers }, (_, i) => !only.includes(i) && (i + 1) % step === 0);
      const shared = cfg.shared_expert_intermediate_size;
      return {
        ...withMtp,
        moe: {
          numExperts,
          topK,
          ffnHiddenSize: num(cfg, 'moe_intermediate_size', file),
          ...(typeof shared === 'number' && shared > 0 ? { sharedExpertFfn: shared, sharedExpertGate: true } : {}),
          ...(moeLayers.every((x) => x) ? {} : { moeLayers }),
        },
      };
    },
    globalParams: (c) => [
      ...denseGlobals(c, { embed: `${prefixOf(c)}embed_tokens.weight`, norm: `${prefixOf(c)}norm.weight`, head: 'lm_head.weight' }),
      ...(spec.vision?.globals(c) ?? []),
    ],
    layerParams: (c, i) => hybridLayerParams(c, spec, `${prefixOf(c)}layers.{i}`, types(c)[i]!, isMoeLayer(c, i), c.hfLayout?.experts ?? 'per-expert'),
    extraStateModules: (c, i) => hybridExtraState(c, types(c)[i]!, isMoeLayer(c, i)),
    blocks: (c) => [...(c.mtpLayers ? [mtpBlock(c, spec)] : []), ...(spec.vision ? [spec.vision.block(c)] : [])],
    ...(spec.vision ? { megatronPrefix: () => ({ prefix: 'language_model.', except: ['vision_model.'] }) } : {}),
    splitKeys: (c, i) => {
      if (types(c)[i] !== 'linear_attention') return [];
      const g = gdn(c);
      const qk = g.nk * g.dk;
      const vd = g.nv * g.dv;
      return [
        { param: 'self_attention.in_proj.weight', parts: parts([['query', qk], ['key', qk], ['value', vd], ['z', vd], ['beta', g.nv], ['alpha', g.nv]]) },
        { param: 'self_attention.conv1d.weight', parts: parts([['query', qk], ['key', qk], ['value', vd]]) },
      ];
    },
    megatronArgs: (c) => {
      const g = gdn(c);
      return {
        ...(c.moe
          ? {
              ...moeArgs(c),
              moe_router_pre_softmax: false,
              moe_router_load_balancing_type: 'global_aux_loss',
              ...(c.moe.moeLayers ? { moe_layer_freq: c.moe.moeLayers.map((x) => (x ? 1 : 0)) } : {}),
            }
          : {}),
        experimental_attention_variant: 'gated_delta_net',
        linear_attention_freq: types(c).map((t) => (t === 'linear_attention' ? 1 : 0)),
        linear_conv_kernel_dim: g.kernel,
        linear_key_head_dim: g.dk,
        linear_value_head_dim: g.dv,
        linear_num_key_heads: g.nk,
        linear_num_value_heads: g.nv,
        attention_output_gate: true,
        layernorm_zero_centered_gamma: true,
        rotary_percent: new PyFloat(partialRotaryFactor(hfOf(c))),
        ...(c.mtpLayers ? { mtp_num_layers: c.mtpLayers } : {}),
      };
    },
  };
}

export const qwen3Next: Family = hybridFamily({
  id: 'qwen3_next',
  architectures: ['Qwen3NextForCausalLM'],
  modelType: 'qwen3_next',
  description: 'Qwen3-Next (80B-A3B)',
  separateInProj: false,
  moe: true,
});

function parts(runs: ReadonlyArray<readonly [string, number]>): Array<{ suffix: string; rows: number }> {
  return runs.map(([suffix, rows]) => ({ suffix, rows }));
}
