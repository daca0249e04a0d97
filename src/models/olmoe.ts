/**
 * OLMoE (`OlmoeForCausalLM`: allenai/OLMoE-1B-7B-0924, -0125) as Megatron-Bridge's OLMoE bridge
 * (`models/olmoe/olmoe_bridge.py`) maps it onto megatron-core's GPTModel:
 *
 * - Llama-style attention whose q/k RMSNorms span the whole projection (`q_norm` [heads × head_dim],
 *   `k_norm` [kv_heads × head_dim]), not one head as Qwen3's do: they map to `q_layernorm` /
 *   `k_layernorm` of Megatron-Bridge's `OLMoESelfAttention` (`olmoe_provider.py`), which normalises
 *   the flattened query / key of all heads — in head order, as transformers' `q_proj` output is, so
 *   the weights are carried as they are. That module sizes both norms by the number of query
 *   heads, so OLMoE checkpoints with grouped KV heads are refused; and it normalises the whole
 *   width, which a tensor-parallel shard does not hold, so a model written at TP > 1 keeps the
 *   norms replicated as that module holds them but cannot run sharded (its limitation, said in
 *   the support matrix);
 * - every layer a softmax-routed MoE block without shared experts (`mlp.gate` → `mlp.router`,
 *   experts `gate_proj` / `up_proj` / `down_proj` → `linear_fc1` = [gate; up], `linear_fc2`);
 *   `norm_topk_prob=false` (the published configs) is megatron-core's `moe_router_pre_softmax`.
 */
import { unsupported, badInput } from '../util/errors.js';
import { fromHfConfig, moeOf, num, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, fullWidthQkNorms, linearExtraState, moeArgs, moeParams } from './dense.js';
import type { Family } from './spec.js';

const L = 'model.layers.{i}';


export const olmoe: Family = {
  id: 'olmoe',
  architectures: ['OlmoeForCausalLM'],
  modelType: 'olmoe',
  description: 'OLMoE (1B-7B; full-width q/k norms, softmax-routed MoE)',
  megatronClaim: (r) => (r.moe && r.target.includes('olmoe') ? 'provider' : undefined),
  keying: () => 'stacked',
  legacyTpRefusal: "Megatron-Bridge's OLMoE attention normalises q and k over all heads, which a tensor-parallel shard does not hold, so rank files split over TP could not run",
  fromHf(cfg, file): ModelConfig {
    const base = fromHfConfig('olmoe', cfg, file, { qkvBias: false, qkNorm: true });
    if (cfg.clip_qkv !== undefined && cfg.clip_qkv !== null) {
      throw unsupported(`${file}: clip_qkv=${JSON.stringify(cfg.clip_qkv)}; megatron-core's attention does not clamp q/k/v, so the converted model would compute differently`, file);
    }
    if (base.numQueryGroups !== base.numAttentionHeads) {
      throw unsupported(
        `${file}: num_key_value_heads (${base.numQueryGroups}) differs from num_attention_heads (${base.numAttentionHeads}); Megatron-Bridge's OLMoE attention sizes its full-width k norm by the query heads, so grouped KV heads have no Megatron layout`,
        file,
      );
    }
    const numExperts = num(cfg, 'num_experts', file);
    const topK = num(cfg, 'num_experts_per_tok', file);
    if (topK > numExperts) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds the ${numExperts} experts`, file);
    // Each expert is intermediate_size wide (OLMoE has no dense MLP and no moe_intermediate_size).
    return { ...base, moe: { numExperts, topK, ffnHiddenSize: base.ffnHiddenSize } };
  },
  globalParams: (c) => denseGlobals(c),
  layerParams: (c) => [
    // attentionParams without its per-head norms; OLMoE's span the projection.
    ...attentionParams({ ...c, qkNorm: false }),
    ...fullWidthQkNorms(c),
    ...moeParams(c, {
      norm: `${L}.post_attention_layernorm.weight`,
      router: `${L}.mlp.gate.weight`,
      gate: `${L}.mlp.experts.{e}.gate_proj.weight`,
      up: `${L}.mlp.experts.{e}.up_proj.weight`,
      down: `${L}.mlp.experts.{e}.down_proj.weight`,
    }),
  ],
  extraStateModules: (c, i) => linearExtraState(c, i),
  hfConfig: (c, field) => ({
    num_experts: moeOf(c).numExperts,
    num_experts_per_tok: moeOf(c).topK,
    intermediate_size: moeOf(c).ffnHiddenSize,
    norm_topk_prob: field('moe_router_pre_softmax') !== true,
    clip_qkv: null,
  }),
  megatronArgs: (c) => ({
    ...moeArgs(c),
    moe_router_score_function: 'softmax',
    moe_router_pre_softmax: c.hf?.norm_topk_prob !== true,
    moe_router_dtype: 'fp32',
    moe_router_load_balancing_type: 'seq_aux_loss',
  }),
};
