/** Mistral (sliding-window attention is a config field; the weights map as Llama's). */
import type { DenseFamily } from './dense.js';

export const mistral: DenseFamily = {
  id: 'mistral',
  architectures: ['MistralForCausalLM'],
  modelType: 'mistral',
  qkvBias: false,
  qkNorm: false,
  description: 'Mistral 7B and relatives',
};
