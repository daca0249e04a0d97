/** Mistral (sliding-window attention is a config field; the weights map as Llama's). */
import { denseFamily } from './dense.js';

export const mistral = denseFamily({
  id: 'mistral',
  architectures: ['MistralForCausalLM'],
  modelType: 'mistral',
  qkvBias: false,
  qkNorm: false,
  description: 'Mistral 7B and relatives',
  megatronClaim: (r) => (!r.moe && r.target.includes('mistral') && !r.target.includes('qwen') ? 'provider' : undefined),
});
