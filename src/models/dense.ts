/**
 * The parameter tables shared by the Llama-style families, as Megatron-Bridge's bridges define
 * them (one builder per block, so families compose them):
 *
 * - `linear_qkv` rows grouped per query group: for g in 0..ng−1, the r = np/ng query heads of
 *   group g, then key head g, then value head g (each `kv_channels` rows); its bias likewise;
 * - gated `linear_fc1` = [gate_proj; up_proj] (per expert in MoE layers);
 * - word embeddings / output layer padded to `make_vocab_size_divisible_by × tp` rows on import
 *   and cut back to the HF vocab on export; no `output_layer` when embeddings are tied;
 * - dense layers fuse the pre-MLP norm into `linear_fc1` (TE); MoE layers keep `pre_mlp_layernorm`.
 */
import type { PyValue } from '../pickle/values.js';
import { fromHfConfig, isMoeLayer, type ModelConfig } from './config.js';
import type { Family, GlobalParam, LayerParam, PrecisionRule } from './spec.js';
import { TRANSPOSE } from './transposed.js';

const L = 'model.layers.{i}';

export function attentionParams(c: ModelConfig, hfPrefix = `${L}.self_attn`, normName = `${L}.input_layernorm.weight`): LayerParam[] {
  const H = c.hiddenSize;
  const q = c.numAttentionHeads * c.kvChannels;
  const kv = c.numQueryGroups * c.kvChannels;
  const qkvRows = q + 2 * kv;
  const p: LayerParam[] = [
    { megatron: 'self_attention.linear_qkv.layer_norm_weight', hf: [normName], kind: 'copy', hfShapes: [[H]], shape: [H], aliases: ['input_layernorm.weight'] },
    { megatron: 'self_attention.linear_qkv.weight', hf: ['q', 'k', 'v'].map((x) => `${hfPrefix}.${x}_proj.weight`), kind: 'qkv', hfShapes: [[q, H], [kv, H], [kv, H]], shape: [qkvRows, H] },
  ];
  if (c.qkvBias) p.push({ megatron: 'self_attention.linear_qkv.bias', hf: ['q', 'k', 'v'].map((x) => `${hfPrefix}.${x}_proj.bias`), kind: 'qkv', hfShapes: [[q], [kv], [kv]], shape: [qkvRows] });
  if (c.qkNorm) {
    p.push({ megatron: 'self_attention.q_layernorm.weight', hf: [`${hfPrefix}.q_norm.weight`], kind: 'copy', hfShapes: [[c.kvChannels]], shape: [c.kvChannels] });
    p.push({ megatron: 'self_attention.k_layernorm.weight', hf: [`${hfPrefix}.k_norm.weight`], kind: 'copy', hfShapes: [[c.kvChannels]], shape: [c.kvChannels] });
  }
  p.push({ megatron: 'self_attention.linear_proj.weight', hf: [`${hfPrefix}.o_proj.weight`], kind: 'copy', hfShapes: [[H, q]], shape: [H, q] });
  return p;
}

/**
 * q/k RMSNorms over the whole projection (one weight over all heads, in head order: OLMoE,
 * MiniMax-M2) under megatron-core's `q_layernorm` / `k_layernorm` names.
 */
export function fullWidthQkNorms(c: ModelConfig, hfPrefix = `${L}.self_attn`): LayerParam[] {
  const q = c.numAttentionHeads * c.kvChannels;
  const k = c.numQueryGroups * c.kvChannels;
  return [
    { megatron: 'self_attention.q_layernorm.weight', hf: [`${hfPrefix}.q_norm.weight`], kind: 'copy', hfShapes: [[q]], shape: [q] },
    { megatron: 'self_attention.k_layernorm.weight', hf: [`${hfPrefix}.k_norm.weight`], kind: 'copy', hfShapes: [[k]], shape: [k] },
  ];
}

export function denseMlpParams(c: ModelConfig, hfPrefix = `${L}.mlp`, normName = `${L}.post_attention_layernorm.weight`): LayerParam[] {
  const H = c.hiddenSize;
  const F = c.ffnHiddenSize;
  return [
    { megatron: 'mlp.linear_fc1.layer_norm_weight', hf: [normName], kind: 'copy', hfShapes: [[H]], shape: [H], aliases: ['pre_mlp_layernorm.weight'] },
    { megatron: 'mlp.linear_fc1.weight', hf: [`${hfPrefix}.gate_proj.weight`, `${hfPrefix}.up_proj.weight`], kind: 'gated', hfShapes: [[F, H], [F, H]], shape: [2 * F, H] },
    { megatron: 'mlp.linear_fc2.weight', hf: [`${hfPrefix}.down_proj.weight`], kind: 'copy', hfShapes: [[H, F]], shape: [H, F] },
  ];
}

/**
 * Router weights keep a float32 source's precision on both sides (a bf16 router changes top-k
 * routing), and are always float32 on the HF side where transformers keeps them so.
 */
export function routerPrecision(n: { routerFp32?: boolean }): PrecisionRule {
  return {
    hf: n.routerFp32 ? 'fp32' : 'keep-fp32',
    megatron: 'keep-fp32',
    why: n.routerFp32 ? 'router weight: transformers keeps it in float32 (_keep_in_fp32_modules_strict), Megatron keeps the float32 source' : 'router weight: a float32 source keeps its precision',
  };
}

/**
 * The router's score-correction bias (`e_score_correction_bias` → `router.expert_bias`):
 * megatron-core stores it as a float32 buffer (re-cast to float32 before every save, "to avoid
 * routing errors"); cast to bf16, distinct biases collapse and top-k routing changes.
 */
export function expertBiasPrecision(n: { routerFp32?: boolean; routerBiasFp32?: boolean }): PrecisionRule {
  const hf32 = n.routerFp32 === true || n.routerBiasFp32 === true;
  return {
    hf: hf32 ? 'fp32' : 'keep-fp32',
    megatron: 'fp32',
    why:
      'router expert bias: megatron-core stores router.expert_bias in float32' +
      (n.routerFp32 ? ', transformers keeps e_score_correction_bias in float32' : n.routerBiasFp32 ? ', and the hub checkpoint holds e_score_correction_bias in float32' : ''),
  };
}

/** HF names of an MoE block's pieces (`{e}` = expert index). */
export interface MoeNames {
  readonly norm: string;
  readonly router: string;
  /** The experts' gate projection; without one the experts are not gated (`linear_fc1` = up_proj, e.g. squared ReLU). */
  readonly gate?: string;
  readonly up: string;
  readonly down: string;
  readonly routerBias?: string;
  /** transformers keeps the router (weight and score-correction bias) in float32 (`_keep_in_fp32_modules_strict`). */
  readonly routerFp32?: boolean;
  /** The score-correction bias alone is float32 on the HF side (the hub stores it so; the router weight follows the source). */
  readonly routerBiasFp32?: boolean;
  /**
   * The experts fused per layer (transformers 5's in-memory layout, saved so by models loaded from
   * fused checkpoints): `gateUp` [E, 2F, H] = [gate; up] per expert, `down` [E, H, F]. Used in
   * place of the per-expert names when given.
   */
  readonly fused?: { readonly gateUp: string; readonly down: string };
  /** Shared expert: gate (absent: not gated)/up/down and its output gate. */
  readonly shared?: { readonly gate?: string; readonly up: string; readonly down: string; readonly outputGate?: string };
}

/**
 * Experts fused per layer input-major, as Qwen3-VL-MoE's and Llama 4's checkpoints store them
 * (`<M>.experts.gate_up_proj` [E, H, 2F] with columns [gate | up], `<M>.experts.down_proj` [E, F, H]):
 * each expert's `linear_fc1` = [gate; up] and `linear_fc2` are the transposes.
 */
export function inputMajorFusedExperts(c: ModelConfig, M: string): LayerParam[] {
  const H = c.hiddenSize;
  const F = c.moe!.ffnHiddenSize;
  const E = c.moe!.numExperts;
  return [
    { megatron: 'mlp.experts.local_experts.{e}.linear_fc1.weight', hf: [`${M}.experts.gate_up_proj`], kind: TRANSPOSE, hfShapes: [[H, 2 * F]], shape: [2 * F, H], experts: E, gateUp: true },
    { megatron: 'mlp.experts.local_experts.{e}.linear_fc2.weight', hf: [`${M}.experts.down_proj`], kind: TRANSPOSE, hfShapes: [[F, H]], shape: [H, F], experts: E },
  ];
}

/** `linear_fc1` of F rows: [gate; up] (2F rows) when there is a gate name, else up_proj as is. */
function fc1Param(megatron: string, gate: string | undefined, up: string, F: number, H: number, experts?: number): LayerParam {
  const p: LayerParam = gate
    ? { megatron, hf: [gate, up], kind: 'gated', hfShapes: [[F, H], [F, H]], shape: [2 * F, H] }
    : { megatron, hf: [up], kind: 'copy', hfShapes: [[F, H]], shape: [F, H] };
  return experts === undefined ? p : { ...p, experts };
}

/**
 * An MoE block in Megatron-Core: `pre_mlp_layernorm`, `mlp.router.weight` [E, H] (and
 * `router.expert_bias`), per expert `mlp.experts.local_experts.<e>.linear_fc1` = [gate; up] and
 * `linear_fc2`, shared experts `mlp.shared_experts.linear_fc1/fc2` (+ `gate_weight`).
 */
export function moeParams(c: ModelConfig, n: MoeNames): LayerParam[] {
  const m = c.moe!;
  const H = c.hiddenSize;
  const F = m.ffnHiddenSize;
  const E = m.numExperts;
  const p: LayerParam[] = [
    { megatron: 'pre_mlp_layernorm.weight', hf: [n.norm], kind: 'copy', hfShapes: [[H]], shape: [H], aliases: ['mlp.linear_fc1.layer_norm_weight'] },
    { megatron: 'mlp.router.weight', hf: [n.router], kind: 'copy', hfShapes: [[E, H]], shape: [E, H], precision: routerPrecision(n) },
  ];
  if (m.routerBias && n.routerBias) p.push({ megatron: 'mlp.router.expert_bias', hf: [n.routerBias], kind: 'copy', hfShapes: [[E]], shape: [E], precision: expertBiasPrecision(n) });
  if (n.fused) {
    // One HF tensor stacked over experts per projection (no `{e}` in the name): expert e at index e.
    const gated = n.gate !== undefined;
    p.push(
      { megatron: 'mlp.experts.local_experts.{e}.linear_fc1.weight', hf: [n.fused.gateUp], kind: 'copy', hfShapes: [[gated ? 2 * F : F, H]], shape: [gated ? 2 * F : F, H], experts: E, ...(gated ? { gateUp: true as const } : {}) },
      { megatron: 'mlp.experts.local_experts.{e}.linear_fc2.weight', hf: [n.fused.down], kind: 'copy', hfShapes: [[H, F]], shape: [H, F], experts: E },
    );
  } else {
    p.push(
      fc1Param('mlp.experts.local_experts.{e}.linear_fc1.weight', n.gate, n.up, F, H, E),
      { megatron: 'mlp.experts.local_experts.{e}.linear_fc2.weight', hf: [n.down], kind: 'copy', hfShapes: [[H, F]], shape: [H, F], experts: E },
    );
  }
  if (m.sharedExpertFfn && n.shared) {
    const S = m.sharedExpertFfn;
    p.push(
      fc1Param('mlp.shared_experts.linear_fc1.weight', n.shared.gate, n.shared.up, S, H),
      { megatron: 'mlp.shared_experts.linear_fc2.weight', hf: [n.shared.down], kind: 'copy', hfShapes: [[H, S]], shape: [H, S] },
    );
    if (m.sharedExpertGate && n.shared.outputGate) p.push({ megatron: 'mlp.shared_experts.gate_weight', hf: [n.shared.outputGate], kind: 'copy', hfShapes: [[1, H]], shape: [1, H] });
  }
  return p;
}

export function denseGlobals(c: ModelConfig, names = { embed: 'model.embed_tokens.weight', norm: 'model.norm.weight', head: 'lm_head.weight' }): GlobalParam[] {
  const g: GlobalParam[] = [
    { megatron: 'embedding.word_embeddings.weight', hf: names.embed, kind: 'vocab', shape: [c.vocabSize, c.hiddenSize] },
    { megatron: 'decoder.final_layernorm.weight', hf: names.norm, kind: 'copy', shape: [c.hiddenSize] },
  ];
  if (!c.tieEmbeddings) g.push({ megatron: 'output_layer.weight', hf: names.head, kind: 'vocab', shape: [c.vocabSize, c.hiddenSize] });
  return g;
}

/**
 * Layer modules whose `_extra_state` megatron-core expects in a torch_dist checkpoint (its
 * linears; strict loading fails without them). Without FP8 they hold no state.
 */
export const DENSE_EXTRA_STATE_MODULES: readonly string[] = ['self_attention.linear_qkv', 'self_attention.linear_proj', 'mlp.linear_fc1', 'mlp.linear_fc2'];

/** The linears of layer i (dense or MoE) that carry `_extra_state`. */
export function linearExtraState(c: ModelConfig, i: number): string[] {
  if (!isMoeLayer(c, i)) return [...DENSE_EXTRA_STATE_MODULES];
  return ['self_attention.linear_qkv', 'self_attention.linear_proj', ...moeExtraState(c)];
}

/** The linears of an MoE block that carry `_extra_state`: every routed expert's, then the shared experts'. */
export function moeExtraState(c: ModelConfig): string[] {
  const out: string[] = [];
  for (let e = 0; e < c.moe!.numExperts; e++) out.push(`mlp.experts.local_experts.${e}.linear_fc1`, `mlp.experts.local_experts.${e}.linear_fc2`);
  if (c.moe!.sharedExpertFfn) out.push('mlp.shared_experts.linear_fc1', 'mlp.shared_experts.linear_fc2');
  return out;
}

/** HF tensors a converter may meet and drop by a named rule. */
export const HF_IGNORED: ReadonlyArray<{ pattern: RegExp; reason: string; carriesData: false }> = [
  { pattern: /\.rotary_emb\.inv_freq$/, reason: 'rotary inverse frequencies are recomputed from the config', carriesData: false },
];

/** Megatron entries that are not model weights, skipped by a named rule. */
export const MEGATRON_IGNORED: ReadonlyArray<{ pattern: RegExp; reason: string; carriesData: false }> = [
  { pattern: /^optimizer\.|^chained_\d+\.optimizer\./, reason: 'optimizer state', carriesData: false },
  { pattern: /^rng_state/, reason: 'RNG state', carriesData: false },
  { pattern: /^rerun_state_machine_state/, reason: 'rerun state machine', carriesData: false },
  { pattern: /^common_state/, reason: 'common (non-tensor) state', carriesData: false },
  { pattern: /_extra_state(\d*)(\/|$)/, reason: 'TransformerEngine extra state (FP8 metadata)', carriesData: false },
  { pattern: /\.mlp\.router\.local_tokens_per_expert$/, reason: 'router token counts (training statistics)', carriesData: false },
];

export interface DenseSpec {
  readonly id: string;
  readonly architectures: readonly string[];
  readonly modelType: string;
  readonly description: string;
  readonly qkvBias: boolean;
  readonly qkNorm: boolean;
  /** How a Megatron checkpoint without an HF config is recognised as this family (`Family.megatronClaim`). */
  readonly megatronClaim?: Family['megatronClaim'];
}

/** A Llama-style dense family from its few distinguishing facts. */
export function denseFamily(s: DenseSpec): Family & { readonly qkvBias: boolean; readonly qkNorm: boolean } {
  return {
    ...s,
    keying: () => 'stacked',
    fromHf: (cfg, file) => fromHfConfig(s.id, cfg, file, { qkvBias: s.qkvBias, qkNorm: s.qkNorm }),
    globalParams: (c) => denseGlobals(c),
    layerParams: (c) => [...attentionParams(c), ...denseMlpParams(c)],
    extraStateModules: () => DENSE_EXTRA_STATE_MODULES,
  };
}

/** MoE fields of the Megatron training args. */
export function moeArgs(c: ModelConfig): Record<string, PyValue> {
  const m = c.moe;
  if (!m) return {};
  return {
    num_experts: m.numExperts,
    moe_router_topk: m.topK,
    moe_ffn_hidden_size: m.ffnHiddenSize,
    ...(m.sharedExpertFfn ? { moe_shared_expert_intermediate_size: m.sharedExpertFfn, moe_shared_expert_gate: m.sharedExpertGate === true } : {}),
    moe_router_enable_expert_bias: m.routerBias === true,
  };
}
