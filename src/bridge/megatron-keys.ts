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
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import type { DcpTensorEntry } from '../formats/dcp.js';
import type { DType } from '../tensor/dtype.js';
import type { PyValue } from '../pickle/values.js';
import type { ModelConfig } from '../models/config.js';
import type { Family, SourcePart, SplitParam } from '../models/spec.js';
import { allRows, rowConcat, produceBox } from '../lazy/expr.js';
import { targetView, withLeadingOnes, sliceTarget } from '../lazy/view.js';
import { badInput } from '../util/errors.js';
import { MEGATRON_IGNORED } from '../models/dense.js';
import { ungroupedExpertName } from '../megatron/parallel.js';

const EXPERT = /^(.*?)mlp\.experts\.local_experts\.(\d+)\.(.+)$/;

/** A layer stack as torch_dist keys it: the decoder, the MTP block, a vision tower. */
export interface Stack {
  readonly prefix: string;
  readonly layers: number;
  readonly stacked: boolean;
  /** Matches `<prefix><i>.<rest>`. */
  readonly perLayer: RegExp;
}

function stack(prefix: string, layers: number, stacked: boolean): Stack {
  return { prefix, layers, stacked, perLayer: new RegExp(`^${prefix.replace(/\./g, '\\.')}(\\d+)\\.(.+)$`) };
}

/** Every layer stack of a config: the decoder first, then the family's other blocks. */
export function stacksOf(fam: Family, c: ModelConfig): Stack[] {
  return [stack('decoder.layers.', c.numLayers, fam.keying(c) === 'stacked'), ...(fam.blocks?.(c) ?? []).map((b) => stack(b.prefix, b.layers, b.keying === 'stacked'))];
}

/** Where a canonical name lives in torch_dist: its key, its leading indices (layer, expert) and their extent. */
function keyOf(name: string, stacks: readonly Stack[], E: number): { key: string; lead: number[]; leadShape: number[] } {
  for (const st of stacks) {
    const m = st.perLayer.exec(name);
    if (!m) continue;
    const i = Number(m[1]);
    const e = EXPERT.exec(m[2]!);
    const layerKey = (p: string): string => (st.stacked ? `${st.prefix}${p}` : `${st.prefix}${i}.${p}`);
    if (e) {
      const base = `${e[1]}mlp.experts.experts.${e[3]}`;
      return st.stacked ? { key: layerKey(base), lead: [i, Number(e[2])], leadShape: [st.layers, E] } : { key: layerKey(base), lead: [Number(e[2])], leadShape: [E] };
    }
    return st.stacked ? { key: layerKey(m[2]!), lead: [i], leadShape: [st.layers] } : { key: layerKey(m[2]!), lead: [], leadShape: [] };
  }
  return { key: name, lead: [], leadShape: [] };
}

/** The wrapper prefix of a family's Megatron names (`language_model.`), applied to a key. */
export function prefixer(fam: Family, c: ModelConfig): (key: string) => string {
  const p = fam.megatronPrefix?.(c);
  if (!p) return (k) => k;
  return (k) => (p.except.some((x) => k.startsWith(x)) ? k : `${p.prefix}${k}`);
}

/** The split of a canonical per-layer name, if its family stores it as several keys. */
function splitOf(splits: ReadonlyMap<string, SplitParam> | undefined, name: string): SplitParam | undefined {
  return splits?.get(name);
}

/** Every split parameter of a config by its canonical per-layer name (computed once per plan). */
function splitParams(fam: Family, c: ModelConfig): Map<string, SplitParam> | undefined {
  if (!fam.splitKeys) return undefined;
  const out = new Map<string, SplitParam>();
  for (let i = 0; i < c.numLayers; i++) for (const sp of fam.splitKeys(c, i)) out.set(`decoder.layers.${i}.${sp.param}`, sp);
  return out;
}

/** Rows [start, start + count) of a target, described as the target itself. */
function rowSlice(t: TargetTensor, start: number, count: number): TargetTensor {
  return targetView(sliceTarget(t, 0, start, count), { describe: t.describe });
}

/**
 * megatron-core's local (TE-free) layer spec stores the unfused norms under TE's fused names
 * (its `sharded_state_dict_keys_map`), MoE layers' `pre_mlp_layernorm` included; the TE spec
 * keeps `pre_mlp_layernorm` for MoE layers (it cannot fuse it into grouped experts).
 */
function localSpecKey(name: string): string {
  // Only megatron-core's own layers have the keys map: a wrapper's carried HF module (Llama 4's
  // vision_model.model.layers.<j>.input_layernorm) keeps its names.
  if (!/^(decoder|mtp|vision_model\.decoder)\.layers\./.test(name)) return name;
  return name.replace(/(^|\.)pre_mlp_layernorm\.weight$/, '$1mlp.linear_fc1.layer_norm_weight').replace(/(^|\.)input_layernorm\.weight$/, '$1self_attention.linear_qkv.layer_norm_weight');
}

/** Canonical targets as torch_dist entries, keyed as the TE (default) or local layer spec keys them. */
export function torchDistEntries(fam: Family, c: ModelConfig, targets: ReadonlyMap<string, TargetTensor>, dtype: DType, spec: 'te' | 'local' = 'te'): DcpTensorEntry[] {
  const stacks = stacksOf(fam, c);
  const E = c.moe?.numExperts ?? 0;
  const withPrefix = prefixer(fam, c);
  const groups = new Map<string, { shape: number[]; dtype: DType; chunks: Array<{ offsets: number[]; tensor: TargetTensor }> }>();
  const add = (key: string, lead: number[], leadShape: number[], t: TargetTensor): void => {
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { shape: [...leadShape, ...t.shape], dtype: t.dtype ?? dtype, chunks: [] }));
    g.chunks.push({ offsets: [...lead, ...t.shape.map(() => 0)], tensor: withLeadingOnes(t, lead.length) });
  };
  const splits = splitParams(fam, c);
  for (const [name, t] of targets) {
    const { key: k, lead, leadShape } = keyOf(name, stacks, E);
    const key = withPrefix(spec === 'local' ? (fam.localSpecName ?? localSpecKey)(k) : k);
    const split = splitOf(splits, name);
    if (!split) {
      add(key, lead, leadShape, t);
      continue;
    }
    let at = 0;
    for (const part of split.parts) {
      add(`${key}.${part.suffix}`, lead, leadShape, rowSlice(t, at, part.rows));
      at += part.rows;
    }
  }
  return [...groups].map(([name, g]) => ({ name, dtype: g.dtype, shape: g.shape, chunks: g.chunks }));
}

/** The empty `_extra_state` ShardedObjects megatron-core's strict load expects. */
export function torchDistExtraState(fam: Family, c: ModelConfig): Map<string, PyValue> {
  const stacks = stacksOf(fam, c);
  const E = c.moe?.numExperts ?? 0;
  const withPrefix = prefixer(fam, c);
  const out = new Map<string, PyValue>();
  for (const mod of fam.globalExtraStateModules?.(c) ?? []) out.set(`${withPrefix(mod)}._extra_state/shard_0_1`, [null]);
  const blocks = fam.blocks?.(c) ?? [];
  const modulesOf = (s: number, i: number): readonly string[] => (s === 0 ? fam.extraStateModules(c, i) : blocks[s - 1]!.extraStateModules(i));
  stacks.forEach((st, s) => {
    for (let i = 0; i < st.layers; i++) {
      for (const mod of modulesOf(s, i)) {
        const { key, lead, leadShape } = keyOf(`${st.prefix}${i}.${mod}._extra_state`, stacks, E);
        const shape = lead.length === 0 ? [1] : leadShape;
        const offsets = lead.length === 0 ? [0] : lead;
        out.set(`${withPrefix(key)}/shard_${offsets.join('.')}_${shape.join('.')}`, [null]);
      }
    }
  });
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
 * Canonical names over a Megatron source: the wrapper prefix dropped, stacked keys split per layer
 * (and expert), per-layer keys as they are, and singleton expert keys renamed. Legacy and fsdp
 * sources already use per-layer names; their expert keys are global (the readers renumber).
 */
export function canonicalMegatron(src: CheckpointSource, c: ModelConfig, fam?: Family): Map<string, CanonicalEntry> {
  const out = new Map<string, CanonicalEntry>();
  const stacks = fam ? stacksOf(fam, c) : [stack('decoder.layers.', c.numLayers, true)];
  const wrap = fam?.megatronPrefix?.(c);
  const put = (name: string, t: SourceTensor, prefix: number[]): void => {
    out.set(name, { part: { src: t, prefix }, origin: t.name });
  };
  for (const [stored, t] of src.tensors) {
    const name = wrap && stored.startsWith(wrap.prefix) ? stored.slice(wrap.prefix.length) : stored;
    const plain = ungroupedExpertName(name);
    const st = stacks.find((x) => plain.startsWith(x.prefix));
    if (!st) {
      put(name, t, []);
      continue;
    }
    const per = st.perLayer.exec(plain);
    if (per) {
      const rest = per[2]!;
      const at = rest.indexOf('mlp.experts.experts.');
      if (at >= 0) {
        const pre = rest.slice(0, at);
        const ex = /^(?:(\d+)\.)?(.+)$/.exec(rest.slice(at + 'mlp.experts.experts.'.length))!;
        if (ex[1] !== undefined) put(`${st.prefix}${per[1]}.${pre}mlp.experts.local_experts.${ex[1]}.${ex[2]}`, t, []);
        else for (let e = 0; e < (t.shape[0] ?? 0); e++) put(`${st.prefix}${per[1]}.${pre}mlp.experts.local_experts.${e}.${ex[2]}`, t, [e]);
        continue;
      }
      put(`${st.prefix}${per[1]}.${rest}`, t, []);
      continue;
    }
    if (t.shape.length === 0) {
      put(name, t, []);
      continue;
    }
    const p = plain.slice(st.prefix.length);
    const L = t.shape[0]!;
    if (L !== st.layers && !MEGATRON_IGNORED.some((r) => r.pattern.test(name))) {
      throw badInput(`${stored}: holds ${L} layers but the config has ${st.layers}`, src.path, stored);
    }
    const ex = /^(.*?)mlp\.experts\.experts\.(?:(\d+)\.)?(.+)$/.exec(p);
    for (let i = 0; i < L; i++) {
      if (!ex) put(`${st.prefix}${i}.${p}`, t, [i]);
      else if (ex[2] !== undefined) put(`${st.prefix}${i}.${ex[1]}mlp.experts.local_experts.${ex[2]}.${ex[3]}`, t, [i]);
      else for (let e = 0; e < (t.shape[1] ?? 0); e++) put(`${st.prefix}${i}.${ex[1]}mlp.experts.local_experts.${e}.${ex[3]}`, t, [i, e]);
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
      const merged: SourceTensor = { name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, where: t.describe, read: (b, o) => produceBox(t, b, o) };
      for (const p of sp.parts) out.delete(`${name}.${p.suffix}`);
      out.set(name, { part: { src: merged, prefix: [] }, origin: have[0]!.origin, alsoFrom: have.slice(1).map((p) => p.origin) });
    }
  }
  return out;
}
