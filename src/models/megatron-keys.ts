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
 * - parameters a family lists in `splitKeys` (MambaMixer's in_proj and conv1d): one key per row
 *   block, `<key>.<suffix>`;
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
import type { Family, SourcePart, SplitParam } from './spec.js';
import { allRows, rowConcat } from '../plan/targets.js';
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

/** The split of a canonical per-layer name, if its family stores it as several keys. */
function splitOf(fam: Family, c: ModelConfig, name: string): SplitParam | undefined {
  if (!fam.splitKeys) return undefined;
  const m = LAYER.exec(name);
  return m ? fam.splitKeys(c, Number(m[1])).find((s) => s.param === m[2]) : undefined;
}

/** Rows [start, start + count) of a target. */
function rowSlice(t: TargetTensor, start: number, count: number): TargetTensor {
  return targetView(t, { shape: [count, ...t.shape.slice(1)], produce: (box, out) => t.produce({ start: [box.start[0]! + start, ...box.start.slice(1)], size: box.size }, out) });
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
  const add = (key: string, lead: number[], t: TargetTensor): void => {
    const leadShape = lead.length === 0 ? [] : stacked ? (lead.length === 2 ? [c.numLayers, E] : [c.numLayers]) : [E];
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { shape: [...leadShape, ...t.shape], dtype: t.dtype ?? dtype, chunks: [] }));
    g.chunks.push({ offsets: [...lead, ...t.shape.map(() => 0)], tensor: leadingOnes(t, lead.length) });
  };
  for (const [name, t] of targets) {
    const { key: k, lead } = keyOf(name, stacked);
    const key = spec === 'local' ? localSpecKey(k) : k;
    const split = splitOf(fam, c, name);
    if (!split) {
      add(key, lead, t);
      continue;
    }
    let at = 0;
    for (const part of split.parts) {
      add(`${key}.${part.suffix}`, lead, rowSlice(t, at, part.rows));
      at += part.rows;
    }
  }
  return [...groups].map(([name, g]) => ({ name, dtype: g.dtype, shape: g.shape, chunks: g.chunks }));
}

/** The empty `_extra_state` ShardedObjects megatron-core's strict load expects. */
export function torchDistExtraState(fam: Family, c: ModelConfig): Map<string, PyValue> {
  const stacked = fam.keying(c) === 'stacked';
  const E = c.moe?.numExperts ?? 0;
  const out = new Map<string, PyValue>();
  for (const mod of fam.globalExtraStateModules?.(c) ?? []) out.set(`${mod}._extra_state/shard_0_1`, [null]);
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
  /** Further stored keys it is made of (a split parameter's other parts). */
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
  // Split parameters: their parts' row blocks concatenated back into the canonical tensor.
  for (let i = 0; fam?.splitKeys && i < c.numLayers; i++) {
    for (const sp of fam.splitKeys(c, i)) {
      const name = `decoder.layers.${i}.${sp.param}`;
      const parts = sp.parts.map((p) => out.get(`${name}.${p.suffix}`));
      if (parts.some((p) => !p)) continue;
      const have = parts as CanonicalEntry[];
      const first = have[0]!.part.src;
      const rest = first.shape.slice(have[0]!.part.prefix.length + 1);
      have.forEach((p, k) => {
        const shape = p.part.src.shape.slice(p.part.prefix.length);
        if (shape[0] !== sp.parts[k]!.rows || shape.slice(1).join() !== rest.join()) {
          throw badInput(`${p.origin}: shape [${p.part.src.shape.join(', ')}] does not match the config, which needs ${sp.parts[k]!.rows} rows of [${rest.join(', ')}] for ${name}.${sp.parts[k]!.suffix}`, src.path, p.origin);
        }
      });
      const t = rowConcat(name, first.dtype, rest, have.map((p) => allRows(p.part.src, p.part.prefix)), `${sp.parts.map((p) => `${name}.${p.suffix}`).join(' + ')}`);
      const merged: SourceTensor = { name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, where: t.describe, read: (b, o) => t.produce(b, o) };
      for (const p of sp.parts) out.delete(`${name}.${p.suffix}`);
      out.set(name, { part: { src: merged, prefix: [] }, origin: have[0]!.origin, alsoFrom: have.slice(1).map((p) => p.origin) });
    }
  }
  return out;
}
