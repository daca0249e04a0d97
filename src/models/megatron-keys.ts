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
import { byteLength, numelOf, type DType } from '../tensor/dtype.js';
import type { PyValue } from '../pickle/values.js';
import type { ModelConfig } from './config.js';
import type { Family, SourcePart } from './spec.js';
import { targetView } from '../plan/view.js';
import { badInput } from '../errors.js';
import { MEGATRON_IGNORED } from './dense.js';

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
  for (const [name, t] of splitTargets(fam, c, targets)) {
    const { key: k, lead } = keyOf(name, stacked);
    const key = spec === 'local' ? localSpecKey(k) : k;
    const leadShape = lead.length === 0 ? [] : stacked ? (lead.length === 2 ? [c.numLayers, E] : [c.numLayers]) : [E];
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { shape: [...leadShape, ...t.shape], dtype: t.dtype ?? dtype, chunks: [] }));
    g.chunks.push({ offsets: [...lead, ...t.shape.map(() => 0)], tensor: leadingOnes(t, lead.length) });
  }
  return [...groups].map(([name, g]) => ({ name, dtype: g.dtype, shape: g.shape, chunks: g.chunks }));
}

/** The canonical parameters of each layer that torch_dist splits into row runs (`<name>.<suffix>`). */
function splitsOf(fam: Family, c: ModelConfig): Map<string, ReadonlyArray<readonly [string, number]>> {
  const out = new Map<string, ReadonlyArray<readonly [string, number]>>();
  if (!fam.torchDistSplits) return out;
  for (let i = 0; i < c.numLayers; i++) for (const s of fam.torchDistSplits(c, i)) out.set(`decoder.layers.${i}.${s.param}`, s.parts);
  return out;
}

/** Targets with the split parameters replaced by their row runs. */
function* splitTargets(fam: Family, c: ModelConfig, targets: ReadonlyMap<string, TargetTensor>): Generator<[string, TargetTensor]> {
  const splits = splitsOf(fam, c);
  for (const [name, t] of targets) {
    const parts = splits.get(name);
    if (!parts) {
      yield [name, t];
      continue;
    }
    let at = 0;
    for (const [suffix, n] of parts) {
      const start = at;
      yield [`${name}.${suffix}`, targetView(t, { name: `${name}.${suffix}`, shape: [n, ...t.shape.slice(1)], produce: (box, out) => t.produce({ start: [box.start[0]! + start, ...box.start.slice(1)], size: box.size }, out) })];
      at += n;
    }
    if (at !== t.shape[0]) throw new Error(`internal: ${name} splits into ${at} rows but has ${t.shape[0]}`);
  }
}

/** Row runs of stored tensors (at their prefixes) read as one tensor. */
function joinedRows(name: string, parts: readonly SourcePart[]): SourceTensor {
  const first = parts[0]!;
  const rest = first.src.shape.slice(first.prefix.length + 1);
  const counts = parts.map((p) => p.src.shape[p.prefix.length]!);
  for (const p of parts) {
    const r = p.src.shape.slice(p.prefix.length + 1);
    if (p.src.dtype !== first.src.dtype || r.length !== rest.length || r.some((d, k) => d !== rest[k])) {
      throw badInput(`${p.src.name}: shape [${p.src.shape.join(', ')}] (${p.src.dtype}) does not join with ${first.src.name} into ${name}`, undefined, p.src.name);
    }
  }
  const shape = [counts.reduce((a, b) => a + b, 0), ...rest];
  return {
    name,
    dtype: first.src.dtype,
    shape,
    byteLength: byteLength(first.src.dtype, numelOf(shape)),
    where: parts.map((p) => p.src.where).join(' + '),
    read: async (box, out) => {
      const a = box.start[0]!;
      const n = box.size[0]!;
      const boxRow = byteLength(first.src.dtype, numelOf(box.size.slice(1)));
      const reads: Array<Promise<void>> = [];
      let at = 0;
      parts.forEach((p, k) => {
        const lo = Math.max(a, at);
        const hi = Math.min(a + n, at + counts[k]!);
        if (lo < hi) {
          reads.push(p.src.read({ start: [...p.prefix, lo - at, ...box.start.slice(1)], size: [...p.prefix.map(() => 1), hi - lo, ...box.size.slice(1)] }, out.subarray((lo - a) * boxRow, (hi - a) * boxRow)));
        }
        at += counts[k]!;
      });
      await Promise.all(reads);
    },
  };
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
  /** Further stored keys it was joined from (torch_dist row-run splits). */
  readonly alsoFrom?: readonly string[];
}

/**
 * Canonical names over a Megatron source: stacked keys split per layer (and expert), per-layer
 * keys as they are, and singleton expert keys renamed. Legacy and fsdp sources already use
 * per-layer names; their expert keys are global (the readers renumber).
 */
export function canonicalMegatron(src: CheckpointSource, c: ModelConfig, fam?: Family): Map<string, CanonicalEntry> {
  const out = new Map<string, CanonicalEntry>();
  const put = (name: string, t: SourceTensor, prefix: number[]): void => {
    out.set(name, { part: { src: t, prefix }, origin: t.name });
  };
  for (const [name, t] of src.tensors) {
    const per = LAYER.exec(name);
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
      put(name, t, []);
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
  // Parameters torch_dist split into row runs are joined back under their canonical name.
  if (fam) {
    for (const [name, parts] of splitsOf(fam, c)) {
      const found = parts.map(([suffix]) => out.get(`${name}.${suffix}`));
      if (found.some((x) => !x)) continue;
      const entries = found as CanonicalEntry[];
      for (const [suffix] of parts) out.delete(`${name}.${suffix}`);
      out.set(name, { part: { src: joinedRows(name, entries.map((x) => x.part)), prefix: [] }, origin: entries[0]!.origin, alsoFrom: entries.slice(1).map((x) => x.origin) });
    }
  }
  return out;
}
