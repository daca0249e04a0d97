/**
 * Qwen3.5: text models `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` and the published
 * vision-language wrappers `Qwen3_5ForConditionalGeneration` / `Qwen3_5MoeForConditionalGeneration`
 * (every hub checkpoint: Qwen3.5-0.8B … 397B-A17B) — Qwen3-Next's hybrid gated delta-net / gated
 * full-attention stack (see qwen3-next.ts) with the GDN input projection as four flat tensors
 * `in_proj_qkv` ([q; k; v] over all heads), `in_proj_z`, `in_proj_b`, `in_proj_a`. Megatron-Bridge's
 * `GDNLinearMappingSeparate` regroups them per key head and merges as for Qwen3-Next, which at
 * TP = 1 is the plain row concatenation `in_proj` = [qkv; z; b; a]. Dense models have a dense MLP
 * in every layer (norm fused into `linear_fc1`).
 *
 * The wrappers as Megatron-Bridge's `Qwen35VLBridge` / `Qwen35VLMoEBridge` map them onto its
 * `Qwen3VLModel` (qwen_vl/qwen35_vl_bridge.py):
 * - text under `model.language_model.*` (HF) ↔ `language_model.*` (Megatron: decoder, embedding,
 *   output layer and the MTP block); the hub's top-level `mtp.*` ↔ `language_model.mtp.*`;
 * - the vision tower `model.visual.*` ↔ `vision_model.*`, tensor for tensor: each block's `norm1` /
 *   `norm2` (LayerNorm weight and bias) fused into `linear_qkv` / `linear_fc1` as
 *   `layer_norm_weight` / `layer_norm_bias`, `attn.qkv` ([q; k; v]) regrouped per head into
 *   `linear_qkv` (ConcatenatedQKVMapping; the vision attention has as many query groups as
 *   heads), `attn.proj` → `linear_proj`, `mlp.linear_fc1/2` as named, `merger.norm` →
 *   `merger.patch_norm`, `merger.linear_fc1/2`, `patch_embed.proj` and `pos_embed` as they are.
 *   Every vision value is carried unchanged (the moves are row regroupings), so the export gives
 *   the tower back byte for byte. torch_dist stacks the vision layers (`vision_model.decoder.layers.<p>`
 *   with a leading [depth] axis: the vision block is homogeneous); the language decoder is per layer.
 * - MoE wrappers: the hub stores the decoder's experts fused (`experts.gate_up_proj` [E, 2F, H],
 *   `experts.down_proj` [E, H, F]) and the MTP layer's per expert; either layout is read, and the
 *   export writes the one the source had (recorded in the Megatron args).
 */
import { hybridFamily } from './qwen3-next.js';
import { qwenVisionTower } from './qwen-vision.js';

export const qwen35 = hybridFamily({
  id: 'qwen3_5',
  architectures: ['Qwen3_5ForCausalLM'],
  modelType: 'qwen3_5_text',
  description: 'Qwen3.5 dense (0.8B …), text checkpoints',
  separateInProj: true,
  moe: false,
});

export const qwen35Moe = hybridFamily({
  id: 'qwen3_5_moe',
  architectures: ['Qwen3_5MoeForCausalLM'],
  modelType: 'qwen3_5_moe_text',
  description: 'Qwen3.5-MoE (35B-A3B …), text checkpoints',
  separateInProj: true,
  moe: true,
});

export const qwen35Vl = hybridFamily({
  id: 'qwen3_5_vl',
  architectures: ['Qwen3_5ForConditionalGeneration'],
  modelType: 'qwen3_5',
  description: 'Qwen3.5 dense vision-language (Qwen3.5-0.8B … as published)',
  separateInProj: true,
  moe: false,
  hfModel: 'model.language_model.',
  vision: qwenVisionTower({ deepstack: false }),
});

export const qwen35MoeVl = hybridFamily({
  id: 'qwen3_5_moe_vl',
  architectures: ['Qwen3_5MoeForConditionalGeneration'],
  modelType: 'qwen3_5_moe',
  description: 'Qwen3.5-MoE vision-language (Qwen3.5-35B-A3B … as published)',
  separateInProj: true,
  moe: true,
  hfModel: 'model.language_model.',
  vision: qwenVisionTower({ deepstack: false }),
});
