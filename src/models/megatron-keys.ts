/**
 * Canonical Megatron names ↔ the keys megatron-core's `sharded_state_dict` gives them in a
 * torch_dist checkpoint (megatron-core 0.16 `TransformerBlock`, `MambaBlock`, `SequentialMLP`):
 *
 * - homogeneous GPT stacks: `decoder.layers.<i>.<p>` → `decoder.layers.<p>` of shape `[L, …]`,
 *   layer i at offset i; hybrid and mixed dense/MoE stacks (`non_homogeneous_layers`) and
 *   MambaModel keep `decoder.layers.<i>.<p>`;
 * - experts: `….mlp.experts.local_experts.<e>.<q>` → `….mlp.experts.experts.<q>` with one more
 *   leading axis of size E (global expert e at offset e, whatever the EP split was), or
 *   `….mlp.experts.experts.<e>.<q>` under `singleton_local_shards`;
 * - `_extra_state` of each linear: a ShardedObject `<key>._extra_state/shard_<offsets>_<shape>`
 *   over the same leading axes (`shard_0_1` when there are none).
 *
 * Reading inverts it: every stacked key becomes lazy per-layer (per-expert) views under canonical
 * names, so the model maps only ever see one naming.
 */
import type { CheckpointSource, SourceTensor, TargetTensor } from '../formats/types.js';
import type { DcpTensorEntry } from '../formats/dcp.js';
import type { DType } from '../tensor/dtype.js';
import type { PyValue } from '../pickle/values.js';
import type { ModelConfig } from './config.js';
import type { Family, SourcePart } from './spec.js';
import { targetView } from '../plan/view.js';
import { badInput } from '../errors.js';
import { MEGATRON_IGNORED } from './dense.js';
import { ungroupedExpertName } from './parallel.js';

const LAYER = /^decoder\.layers\.(\d+)\.(.+)$/;
const EXPERT = /^(.*?)mlp\.experts\.local_experts\.(\d+)\.(.+)$/;

/** Where a canonical name lives in torch_dist: its key and its leading indices (layer, expert). */
function keyOf(name: string, stacked: boolean): { key: string; lead: number[] } {
  const m = LAYER.exec(name);
  if (!m) return { key: name, lead: [] };
  const i = Number(m[1]);
  const e = EXPERT.exec(m[2]!);
  const layerKey = (p: string): string => (stacked ? `decoder.layers.${p}` : `decoder.layers.${i}.${p}`);
  if (e) {
    const base = `${e[1]}mlp.experts.experts.${e[3]}`;
    return { key: layerKey(base), lead: stacked ? [i, Number(e[2])] : [Number(e[2])] };
  }
  return { key: layerKey(m[2]!), lead: stacked ? [i] : [] };
}

function leadingOnes(t: TargetTensor, n: number): TargetTensor {
  if (n === 0) return t;
  return targetView(t, { shape: [...Array<number>(n).fill(1), ...t.shape], produce: (box, out) => t.produce({ start: box.start.slice(n), size: box.size.slice(n) }, out) });
}

/**
 * megatron-core's local (TE-free) layer spec stores the unfused norms under TE's fused names
 * (its `sharded_state_dict_keys_map`), MoE layers' `pre_mlp_layernorm` included; the TE spec
 * keeps `pre_mlp_layernorm` for MoE layers (it cannot fuse it into grouped experts).
 */
function localSpecKey(name: string): string {
  return name.replace(/(^|\.)pre_mlp_layernorm\.weight$/, '$1mlp.linear_fc1.layer_norm_weight').replace(/(^|\.)input_layernorm\.weight$/, '$1self_attention.linear_qkv.layer_norm_weight');
}

/** Canonical targets as torch_dist entries, keyed as the TE (default) or local layer spec keys them. */
export function torchDistEntries(fam: Family, c: ModelConfig, targets: ReadonlyMap<string, TargetTensor>, dtype: DType, spec: 'te' | 'local' = 'te'): DcpTensorEntry[] {
  const stacked = fam.keying(c) === 'stacked';
  const E = c.moe?.numExperts ?? 0;
  const groups = new Map<string, { shape: number[]; dtype: DType; chunks: Array<{ offsets: number[]; tensor: TargetTensor }> }>();
  for (const [name, t] of targets) {
    const { key: k, lead } = keyOf(name, stacked);
    const key = spec === 'local' ? localSpecKey(k) : k;
    const leadShape = lead.length === 0 ? [] : stacked ? (lead.length === 2 ? [c.numLayers, E] : [c.numLayers]) : [E];
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { shape: [...leadShape, ...t.shape], dtype: t.dtype ?? dtype, chunks: [] }));
    g.chunks.push({ offsets: [...lead, ...t.shape.map(() => 0)], tensor: leadingOnes(t, lead.length) });
  }
  return [...groups].map(([name, g]) => ({ name, dtype: g.dtype, shape: g.shape, chunks: g.chunks }));
}

/** The empty `_extra_state` ShardedObjects megatron-core's strict load expects. */
export function torchDistExtraState(fam: Family, c: ModelConfig): Map<string, PyValue> {
  const stacked = fam.keying(c) === 'stacked';
  const E = c.moe?.numExperts ?? 0;
  const out = new Map<string, PyValue>();
  for (let i = 0; i < c.numLayers; i++) {
    for (const mod of fam.extraStateModules(c, i)) {
      const { key, lead } = keyOf(`decoder.layers.${i}.${mod}._extra_state`, stacked);
      const shape = lead.length === 0 ? [1] : stacked ? (lead.length === 2 ? [c.numLayers, E] : [c.numLayers]) : [E];
      const offsets = lead.length === 0 ? [0] : lead;
      out.set(`${key}/shard_${offsets.join('.')}_${shape.join('.')}`, [null]);
    }
  }
  return out;
}

/** A canonical name's tensor: a part of a stored tensor, and the stored key it came from. */
export interface CanonicalEntry {
  readonly part: SourcePart;
  readonly origin: string;
}

/**
 * Canonical names over a Megatron source: stacked keys split per layer (and expert), per-layer
 * keys as they are, and singleton expert keys renamed. Legacy and fsdp sources already use
 * per-layer names; their expert keys are global (the readers renumber).
 */
export function canonicalMegatron(src: CheckpointSource, c: ModelConfig): Map<string, CanonicalEntry> {
  const out = new Map<string, CanonicalEntry>();
  const put = (name: string, t: SourceTensor, prefix: number[]): void => {
    out.set(name, { part: { src: t, prefix }, origin: t.name });
  };
  for (const [name, t] of src.tensors) {
    const per = LAYER.exec(ungroupedExpertName(name));
    if (per) {
      const rest = per[2]!;
      const at = rest.indexOf('mlp.experts.experts.');
      if (at >= 0) {
        const pre = rest.slice(0, at);
        const ex = /^(?:(\d+)\.)?(.+)$/.exec(rest.slice(at + 'mlp.experts.experts.'.length))!;
        if (ex[1] !== undefined) put(`decoder.layers.${per[1]}.${pre}mlp.experts.local_experts.${ex[1]}.${ex[2]}`, t, []);
        else for (let e = 0; e < (t.shape[0] ?? 0); e++) put(`decoder.layers.${per[1]}.${pre}mlp.experts.local_experts.${e}.${ex[2]}`, t, [e]);
        continue;
      }
      put(`decoder.layers.${per[1]}.${rest}`, t, []);
      continue;
    }
    const st = /^decoder\.layers\.(.+)$/.exec(name);
    if (!st || t.shape.length === 0) {
      put(name, t, []);
      continue;
    }
    const p = st[1]!;
    const L = t.shape[0]!;
    if (L !== c.numLayers && !MEGATRON_IGNORED.some((r) => r.pattern.test(name))) {
      throw badInput(`${name}: holds ${L} layers but the config has ${c.numLayers}`, src.path, name);
    }
    const ex = /^(.*?)mlp\.experts\.experts\.(?:(\d+)\.)?(.+)$/.exec(p);
    for (let i = 0; i < L; i++) {
      if (!ex) put(`decoder.layers.${i}.${p}`, t, [i]);
      else if (ex[2] !== undefined) put(`decoder.layers.${i}.${ex[1]}mlp.experts.local_experts.${ex[2]}.${ex[3]}`, t, [i]);
      else for (let e = 0; e < (t.shape[1] ?? 0); e++) put(`decoder.layers.${i}.${ex[1]}mlp.experts.local_experts.${e}.${ex[3]}`, t, [i, e]);
    }
  }
  return out;
}
