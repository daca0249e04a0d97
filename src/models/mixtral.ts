/**
 * Mixtral 8x7B / 8x22B: Llama attention, every layer a sparse MoE block
 * (`block_sparse_moe.gate` router, experts `w1` gate / `w3` up / `w2` down), no shared expert.
 * Megatron-Bridge maps w1/w3 into each expert's `linear_fc1` = [w1; w3].
 */
import { badInput } from '../util/errors.js';
import { fromHfConfig, num, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, linearExtraState, moeArgs, moeParams } from './dense.js';
import type { Family } from './spec.js';

const B = 'model.layers.{i}.block_sparse_moe';

export const mixtral: Family = {
  id: 'mixtral',
  architectures: ['MixtralForCausalLM'],
  modelType: 'mixtral',
  description: 'Mixtral 8x7B, 8x22B',
  // The MoE fallback without q/k norms, unless the provider class is a Qwen one.
  megatronClaim: (r) => (!r.moe ? undefined : r.target.includes('mixtral') ? 'provider' : !r.target.includes('qwen') && !r.qkNorm && !r.expertBias ? 'features' : undefined),
  keying: () => 'stacked',
  fromHf(cfg, file): ModelConfig {
    const base = fromHfConfig('mixtral', cfg, file, { qkvBias: false, qkNorm: false });
    const numExperts = num(cfg, 'num_local_experts', file);
    const topK = num(cfg, 'num_experts_per_tok', file, 2);
    if (topK > numExperts) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds num_local_experts (${numExperts})`, file);
    return { ...base, moe: { numExperts, topK, ffnHiddenSize: base.ffnHiddenSize } };
  },
  globalParams: (c) => denseGlobals(c),
  layerParams: (c) => [
    ...attentionParams(c),
    ...moeParams(c, {
      norm: 'model.layers.{i}.post_attention_layernorm.weight',
      router: `${B}.gate.weight`,
      gate: `${B}.experts.{e}.w1.weight`,
      up: `${B}.experts.{e}.w3.weight`,
      down: `${B}.experts.{e}.w2.weight`,
    }),
  ],
  extraStateModules: (c, i) => linearExtraState(c, i),
  hfConfig: (c) => ({ num_local_experts: c.moe!.numExperts, num_experts_per_tok: c.moe!.topK, intermediate_size: c.moe!.ffnHiddenSize }),
  megatronArgs: (c) => ({ ...moeArgs(c), moe_router_pre_softmax: false, moe_router_load_balancing_type: 'aux_loss' }),
};
