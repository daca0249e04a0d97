/** Qwen2 / Qwen2.5: q/k/v biases (Megatron `linear_qkv.bias`, interleaved like the weight). */
import { denseFamily } from './dense.js';

export const qwen2 = denseFamily({
  id: 'qwen2',
  architectures: ['Qwen2ForCausalLM'],
  modelType: 'qwen2',
  qkvBias: true,
  qkNorm: false,
  description: 'Qwen2, Qwen2.5',
  megatronClaim: (r) =>
    r.moe ? undefined
    : r.target.includes('qwen2') || (r.target.includes('qwen') && !r.target.includes('qwen3') && r.qkvBias) ? 'provider'
    : r.qkvBias && !r.qkNorm ? 'features'
    : undefined,
});
