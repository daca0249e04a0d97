/** Llama 2 / 3 / 3.1 / 3.2 (GQA, rope scaling carried in config.json, tied embeddings on 1B/3B). */
import { denseFamily } from './dense.js';

export const llama = denseFamily({
  id: 'llama',
  architectures: ['LlamaForCausalLM'],
  modelType: 'llama',
  qkvBias: false,
  qkNorm: false,
  description: 'Llama 2, Llama 3 / 3.1 / 3.2',
  // The dense fallback: no q/k norms, no QKV bias (a Llama provider class with either is not Llama).
  megatronClaim: (r) => (!r.moe && !r.qkNorm && !r.qkvBias ? 'features' : undefined),
});
