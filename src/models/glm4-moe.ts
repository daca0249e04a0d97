/**
 * GLM-4.5 / 4.5-Air / 4.6 / 4.7 (`Glm4MoeForCausalLM`) as Megatron-Bridge's GLM-4.5 bridge
 * (`models/glm/glm45_bridge.py`) maps it onto megatron-core's GPTModel:
 *
 * - grouped-query attention with the Llama-style fused `linear_qkv` (and its bias: the published
 *   configs set `attention_bias`), per-head q/k RMSNorm when `use_qk_norm` (`q_layernorm` /
 *   `k_layernorm`), partial rotary embeddings (`partial_rotary_factor` → `rotary_percent`). Both
 *   sides rotate the first `rotary_percent × head_dim` dims of each head by halves (transformers'
 *   `rotate_half` on `q[..., :rotary_dim]`, megatron-core's non-interleaved `apply_rotary_pos_emb`),
 *   so q/k rows are carried as they are;
 * - a dense prefix (`first_k_dense_replace` layers, `intermediate_size`), then MoE layers:
 *   sigmoid router `mlp.gate.weight` with `e_score_correction_bias` → `mlp.router.expert_bias`
 *   (float32 in megatron-core whatever the requested dtype), routed experts by global index,
 *   `n_shared_experts` shared experts as one MLP; `post_attention_layernorm` is
 *   `pre_mlp_layernorm` in MoE layers and `mlp.linear_fc1.layer_norm_weight` in dense ones;
 *   megatron-core keys such a stack per layer (`moe_layer_freq` as a list);
 * - multi-token prediction in DeepSeek-V3's hub layout (`hub-mtp.ts`): layer
 *   `num_hidden_layers + k` ↔ `mtp.layers.<k>.*`.
 */
import { badInput, unsupported } from '../util/errors.js';
import { JsonFloat } from '../formats/config-json.js';
import { PyFloat, asNumber, type PyValue } from '../pickle/values.js';
import { fromHfConfig, isMoeLayer, moeOf, num, partialRotaryFactor, type ExpertLayout, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, denseMlpParams, linearExtraState, moeArgs, moeParams } from './dense.js';
import { hubMtpBlock, hubMtpLayerCount, hubMtpLayout, hubMtpNames, mtpLayersOf, withHubMtpCopies } from './hub-mtp.js';
import type { Family, LayerParam } from './spec.js';

const L = 'model.layers.{i}';


/** The layer at HF prefix P: GQA attention, then a dense MLP or the MoE block with its shared experts. */
function layerParams(c: ModelConfig, P: string, moe: boolean, experts: ExpertLayout): LayerParam[] {
  const attn = attentionParams(c, `${P}.self_attn`, `${P}.input_layernorm.weight`);
  if (!moe) return [...attn, ...denseMlpParams(c, `${P}.mlp`, `${P}.post_attention_layernorm.weight`)];
  const M = `${P}.mlp`;
  return [
    ...attn,
    ...moeParams(c, {
      norm: `${P}.post_attention_layernorm.weight`,
      router: `${M}.gate.weight`,
      routerBias: `${M}.gate.e_score_correction_bias`,
      // Not `routerFp32`: transformers upcasts both on load (_keep_in_fp32_modules_strict), but a
      // bf16 source stays bf16 and a float32 one float32 (lossless both ways); the bias is float32 in
      // Megatron whatever.
      gate: `${M}.experts.{e}.gate_proj.weight`,
      up: `${M}.experts.{e}.up_proj.weight`,
      down: `${M}.experts.{e}.down_proj.weight`,
      ...(experts === 'fused' ? { fused: { gateUp: `${M}.experts.gate_up_proj`, down: `${M}.experts.down_proj` } } : {}),
      shared: { gate: `${M}.shared_experts.gate_proj.weight`, up: `${M}.shared_experts.up_proj.weight`, down: `${M}.shared_experts.down_proj.weight` },
    }),
  ];
}

export const glm4Moe: Family = {
  id: 'glm4_moe',
  architectures: ['Glm4MoeForCausalLM'],
  modelType: 'glm4_moe',
  description: 'GLM-4.5, 4.5-Air, 4.6, 4.7 (sigmoid-routed MoE with shared expert, partial RoPE, MTP)',
  // Megatron-Bridge's GLM bridge configures a plain GPTModelProvider, so its run_config names no GLM
  // class: a GQA MoE with a sigmoid router's expert bias is GLM's shape (DeepSeek's MLA is refused before).
  // (A softmax router with an expert bias is not GLM's: only a recorded sigmoid one is taken for it.)
  megatronClaim: (r) => (!r.moe ? undefined : r.target.includes('glm') ? 'provider' : r.expertBias && r.scoreFunction === 'sigmoid' ? 'features' : undefined),
  keying: (c) => (c.moe?.moeLayers?.some((x) => !x) ? 'per-layer' : 'stacked'),
  fromHf(cfg, file): ModelConfig {
    const base = fromHfConfig('glm4_moe', cfg, file, { qkvBias: cfg.attention_bias === true, qkNorm: cfg.use_qk_norm === true });
    // transformers 5 maps n_routed_experts to num_local_experts (Glm4MoeConfig.attribute_map).
    const E = num(cfg, cfg.n_routed_experts === undefined ? 'num_local_experts' : 'n_routed_experts', file);
    const topK = num(cfg, 'num_experts_per_tok', file);
    if (topK > E) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds the ${E} routed experts`, file);
    const dense = cfg.first_k_dense_replace ?? 0;
    if (typeof dense !== 'number' || !Number.isInteger(dense) || dense < 0 || dense > base.numLayers) {
      throw badInput(`${file}: first_k_dense_replace is ${JSON.stringify(cfg.first_k_dense_replace)}, expected 0 … ${base.numLayers}`, file);
    }
    const nShared = cfg.n_shared_experts ?? 0;
    if (typeof nShared !== 'number' || !Number.isInteger(nShared) || nShared < 0) throw badInput(`${file}: n_shared_experts is ${JSON.stringify(cfg.n_shared_experts)}`, file);
    const groups = num(cfg, 'n_group', file, 1);
    if (E % groups !== 0) throw badInput(`${file}: n_group (${groups}) does not divide the ${E} routed experts`, file);
    if (num(cfg, 'topk_group', file, 1) > groups) throw badInput(`${file}: topk_group (${String(cfg.topk_group)}) exceeds n_group (${groups})`, file);
    // megatron-core's sigmoid router always renormalises the top-k scores (topk > 1): a model that
    // does not would convert into one that routes with different weights.
    if (cfg.norm_topk_prob === false && topK > 1) throw unsupported(`${file}: norm_topk_prob=false; megatron-core's sigmoid router always renormalises the top-${topK} scores, so the converted model would weigh its experts differently`, file);
    const rotary = partialRotaryFactor(cfg);
    if (!(rotary > 0 && rotary <= 1) || !Number.isInteger(rotary * base.kvChannels) || (rotary * base.kvChannels) % 2 !== 0) {
      throw badInput(`${file}: partial_rotary_factor ${rotary} does not give an even number of rotary dims of the ${base.kvChannels}-dim heads`, file);
    }
    const F = num(cfg, 'moe_intermediate_size', file);
    const moeLayers = Array.from({ length: base.numLayers }, (_, i) => i >= dense);
    const mtp = mtpLayersOf(cfg, file);
    return {
      ...base,
      moe: { numExperts: E, topK, ffnHiddenSize: F, ...(nShared > 0 ? { sharedExpertFfn: nShared * F } : {}), routerBias: true, ...(moeLayers.every((x) => x) ? {} : { moeLayers }) },
      ...(mtp > 0 ? { mtpLayers: mtp } : {}),
    };
  },
  fromHfNames(c, names, opts): ModelConfig {
    const layout = hubMtpLayout(c, names);
    return { ...c, mtpLayers: hubMtpLayerCount(c, names, opts?.dropMtp), ...(Object.keys(layout).length ? { hfLayout: layout } : {}) };
  },
  globalParams: (c) => withHubMtpCopies(c, denseGlobals(c)),
  layerParams: (c, i) => layerParams(c, L, isMoeLayer(c, i), c.hfLayout?.experts ?? 'per-expert'),
  extraStateModules: (c, i) => linearExtraState(c, i),
  blocks: (c) => {
    if (!c.mtpLayers) return [];
    // The MTP layer is an MoE layer like the decoder's last (megatron-core builds it from that spec).
    const last = c.numLayers - 1;
    return [hubMtpBlock(c, (P) => layerParams(c, P, isMoeLayer(c, last), c.hfLayout?.mtpExperts ?? 'per-expert'), linearExtraState(c, last))];
  },
  mtpHfNames: hubMtpNames,
  megatronArgs: (c): Record<string, PyValue> => {
    const hf = c.hf ?? {};
    return {
      ...moeArgs(c),
      rotary_percent: new PyFloat(partialRotaryFactor(hf)),
      ...(c.moe?.moeLayers ? { moe_layer_freq: c.moe.moeLayers.map((x) => (x ? 1 : 0)) } : {}),
      moe_router_score_function: 'sigmoid',
      moe_router_enable_expert_bias: true,
      moe_router_dtype: 'fp32',
      moe_router_pre_softmax: false,
      moe_router_load_balancing_type: 'seq_aux_loss',
      moe_router_topk_scaling_factor: new PyFloat(typeof hf.routed_scaling_factor === 'number' ? hf.routed_scaling_factor : 1),
      moe_router_num_groups: typeof hf.n_group === 'number' ? hf.n_group : 1,
      moe_router_group_topk: typeof hf.topk_group === 'number' ? hf.topk_group : 1,
      ...(c.mtpLayers ? { mtp_num_layers: c.mtpLayers } : {}),
    };
  },
  hfConfig: (c, field) => {
    const n = (k: string, d: number): number => {
      const v = field(k);
      return typeof v === 'number' ? v : (asNumber(v as PyValue) ?? d);
    };
    const m = moeOf(c);
    const dense = m.moeLayers?.filter((x) => !x).length ?? 0;
    if (m.moeLayers?.some((x, i) => x !== i >= dense)) {
      throw badInput(`moe_layer_freq ${JSON.stringify(m.moeLayers.map((x) => (x ? 1 : 0)))}: GLM-4.5's config.json can only say a dense prefix (first_k_dense_replace), not this pattern`);
    }
    return {
      n_routed_experts: m.numExperts,
      num_experts_per_tok: m.topK,
      moe_intermediate_size: m.ffnHiddenSize,
      n_shared_experts: m.sharedExpertFfn ? m.sharedExpertFfn / m.ffnHiddenSize : 0,
      first_k_dense_replace: dense,
      norm_topk_prob: true,
      n_group: n('moe_router_num_groups', 1),
      topk_group: n('moe_router_group_topk', 1),
      routed_scaling_factor: new JsonFloat(n('moe_router_topk_scaling_factor', 1)),
      attention_bias: c.qkvBias,
      use_qk_norm: c.qkNorm,
      partial_rotary_factor: new JsonFloat(n('rotary_percent', 1)),
      num_nextn_predict_layers: c.mtpLayers ?? 0,
    };
  },
};
