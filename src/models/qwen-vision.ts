/**
 * The vision tower of the Qwen3-VL / Qwen3.5 vision-language wrappers as Megatron-Bridge maps it
 * onto its `Qwen3VLModel` (`qwen_vl/qwen3_vl_bridge.py`, `qwen35_vl_bridge.py`): `model.visual.*`
 * ↔ `vision_model.*`, tensor for tensor — each block's `norm1` / `norm2` (LayerNorm weight and
 * bias) fused into `linear_qkv` / `linear_fc1` as `layer_norm_weight` / `layer_norm_bias`,
 * `attn.qkv` ([q; k; v]) regrouped per head into `linear_qkv` (ConcatenatedQKVMapping: the vision
 * attention has as many query groups as heads), `attn.proj` → `linear_proj`, `mlp.linear_fc1/2` as
 * named, `merger.norm` → `merger.patch_norm`, `merger.linear_fc1/2`, `patch_embed.proj` and
 * `pos_embed` as they are; Qwen3-VL's deepstack mergers (one per `deepstack_visual_indexes` entry,
 * each normalising the merged patches: `norm` over hidden × merge²) `model.visual.deepstack_merger_list.<k>.*`
 * ↔ `vision_model.decoder.deepstack_merger_list.<k>.*` (`norm` → `patch_norm`). Every value is
 * carried unchanged (the moves are row regroupings), so an export gives the tower back byte for
 * byte. torch_dist stacks the (homogeneous) vision layers under `vision_model.decoder.layers`.
 */
import { badInput, unsupported } from '../util/errors.js';
import { rowConcat, rows, type RowSegment } from '../lazy/expr.js';
import { visionConfigReader, type ModelConfig } from './config.js';
import type { VisionTower } from './qwen3-next.js';
import type { CustomKind, GlobalParam, LayerParam, SourcePart } from './spec.js';

interface Vision {
  /** Blocks whose output a deepstack merger also takes (Qwen3-VL; none in Qwen3.5). */
  readonly deepstack: readonly number[];
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

function visionOf(c: ModelConfig, allowDeepstack: boolean): Vision {
  const { raw: v, int: n } = visionConfigReader(c, `${c.family} (vision-language)`);
  const ds = v.deepstack_visual_indexes ?? [];
  if (!Array.isArray(ds) || !ds.every((x) => typeof x === 'number' && Number.isInteger(x) && x >= 0)) throw badInput(`config.json: vision_config.deepstack_visual_indexes is ${JSON.stringify(ds)}, expected block indices`);
  if (ds.length > 0 && !allowDeepstack) {
    throw unsupported(`config.json: vision_config.deepstack_visual_indexes ${JSON.stringify(ds)}: a ${c.family} vision tower has no deepstack mergers (Qwen3-VL's do)`);
  }
  const hidden = n('hidden_size');
  const heads = n('num_heads');
  if (hidden % heads !== 0) throw badInput(`config.json: vision_config.hidden_size (${hidden}) is not a multiple of num_heads (${heads})`);
  return {
    deepstack: ds as number[],
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

/** The tower's map; `deepstack`: Qwen3-VL's deepstack mergers are mapped (else a config that has them is refused). */
export function qwenVisionTower(opts: { readonly deepstack: boolean }): VisionTower {
  return {
    globals(c): GlobalParam[] {
      const v = visionOf(c, opts.deepstack);
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
        ...v.deepstack.flatMap((_, k) => {
          const M = `vision_model.decoder.deepstack_merger_list.${k}`;
          const H = `${V}.deepstack_merger_list.${k}`;
          return [
            g(`${M}.patch_norm.weight`, `${H}.norm.weight`, [m2]),
            g(`${M}.patch_norm.bias`, `${H}.norm.bias`, [m2]),
            g(`${M}.linear_fc1.weight`, `${H}.linear_fc1.weight`, [m2, m2]),
            g(`${M}.linear_fc1.bias`, `${H}.linear_fc1.bias`, [m2]),
            g(`${M}.linear_fc2.weight`, `${H}.linear_fc2.weight`, [v.out, m2]),
            g(`${M}.linear_fc2.bias`, `${H}.linear_fc2.bias`, [v.out]),
          ];
        }),
      ];
    },
    block(c) {
      const v = visionOf(c, opts.deepstack);
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
