/** Qwen3 (dense): per-head q/k RMSNorm (Megatron `q_layernorm` / `k_layernorm`), no q/k/v bias. */
import { denseFamily } from './dense.js';

export const qwen3 = denseFamily({
  id: 'qwen3',
  architectures: ['Qwen3ForCausalLM'],
  modelType: 'qwen3',
  qkvBias: false,
  qkNorm: true,
  description: 'Qwen3 dense models',
  megatronClaim: (r) => (r.moe ? undefined : r.target.includes('qwen3') ? 'provider' : r.qkNorm ? 'features' : undefined),
});
