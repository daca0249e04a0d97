/**
 * Qwen3.5 text models: dense `Qwen3_5ForCausalLM` and MoE `Qwen3_5MoeForCausalLM` (35B-A3B, …) —
 * Qwen3-Next's hybrid gated delta-net / gated full-attention stack (see qwen3-next.ts) with the
 * GDN input projection as four flat tensors `in_proj_qkv` ([q; k; v] over all heads), `in_proj_z`,
 * `in_proj_b`, `in_proj_a`. Megatron-Bridge's `GDNLinearMappingSeparate` regroups them per key head
 * and merges as for Qwen3-Next, which at TP = 1 is the plain row concatenation
 * `in_proj` = [qkv; z; b; a]. Dense models have a dense MLP in every layer (norm fused into
 * `linear_fc1`).
 */
import { hybridFamily } from './qwen3-next.js';

export const qwen35 = hybridFamily({
  id: 'qwen3_5',
  architectures: ['Qwen3_5ForCausalLM'],
  modelType: 'qwen3_5_text',
  description: 'Qwen3.5 dense (0.8B …)',
  separateInProj: true,
  moe: false,
});

export const qwen35Moe = hybridFamily({
  id: 'qwen3_5_moe',
  architectures: ['Qwen3_5MoeForCausalLM'],
  modelType: 'qwen3_5_moe_text',
  description: 'Qwen3.5-MoE (35B-A3B …)',
  separateInProj: true,
  moe: true,
});
