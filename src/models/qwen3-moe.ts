/**
 * Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3 attention (q/k RMSNorm), sparse MoE blocks (`mlp.gate`
 * router, experts `gate_proj`/`up_proj`/`down_proj`), no shared expert. Layers listed in
 * `mlp_only_layers` or off the `decoder_sparse_step` grid are dense MLPs (`intermediate_size`);
 * megatron-core then keys every layer separately (non-homogeneous stack).
 */
import { badInput } from '../util/errors.js';
import { fromHfConfig, isMoeLayer, num, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, denseMlpParams, linearExtraState, moeArgs, moeParams } from './dense.js';
import type { Family } from './spec.js';

const M = 'model.layers.{i}.mlp';

export const qwen3Moe: Family = {
  id: 'qwen3_moe',
  architectures: ['Qwen3MoeForCausalLM'],
  modelType: 'qwen3_moe',
  description: 'Qwen3-MoE (30B-A3B, 235B-A22B)',
  megatronClaim: (r) => (!r.moe ? undefined : r.target.includes('qwen') && !r.target.includes('mixtral') ? 'provider' : r.qkNorm && !r.expertBias ? 'features' : undefined),
  keying: (c) => (c.moe?.moeLayers?.some((x) => !x) ? 'per-layer' : 'stacked'),
  fromHf(cfg, file): ModelConfig {
    const base = fromHfConfig('qwen3_moe', cfg, file, { qkvBias: false, qkNorm: true });
    // Hub configs say num_experts; transformers 5 writes num_local_experts (its attribute map).
    const numExperts = num(cfg, cfg.num_experts === undefined ? 'num_local_experts' : 'num_experts', file);
    const topK = num(cfg, 'num_experts_per_tok', file, 8);
    if (topK > numExperts) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds the ${numExperts} experts`, file);
    const step = num(cfg, 'decoder_sparse_step', file, 1);
    const only = Array.isArray(cfg.mlp_only_layers) ? (cfg.mlp_only_layers as unknown[]).map(Number) : [];
    const moeLayers = Array.from({ length: base.numLayers }, (_, i) => !only.includes(i) && (i + 1) % step === 0);
    return {
      ...base,
      moe: { numExperts, topK, ffnHiddenSize: num(cfg, 'moe_intermediate_size', file), ...(moeLayers.every((x) => x) ? {} : { moeLayers }) },
    };
  },
  globalParams: (c) => denseGlobals(c),
  layerParams: (c, i) => [
    ...attentionParams(c),
    ...(isMoeLayer(c, i)
      ? moeParams(c, {
          norm: 'model.layers.{i}.post_attention_layernorm.weight',
          router: `${M}.gate.weight`,
          gate: `${M}.experts.{e}.gate_proj.weight`,
          up: `${M}.experts.{e}.up_proj.weight`,
          down: `${M}.experts.{e}.down_proj.weight`,
        })
      : denseMlpParams(c)),
  ],
  extraStateModules: (c, i) => linearExtraState(c, i),
  hfConfig: (c, field) => ({
    num_experts: c.moe!.numExperts,
    num_experts_per_tok: c.moe!.topK,
    moe_intermediate_size: c.moe!.ffnHiddenSize,
    decoder_sparse_step: 1,
    mlp_only_layers: c.moe!.moeLayers ? c.moe!.moeLayers.flatMap((x, i) => (x ? [] : [i])) : [],
    norm_topk_prob: field('moe_router_pre_softmax') !== true,
  }),
  megatronArgs: (c) => ({
    ...moeArgs(c),
    moe_router_pre_softmax: c.hf?.norm_topk_prob === false,
    moe_router_load_balancing_type: 'aux_loss',
    ...(c.moe?.moeLayers ? { moe_layer_freq: c.moe.moeLayers.map((x) => (x ? 1 : 0)) } : {}),
  }),
};
