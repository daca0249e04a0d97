/**
 * GPT-OSS (openai/gpt-oss-20b, -120b), as Megatron-Bridge's GPT-OSS bridge maps it onto a
 * Megatron-Core GPTModel (`add_bias_linear`, `softmax_type='learnable'`, quick-GEGLU with
 * `activation_func_clamp_value` and `glu_linear_offset`, sliding-window layers):
 *
 * - attention: q/k/v weights and biases → `linear_qkv.weight`/`.bias` (the usual per-group
 *   interleave), `o_proj.weight`/`.bias` → `linear_proj.weight`/`.bias`, the per-head attention
 *   sinks `self_attn.sinks` [heads] → `self_attention.core_attention.softmax_offset`;
 * - router `mlp.router.weight` [E, H] / `.bias` [E] → `mlp.router.weight` / `mlp.router.bias`;
 * - experts, stored by transformers stacked and *input-major*: `mlp.experts.gate_up_proj`
 *   [E, H, 2F] with gate and up columns interleaved (gate = columns 0, 2, 4 …, up = 1, 3, 5 …),
 *   `gate_up_proj_bias` [E, 2F] likewise, `down_proj` [E, F, H], `down_proj_bias` [E, H].
 *   Expert e's `linear_fc1.weight` [2F, H] = [gate; up] = (gate_up_proj[e] de-interleaved)ᵀ, its
 *   `linear_fc1.bias` [2F] = [bias[e, 0::2]; bias[e, 1::2]], `linear_fc2.weight` [H, F] =
 *   down_proj[e]ᵀ, `linear_fc2.bias` = down_proj_bias[e].
 *
 * Hub checkpoints store the expert weights in MXFP4 (`*_blocks` / `*_scales`); reading them as
 * the bf16 tensors above is the source's business, not the map's. Exports are unquantised unless
 * `--quantize mxfp4` asks for the hub's layout back (`hubQuantized`).
 */
import { badInput, unsupported } from '../util/errors.js';
import type { TargetTensor } from '../lazy/types.js';
import type { Box } from '../tensor/layout.js';
import { byteLength, itemSize, numelOf } from '../tensor/dtype.js';
import { PyFloat, PyTuple } from '../pickle/values.js';
import { fromHfConfig, num, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, linearExtraState, moeArgs, routerPrecision } from './dense.js';
import type { CustomKind, Family, LayerParam, PrecisionRule, SourcePart } from './spec.js';
import { copyItem, partName, swapped, TRANSPOSE } from './transposed.js';
import { Mxfp4Tensor } from '../formats/mxfp4.js';

const L = 'model.layers.{i}';

/** A lazy 1-D target `out[r] = src[at(r)]` over the trailing 1-D sub-tensor of `part`. */
function permuted(name: string, part: SourcePart, len: number, at: (r: number) => number, describe: string): TargetTensor {
  const t = part.src;
  const k = itemSize(t.dtype);
  if (k === undefined) throw unsupported(`${t.name}: ${t.dtype} cannot be permuted element-wise`, undefined, t.name);
  return { kind: 'produced',
    name,
    dtype: t.dtype,
    shape: [len],
    byteLength: byteLength(t.dtype, len),
    describe,
    produce: async (box: Box, out: Uint8Array) => {
      const buf = new Uint8Array(len * k);
      await t.read({ start: [...part.prefix, 0], size: [...part.prefix.map(() => 1), len] }, buf);
      const a = box.start[0]!;
      for (let r = 0; r < box.size[0]!; r++) copyItem(buf, at(a + r), out, r, k);
    },
  };
}

/**
 * A Megatron expert matrix read straight from an MXFP4 source: `out[r, c] = packed[rowOf(r), c]`.
 * transformers' bf16 tensor is the transpose of the packed [R, 32G] rows and Megatron's is its
 * transpose again, so the rows are dequantised in place and nothing is transposed.
 */
function packedRows(name: string, src: Mxfp4Tensor, at: readonly number[], shape: readonly [number, number], rowOf: (r: number) => number, describe: string): TargetTensor {
  const packed = src.packedShape.slice(-2);
  if (packed[0] !== shape[0] || packed[1] !== shape[1]) throw badInput(`${src.name}: MXFP4 rows [${packed.join(', ')}] do not make ${name} [${shape.join(', ')}]`, undefined, src.name);
  return { kind: 'produced',
    name,
    dtype: 'BF16',
    shape,
    byteLength: byteLength('BF16', numelOf(shape)),
    describe,
    produce: async (box: Box, out: Uint8Array) => {
      const [a, b] = box.start as [number, number];
      const [n, m] = box.size as [number, number];
      if (n === 0 || m === 0) return;
      await src.readPackedRows(at, n, (i) => rowOf(a + i), b, m, out);
    },
  };
}

const at = partName;

/** Megatron row r of [gate; up] (2F rows) ← HF interleaved column: gate f at 2f, up f at 2f + 1. */
const interleavedCol = (F: number) => (r: number): number => (r < F ? 2 * r : 2 * (r - F) + 1);
/** HF interleaved column c ← Megatron row of [gate; up]. */
const fusedRow = (F: number) => (c: number): number => (c % 2 === 0 ? c / 2 : F + (c - 1) / 2);
const id = (x: number): number => x;

/** `gate_up_proj[e]` [H, 2F] (interleaved) ↔ `linear_fc1.weight` [2F, H] ([gate; up]). */
const GATE_UP: CustomKind = {
  id: 'gpt-oss-gate-up',
  toMegatron: (name, [p], shape) => {
    const F = shape[0]! / 2;
    if (p!.src instanceof Mxfp4Tensor) return packedRows(name, p!.src, p!.prefix, [shape[0]!, shape[1]!], interleavedCol(F), `de-interleave(rows of ${at(p!)})`);
    return swapped(name, p!, [shape[0]!, shape[1]!], id, interleavedCol(F), `de-interleave+transpose(${at(p!)})`);
  },
  toHf: ([name], src, [shape]) => {
    const F = shape![1]! / 2;
    return [swapped(name!, src, [shape![0]!, shape![1]!], fusedRow(F), id, `transpose+interleave(${at(src)})`)];
  },
};

/** `gate_up_proj_bias[e]` [2F] (interleaved) ↔ `linear_fc1.bias` [2F] ([gate; up]). */
const GATE_UP_BIAS: CustomKind = {
  id: 'gpt-oss-gate-up-bias',
  toMegatron: (name, [p], shape) => permuted(name, p!, shape[0]!, interleavedCol(shape[0]! / 2), `de-interleave(${at(p!)})`),
  toHf: ([name], src, [shape]) => [permuted(name!, src, shape![0]!, fusedRow(shape![0]! / 2), `interleave(${at(src)})`)],
};

/** `down_proj[e]` [F, H] ↔ `linear_fc2.weight` [H, F]. */
const TRANSPOSED: CustomKind = {
  id: 'gpt-oss-transpose',
  // An MXFP4 source's packed rows are already the transposed layout; a bf16 one is transposed.
  toMegatron: (name, [p], shape) => (p!.src instanceof Mxfp4Tensor ? packedRows(name, p!.src, p!.prefix, [shape[0]!, shape[1]!], id, `rows of ${at(p!)}`) : TRANSPOSE.toMegatron(name, [p!], shape)),
  toHf: TRANSPOSE.toHf,
};

const LAYER_TYPES = ['sliding_attention', 'full_attention'];

/** GptOssPreTrainedModel._keep_in_fp32_modules = ['post_attention_layernorm', 'input_layernorm', 'norm']: float32 under float16. */
const NORM_PRECISION: PrecisionRule = { hf: 'fp32-with-fp16', why: 'norm: transformers keeps GPT-OSS norms in float32 when loading float16 (_keep_in_fp32_modules)' };

/** Whether layer i uses the sliding window (HF `layer_types`; transformers' default alternates, sliding first). */
export function slidingLayers(c: ModelConfig): boolean[] {
  const lt = c.hf?.layer_types;
  return Array.from({ length: c.numLayers }, (_, i) => (Array.isArray(lt) ? lt[i] === 'sliding_attention' : i % 2 === 0));
}

function expertParams(c: ModelConfig): LayerParam[] {
  const m = c.moe!;
  const H = c.hiddenSize;
  const F = m.ffnHiddenSize;
  const E = m.numExperts;
  const X = `${L}.mlp.experts`;
  const ex = 'mlp.experts.local_experts.{e}';
  return [
    { megatron: 'pre_mlp_layernorm.weight', hf: [`${L}.post_attention_layernorm.weight`], kind: 'copy', hfShapes: [[H]], shape: [H], aliases: ['mlp.linear_fc1.layer_norm_weight'] },
    { megatron: 'mlp.router.weight', hf: [`${L}.mlp.router.weight`], kind: 'copy', hfShapes: [[E, H]], shape: [E, H], precision: routerPrecision({}) },
    { megatron: 'mlp.router.bias', hf: [`${L}.mlp.router.bias`], kind: 'copy', hfShapes: [[E]], shape: [E], precision: routerPrecision({}) },
    { megatron: `${ex}.linear_fc1.weight`, hf: [`${X}.gate_up_proj`], kind: GATE_UP, hfShapes: [[H, 2 * F]], shape: [2 * F, H], experts: E, gateUp: true },
    { megatron: `${ex}.linear_fc1.bias`, hf: [`${X}.gate_up_proj_bias`], kind: GATE_UP_BIAS, hfShapes: [[2 * F]], shape: [2 * F], experts: E, gateUp: true },
    { megatron: `${ex}.linear_fc2.weight`, hf: [`${X}.down_proj`], kind: TRANSPOSED, hfShapes: [[F, H]], shape: [H, F], experts: E },
    { megatron: `${ex}.linear_fc2.bias`, hf: [`${X}.down_proj_bias`], kind: 'copy', hfShapes: [[H]], shape: [H], experts: E },
  ];
}

export const gptOss: Family = {
  id: 'gpt_oss',
  architectures: ['GptOssForCausalLM'],
  modelType: 'gpt_oss',
  description: 'GPT-OSS (20b, 120b; MXFP4 experts read as bf16)',
  keying: () => 'stacked',
  // openai/gpt-oss-20b and -120b's config.json, as published.
  hubQuantized: {
    method: 'mxfp4',
    tensors: /\.mlp\.experts\.(gate_up_proj|down_proj)$/,
    quantizationConfig: { modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'], quant_method: 'mxfp4' },
  },
  fromHf(cfg, file): ModelConfig {
    if (cfg.attention_bias === false) throw unsupported(`${file}: attention_bias=false is not supported for GPT-OSS (Megatron's add_bias_linear covers attention and experts alike)`, file);
    // GptOssConfig defaults: untied embeddings, attention biases.
    const withDefaults = { tie_word_embeddings: false, attention_bias: true, ...cfg };
    const base = fromHfConfig('gpt_oss', withDefaults, file, { qkvBias: true, qkNorm: false });
    const numExperts = num(cfg, 'num_local_experts', file, 128);
    const topK = num(cfg, 'num_experts_per_tok', file, 4);
    if (topK > numExperts) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds num_local_experts (${numExperts})`, file);
    if (Array.isArray(cfg.layer_types)) {
      const lt = cfg.layer_types as unknown[];
      const bad = lt.findIndex((t) => typeof t !== 'string' || !LAYER_TYPES.includes(t));
      if (bad >= 0) throw badInput(`${file}: layer_types[${bad}] is ${JSON.stringify(lt[bad])}; GPT-OSS layers are ${LAYER_TYPES.join(' or ')}`, file);
      if (lt.length !== base.numLayers) throw badInput(`${file}: layer_types lists ${lt.length} layers but num_hidden_layers is ${base.numLayers}`, file);
    }
    return { ...base, moe: { numExperts, topK, ffnHiddenSize: base.ffnHiddenSize } };
  },
  globalParams: (c) => denseGlobals(c).map((g) => (g.hf === 'model.norm.weight' ? { ...g, precision: NORM_PRECISION } : g)),
  layerParams: (c) => {
    const H = c.hiddenSize;
    const params: LayerParam[] = [
      ...attentionParams(c),
      { megatron: 'self_attention.linear_proj.bias', hf: [`${L}.self_attn.o_proj.bias`], kind: 'copy', hfShapes: [[H]], shape: [H] },
      { megatron: 'self_attention.core_attention.softmax_offset', hf: [`${L}.self_attn.sinks`], kind: 'copy', hfShapes: [[c.numAttentionHeads]], shape: [c.numAttentionHeads] },
      ...expertParams(c),
    ];
    return params.map((p) => (/_layernorm\.weight$/.test(p.hf[0]!) ? { ...p, precision: NORM_PRECISION } : p));
  },
  extraStateModules: (c, i) => linearExtraState(c, i),
  megatronArgs: (c) => {
    const hf = c.hf ?? {};
    const window = typeof hf.sliding_window === 'number' ? hf.sliding_window : 128;
    return {
      ...moeArgs(c),
      add_bias_linear: true,
      moe_router_pre_softmax: false,
      moe_router_load_balancing_type: 'none',
      moe_grouped_gemm: true,
      quick_geglu: true,
      activation_func_clamp_value: new PyFloat(typeof hf.swiglu_limit === 'number' ? hf.swiglu_limit : 7.0),
      glu_linear_offset: new PyFloat(1.0),
      softmax_type: 'learnable',
      window_size: new PyTuple([window - 1, 0]),
      // megatron-core: a list marks the window-attention layers (1 = sliding).
      window_attn_skip_freq: slidingLayers(c).map((s) => (s ? 1 : 0)),
      position_embedding_type: 'yarn',
    };
  },
};
