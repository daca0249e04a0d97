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
import { unsupported, badInput } from '../util/errors.js';
import type { ModelConfig } from './config.js';
import { hybridFamily, type VisionTower } from './qwen3-next.js';
import type { CustomKind, GlobalParam, LayerParam, SourcePart } from './spec.js';
import { rowConcat, rows, type RowSegment } from '../lazy/expr.js';

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

interface Vision {
  readonly depth: number;
  readonly hidden: number;
  readonly heads: number;
  readonly inter: number;
  readonly out: number;
  readonly merge: number;
  readonly patch: number;
  readonly temporal: number;
  readonly channels: number;
  readonly positions: number;
}

function visionOf(c: ModelConfig): Vision {
  const v = c.hf?.vision_config as Record<string, unknown> | undefined;
  if (!v || typeof v !== 'object') throw badInput(`config.json: a ${c.family} (vision-language) config needs its vision_config`);
  const n = (k: string, d?: number): number => {
    const x = v[k] ?? d;
    if (typeof x !== 'number' || !Number.isInteger(x) || x <= 0) throw badInput(`config.json: vision_config.${k} is ${JSON.stringify(v[k])}, expected a positive integer`);
    return x;
  };
  if (Array.isArray(v.deepstack_visual_indexes) && v.deepstack_visual_indexes.length > 0) {
    throw unsupported(`config.json: vision_config.deepstack_visual_indexes ${JSON.stringify(v.deepstack_visual_indexes)}: deepstack mergers are not mapped (Qwen3.5 has none)`);
  }
  const hidden = n('hidden_size');
  const heads = n('num_heads');
  if (hidden % heads !== 0) throw badInput(`config.json: vision_config.hidden_size (${hidden}) is not a multiple of num_heads (${heads})`);
  return {
    depth: n('depth'),
    hidden,
    heads,
    inter: n('intermediate_size'),
    out: n('out_hidden_size'),
    merge: n('spatial_merge_size', 2),
    patch: n('patch_size', 16),
    temporal: n('temporal_patch_size', 2),
    channels: n('in_channels', 3),
    positions: n('num_position_embeddings'),
  };
}

/**
 * HF's concatenated [q; k; v] (`attn.qkv`, weight or bias) ↔ Megatron's per-head [q_h; k_h; v_h]
 * (Megatron-Bridge ConcatenatedQKVMapping = split, then the usual per-group interleave with one
 * head per group).
 */
function concatenatedQkv(heads: number, hn: number): CustomKind {
  const part = (p: SourcePart, start: number, count: number): RowSegment => rows(p.src, start, count, p.prefix);
  return {
    id: 'concatenated-qkv',
    toMegatron(name, [qkv], shape) {
      const segs: RowSegment[] = [];
      for (let h = 0; h < heads; h++) segs.push(part(qkv!, h * hn, hn), part(qkv!, (heads + h) * hn, hn), part(qkv!, (2 * heads + h) * hn, hn));
      return rowConcat(name, qkv!.src.dtype, shape.slice(1), segs, `per-head qkv(${qkv!.src.name})`);
    },
    toHf([n], src, [shape]) {
      const segs: RowSegment[] = [];
      for (const which of [0, 1, 2]) for (let h = 0; h < heads; h++) segs.push(part(src, (3 * h + which) * hn, hn));
      return [rowConcat(n!, src.src.dtype, shape!.slice(1), segs, `${src.src.name} as [q; k; v]`)];
    },
  };
}

const V = 'model.visual';

function visionTower(): VisionTower {
  return {
    globals(c): GlobalParam[] {
      const v = visionOf(c);
      const m2 = v.hidden * v.merge * v.merge;
      const g = (megatron: string, hf: string, shape: number[]): GlobalParam => ({ megatron, hf, kind: 'copy', shape });
      return [
        g('vision_model.patch_embed.proj.weight', `${V}.patch_embed.proj.weight`, [v.hidden, v.channels, v.temporal, v.patch, v.patch]),
        g('vision_model.patch_embed.proj.bias', `${V}.patch_embed.proj.bias`, [v.hidden]),
        g('vision_model.pos_embed.weight', `${V}.pos_embed.weight`, [v.positions, v.hidden]),
        g('vision_model.merger.patch_norm.weight', `${V}.merger.norm.weight`, [v.hidden]),
        g('vision_model.merger.patch_norm.bias', `${V}.merger.norm.bias`, [v.hidden]),
        g('vision_model.merger.linear_fc1.weight', `${V}.merger.linear_fc1.weight`, [m2, m2]),
        g('vision_model.merger.linear_fc1.bias', `${V}.merger.linear_fc1.bias`, [m2]),
        g('vision_model.merger.linear_fc2.weight', `${V}.merger.linear_fc2.weight`, [v.out, m2]),
        g('vision_model.merger.linear_fc2.bias', `${V}.merger.linear_fc2.bias`, [v.out]),
      ];
    },
    block(c) {
      const v = visionOf(c);
      const H = v.hidden;
      const B = `${V}.blocks.{i}`;
      const copy = (megatron: string, hf: string, shape: number[]): LayerParam => ({ megatron, hf: [hf], kind: 'copy', hfShapes: [shape], shape });
      const qkv = concatenatedQkv(v.heads, H / v.heads);
      const params: LayerParam[] = [
        copy('self_attention.linear_qkv.layer_norm_weight', `${B}.norm1.weight`, [H]),
        copy('self_attention.linear_qkv.layer_norm_bias', `${B}.norm1.bias`, [H]),
        { megatron: 'self_attention.linear_qkv.weight', hf: [`${B}.attn.qkv.weight`], kind: qkv, hfShapes: [[3 * H, H]], shape: [3 * H, H] },
        { megatron: 'self_attention.linear_qkv.bias', hf: [`${B}.attn.qkv.bias`], kind: qkv, hfShapes: [[3 * H]], shape: [3 * H] },
        copy('self_attention.linear_proj.weight', `${B}.attn.proj.weight`, [H, H]),
        copy('self_attention.linear_proj.bias', `${B}.attn.proj.bias`, [H]),
        copy('mlp.linear_fc1.layer_norm_weight', `${B}.norm2.weight`, [H]),
        copy('mlp.linear_fc1.layer_norm_bias', `${B}.norm2.bias`, [H]),
        copy('mlp.linear_fc1.weight', `${B}.mlp.linear_fc1.weight`, [v.inter, H]),
        copy('mlp.linear_fc1.bias', `${B}.mlp.linear_fc1.bias`, [v.inter]),
        copy('mlp.linear_fc2.weight', `${B}.mlp.linear_fc2.weight`, [H, v.inter]),
        copy('mlp.linear_fc2.bias', `${B}.mlp.linear_fc2.bias`, [H]),
      ];
      return {
        prefix: 'vision_model.decoder.layers.',
        layers: v.depth,
        keying: 'stacked',
        params: () => params,
        extraStateModules: () => ['self_attention.linear_qkv', 'self_attention.linear_proj', 'mlp.linear_fc1', 'mlp.linear_fc2'],
      };
    },
  };
}

export const qwen35Vl = hybridFamily({
  id: 'qwen3_5_vl',
  architectures: ['Qwen3_5ForConditionalGeneration'],
  modelType: 'qwen3_5',
  description: 'Qwen3.5 dense vision-language (Qwen3.5-0.8B … as published)',
  separateInProj: true,
  moe: false,
  hfModel: 'model.language_model.',
  vision: visionTower(),
});

export const qwen35MoeVl = hybridFamily({
  id: 'qwen3_5_moe_vl',
  architectures: ['Qwen3_5MoeForConditionalGeneration'],
  modelType: 'qwen3_5_moe',
  description: 'Qwen3.5-MoE vision-language (Qwen3.5-35B-A3B … as published)',
  separateInProj: true,
  moe: true,
  hfModel: 'model.language_model.',
  vision: visionTower(),
});
