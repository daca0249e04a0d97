/**
 * MiniMax-M2 / M2.5 / M2.7 (`MiniMaxM2ForCausalLM`) as Megatron-Bridge's MiniMax-M2 bridge
 * (`models/minimax_m2/minimax_m2_bridge.py`, `minimax_m2_provider.py`) maps it onto megatron-core's
 * GPTModel:
 *
 * - GQA attention (`linear_qkv` per query group) with **full-width** q/k RMSNorms (`q_norm`
 *   [heads × head_dim], `k_norm` [kv heads × head_dim], normalising the whole projection before
 *   the split into heads) → `q_layernorm` / `k_layernorm` of its `FullDimQNorm` / `FullDimKNorm`,
 *   which tensor parallelism splits with the heads: each rank holds its heads' rows and all-reduces
 *   the sum of squares. torch_dist keeps them whole; legacy rank files split them
 *   (`Family.tpShardedNorms`); the weights are carried as they are (heads in order on both sides);
 * - partial RoPE: `rotary_dim` (or transformers 5's `partial_rotary_factor`) → `rotary_percent`;
 * - every layer a sigmoid-routed MoE block under the hub's `block_sparse_moe.` names: `gate` →
 *   `mlp.router`, `e_score_correction_bias` → `mlp.router.expert_bias` (float32 in megatron-core),
 *   experts `w1` (gate) / `w3` (up) / `w2` (down) → `linear_fc1` = [w1; w3], `linear_fc2`; no shared
 *   expert;
 * - the hub's FP8 weights (e4m3 + `weight_scale_inv` over 128×128 blocks) are read as bf16 exactly
 *   as DeepSeek-V3's (`formats/fp8-block.ts`), `--quantize fp8` writes them back.
 *
 * Multi-token prediction: the configs record MTP modules (`use_mtp`, `num_mtp_modules`), which
 * neither transformers nor Megatron-Bridge maps ("MTP modules are not mapped"); a checkpoint that
 * holds MTP tensors is refused by name unless `--drop-mtp` leaves them out.
 */
import { badInput, unsupported } from '../util/errors.js';
import { PyFloat } from '../pickle/values.js';
import { fromHfConfig, moeOf, num, partialRotaryFactor, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, fullWidthQkNorms, linearExtraState, moeArgs, moeParams } from './dense.js';
import type { Family } from './spec.js';

const L = 'model.layers.{i}';
const B = `${L}.block_sparse_moe`;
/** Tensors of MTP modules, whatever their prefix (`mtp.*`, `model.mtp.*`, `model.mtp_layers.*`): no map has them. */
const MTP_NAMES = /(^|\.)mtp(_[a-z]+)?\./;

/** rotary_percent: `rotary_dim / head_dim` (hub configs), or transformers 5's `rope_parameters.partial_rotary_factor`. */
function rotaryPercent(h: Readonly<Record<string, unknown>>, headDim: number): number {
  return typeof h.rotary_dim === 'number' ? h.rotary_dim / headDim : partialRotaryFactor(h);
}


export const minimaxM2: Family = {
  id: 'minimax_m2',
  architectures: ['MiniMaxM2ForCausalLM'],
  modelType: 'minimax_m2',
  description: 'MiniMax-M2, M2.5, M2.7 (full-width q/k norms split over TP, sigmoid-routed MoE; FP8 block-scaled weights read as bf16)',
  megatronClaim: (r) => (r.moe && r.target.includes('minimax') ? 'provider' : undefined),
  // The hub's FP8 layout: every linear of attention and experts (quantization_config
  // modules_to_not_convert: gate, e_score_correction_bias, lm_head).
  hubQuantized: {
    method: 'fp8',
    tensors: /\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|block_sparse_moe\.experts\.\d+\.(w1|w2|w3))\.weight$/,
    quantizationConfig: { quant_method: 'fp8', fmt: 'float8_e4m3fn', activation_scheme: 'dynamic', weight_block_size: [128, 128], modules_to_not_convert: ['gate', 'e_score_correction_bias', 'lm_head'] },
  },
  keying: () => 'stacked',
  tpShardedNorms: ['self_attention.q_layernorm.weight', 'self_attention.k_layernorm.weight'],
  fromHf(cfg, file): ModelConfig {
    const base = fromHfConfig('minimax_m2', cfg, file, { qkvBias: false, qkNorm: true });
    if (cfg.use_qk_norm === false) throw unsupported(`${file}: use_qk_norm=false; the MiniMax-M2 map carries its full-width q/k norms (Megatron-Bridge's FullDimQNorm / FullDimKNorm)`, file);
    if (cfg.qk_norm_type !== undefined && cfg.qk_norm_type !== 'per_layer') throw unsupported(`${file}: qk_norm_type ${JSON.stringify(cfg.qk_norm_type)}; only MiniMax-M2's per_layer (full-width) q/k norms are mapped`, file);
    if (cfg.scoring_func !== undefined && cfg.scoring_func !== 'sigmoid') throw unsupported(`${file}: scoring_func ${JSON.stringify(cfg.scoring_func)}; MiniMax-M2's router (and Megatron-Bridge's mapping of it) scores with a sigmoid`, file);
    if (cfg.use_routing_bias === false) throw unsupported(`${file}: use_routing_bias=false; the MiniMax-M2 map carries e_score_correction_bias as megatron-core's expert bias`, file);
    if (typeof cfg.shared_intermediate_size === 'number' && cfg.shared_intermediate_size > 0) throw unsupported(`${file}: shared_intermediate_size ${cfg.shared_intermediate_size}: MiniMax-M2 checkpoints have no shared expert, and none is mapped`, file);
    // attn_type_list: 1 = softmax attention in every published MiniMax-M2 layer (0 would be MiniMax-01's lightning attention).
    if (Array.isArray(cfg.attn_type_list) && cfg.attn_type_list.some((x) => x !== 1)) throw unsupported(`${file}: attn_type_list holds non-softmax (lightning) attention layers; only MiniMax-M2's full softmax attention is mapped`, file);
    const E = num(cfg, 'num_local_experts', file);
    const topK = num(cfg, 'num_experts_per_tok', file);
    if (topK > E) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds num_local_experts (${E})`, file);
    const pct = rotaryPercent(cfg, base.kvChannels);
    if (!(pct > 0 && pct <= 1) || !Number.isInteger(pct * base.kvChannels) || (pct * base.kvChannels) % 2 !== 0) {
      throw badInput(`${file}: rotary_dim ${String(cfg.rotary_dim ?? pct * base.kvChannels)} is not an even number of dims of the ${base.kvChannels}-dim heads`, file);
    }
    // Each expert is intermediate_size wide (MiniMax-M2 has no dense MLP).
    return { ...base, moe: { numExperts: E, topK, ffnHiddenSize: base.ffnHiddenSize, routerBias: true } };
  },
  fromHfNames(c, names, opts): ModelConfig {
    const mtp = names.filter((n) => MTP_NAMES.test(n));
    if (mtp.length && !opts?.dropMtp) {
      throw unsupported(
        `the checkpoint holds ${mtp.length} multi-token-prediction tensor(s) (${mtp.slice(0, 3).join(', ')}${mtp.length > 3 ? ', …' : ''}); MiniMax-M2's MTP modules have no Megatron mapping (Megatron-Bridge does not map them either) — --drop-mtp converts the model without them`,
        undefined,
        mtp[0],
      );
    }
    return c;
  },
  mtpHfNames: () => MTP_NAMES,
  globalParams: (c) => denseGlobals(c),
  layerParams: (c) => [
    // attentionParams without its per-head norms: MiniMax-M2's span the projection.
    ...attentionParams({ ...c, qkNorm: false }),
    ...fullWidthQkNorms(c),
    ...moeParams(c, {
      norm: `${L}.post_attention_layernorm.weight`,
      router: `${B}.gate.weight`,
      routerBias: `${B}.e_score_correction_bias`,
      // The hub and the inference engines hold it in float32 (vLLM and SGLang allocate it so).
      routerBiasFp32: true,
      gate: `${B}.experts.{e}.w1.weight`,
      up: `${B}.experts.{e}.w3.weight`,
      down: `${B}.experts.{e}.w2.weight`,
    }),
  ],
  extraStateModules: (c, i) => linearExtraState(c, i),
  hfConfig: (c, field) => {
    const pct = field('rotary_percent');
    const p = typeof pct === 'number' ? pct : pct instanceof PyFloat ? pct.value : 1;
    const m = moeOf(c);
    return {
      num_local_experts: m.numExperts,
      num_experts_per_tok: m.topK,
      intermediate_size: m.ffnHiddenSize,
      rotary_dim: Math.round(p * c.kvChannels),
      use_qk_norm: true,
      qk_norm_type: 'per_layer',
      use_routing_bias: true,
      scoring_func: 'sigmoid',
    };
  },
  megatronArgs: (c) => ({
    ...moeArgs(c),
    rotary_percent: new PyFloat(rotaryPercent(c.hf ?? {}, c.kvChannels)),
    moe_router_score_function: 'sigmoid',
    moe_router_enable_expert_bias: true,
    moe_router_pre_softmax: false,
    moe_router_load_balancing_type: 'aux_loss',
  }),
};
