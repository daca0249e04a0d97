/**
 * Builds the lazy target tensors of an HF → Megatron or Megatron → HF conversion from a family's
 * parameter map, on *canonical* Megatron names (per layer, global expert index; see spec.ts),
 * checking completeness both ways: every source tensor is used or skipped by a named rule, every
 * target tensor is produced, and every shape matches the config.
 */
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import type { DcpTensorEntry } from '../formats/dcp.js';
import type { DType } from '../tensor/dtype.js';
import { badInput } from '../util/errors.js';
import { allRows, castTo, rowConcat, rows, zeroRows, type RowSegment, produceBox } from '../lazy/expr.js';
import { paddedVocab, type ModelConfig } from '../models/config.js';
import { HF_IGNORED, MEGATRON_IGNORED } from '../models/dense.js';
import { familyOf } from '../models/registry.js';
import type { Family, LayerParam, Precision, PrecisionRule, SourcePart } from '../models/spec.js';
import { canonicalMegatron, torchDistEntries } from './megatron-keys.js';
import { targetView } from '../lazy/view.js';
import { TRANSPOSE } from '../models/transposed.js';

export interface Skipped {
  readonly name: string;
  readonly reason: string;
  /**
   * The tensor held model data the output now lacks (an unmapped tensor, a dropped MTP layer):
   * always reported. False for what a consumer regenerates or never needs (optimizer and RNG
   * state, TransformerEngine extra state, a tied copy), reported only when asked (--verbose).
   */
  readonly carriesData: boolean;
}

/** A target stored in another dtype than the one asked for, and why (a family's precision rule). */
export interface DtypeException {
  readonly name: string;
  readonly dtype: DType;
  readonly reason: string;
}

/** The dtype a parameter is stored in on one side: `requested`, unless its rule keeps float32 (spec.ts `Precision`). */
export function precisionDtype(requested: DType, source: DType, rule: Precision | undefined): DType {
  if (requested === 'F32' || requested === 'F64' || rule === undefined) return requested;
  if (rule === 'fp32') return 'F32';
  if (rule === 'fp32-with-fp16') return requested === 'F16' ? 'F32' : requested;
  return source === 'F32' ? 'F32' : requested;
}

/** The dtype most of a checkpoint's bytes are in (its weights' dtype, whatever a few tensors keep). */
export function mainDtype(src: CheckpointSource): DType {
  const bytes = new Map<DType, number>();
  for (const t of src.tensors.values()) bytes.set(t.dtype, (bytes.get(t.dtype) ?? 0) + t.byteLength);
  let best: DType = 'BF16';
  let most = -1;
  for (const [d, n] of bytes) if (n > most) [best, most] = [d, n];
  return best;
}

/** Every layer of every stack (decoder, then the family's blocks) with its parameters and canonical prefix. */
function* layers(fam: Family, c: ModelConfig): Generator<{ readonly i: number; readonly prefix: string; readonly params: readonly LayerParam[] }> {
  for (let i = 0; i < c.numLayers; i++) yield { i, prefix: `decoder.layers.${i}.`, params: fam.layerParams(c, i) };
  for (const b of fam.blocks?.(c) ?? []) for (let i = 0; i < b.layers; i++) yield { i, prefix: `${b.prefix}${i}.`, params: b.params(i) };
}

/** `{i}` and `{e}` filled in. */
export function fill(template: string, i: number, e?: number): string {
  return template.replace('{i}', String(i)).replace('{e}', e === undefined ? '{e}' : String(e));
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, k) => d === b[k]);
}

function shapeError(t: SourceTensor, want: readonly number[], file: string): Error {
  return badInput(`${t.name}: shape [${t.shape.join(', ')}] does not match the config, which needs [${want.join(', ')}]`, file, t.name);
}

/** Row segments of a part (a whole tensor, or the sub-tensor at its prefix). */
function partRows(p: SourcePart, start: number, count: number): RowSegment {
  return rows(p.src, start, count, p.prefix);
}

/** The QKV interleave: per query group, its r query heads, its key head, its value head. */
function qkvSegments(c: ModelConfig, q: SourcePart, k: SourcePart, v: SourcePart): RowSegment[] {
  const hn = c.kvChannels;
  const r = c.numAttentionHeads / c.numQueryGroups;
  const segs: RowSegment[] = [];
  for (let g = 0; g < c.numQueryGroups; g++) segs.push(partRows(q, g * r * hn, r * hn), partRows(k, g * hn, hn), partRows(v, g * hn, hn));
  return segs;
}

/** The Megatron tensor of one parameter instance from its HF pieces. */
function toMegatron(c: ModelConfig, p: LayerParam, name: string, pieces: SourcePart[], describe: string): TargetTensor {
  const dtype = pieces[0]!.src.dtype;
  const mixed = pieces.find((x) => x.src.dtype !== dtype);
  if (mixed) throw badInput(`${mixed.src.name}: dtype ${mixed.src.dtype} differs from ${pieces[0]!.src.name} (${dtype})`, undefined, mixed.src.name);
  if (typeof p.kind === 'object') return p.kind.toMegatron(name, pieces, p.shape);
  const rest = p.shape.slice(1);
  const segs = p.kind === 'qkv' ? qkvSegments(c, pieces[0]!, pieces[1]!, pieces[2]!) : pieces.map((x) => partRows(x, 0, x.src.shape[x.prefix.length] ?? 1));
  return rowConcat(name, dtype, rest, segs, `${p.kind}(${describe})`);
}

/** The HF pieces of one parameter instance from its Megatron tensor. */
function toHf(c: ModelConfig, p: LayerParam, names: string[], src: SourcePart): TargetTensor[] {
  if (typeof p.kind === 'object') return p.kind.toHf(names, src, p.hfShapes);
  const at = src.prefix.length ? `[${src.prefix.join(', ')}]` : '';
  const rest = p.shape.slice(1);
  if (p.kind === 'copy') return [rowConcat(names[0]!, src.src.dtype, rest, [partRows(src, 0, p.shape[0] ?? 1)], `${src.src.name}${at}`)];
  if (p.kind === 'gated') {
    const F = p.shape[0]! / 2;
    return [
      rowConcat(names[0]!, src.src.dtype, rest, [partRows(src, 0, F)], `${src.src.name}${at} gate half`),
      rowConcat(names[1]!, src.src.dtype, rest, [partRows(src, F, F)], `${src.src.name}${at} up half`),
    ];
  }
  const hn = c.kvChannels;
  const r = c.numAttentionHeads / c.numQueryGroups;
  const groups = Array.from({ length: c.numQueryGroups }, (_, g) => g * (r + 2) * hn);
  return [
    rowConcat(names[0]!, src.src.dtype, rest, groups.map((b) => partRows(src, b, r * hn)), `${src.src.name}${at} query heads`),
    rowConcat(names[1]!, src.src.dtype, rest, groups.map((b) => partRows(src, b + r * hn, hn)), `${src.src.name}${at} key heads`),
    rowConcat(names[2]!, src.src.dtype, rest, groups.map((b) => partRows(src, b + (r + 1) * hn, hn)), `${src.src.name}${at} value heads`),
  ];
}

/** A rule that leaves source tensors out on purpose (listed in the plan as skipped). */
export interface SkipRule {
  readonly pattern: RegExp;
  readonly reason: string;
  /** See Skipped.carriesData. */
  readonly carriesData: boolean;
}

export interface ImportOptions {
  /** Skip source tensors the map has no place for (listed as skipped) instead of failing. */
  readonly allowUnmapped?: boolean;
  /** Source tensors left out on purpose (e.g. `--drop-mtp`). */
  readonly skip?: readonly SkipRule[];
  readonly tp: number;
  readonly makeVocabSizeDivisibleBy: number;
  readonly dtype: DType;
  /** torch_dist key names: TransformerEngine layer spec (default) or megatron-core's local spec. */
  readonly spec?: 'te' | 'local';
}

export interface ImportResult {
  /** Canonical per-layer Megatron targets (`decoder.layers.<i>.…`, global expert indices). */
  readonly targets: Map<string, TargetTensor>;
  /** The same as torch_dist entries (the family's keying: stacked layers and experts). */
  readonly entries: DcpTensorEntry[];
  readonly skipped: Skipped[];
  /** Targets stored in another dtype than `opts.dtype` (precision rules). */
  readonly dtypes: DtypeException[];
}

/** `t` cast to the dtype its rule gives on this side, noting it when that is not the requested one. */
function toStored(t: TargetTensor, requested: DType | 'keep', rule: PrecisionRule | undefined, side: 'hf' | 'megatron', notes: DtypeException[]): TargetTensor {
  if (requested === 'keep') return t;
  const d = precisionDtype(requested, t.dtype, rule?.[side]);
  if (d !== requested) notes.push({ name: t.name, dtype: d, reason: rule!.why });
  return castTo(t, d);
}

/** HF → Megatron. */
export function buildImport(c: ModelConfig, hf: CheckpointSource, opts: ImportOptions): ImportResult {
  const fam = familyOf(c);
  const file = hf.path;
  const used = new Set<string>();
  const missing: string[] = [];
  const get = (name: string, shape: readonly number[], expert?: number): SourcePart | undefined => {
    const t = hf.tensors.get(name);
    if (!t) {
      missing.push(name);
      return undefined;
    }
    used.add(name);
    // An expert piece without its own name is expert e of a tensor stacked over experts.
    if (expert !== undefined) {
      if (!sameShape(t.shape.slice(1), shape) || t.shape[0]! <= expert) throw shapeError(t, ['E', ...shape] as unknown as number[], file);
      return { src: t, prefix: [expert] };
    }
    if (!sameShape(t.shape, shape)) throw shapeError(t, shape, file);
    return { src: t, prefix: [] };
  };
  const targets = new Map<string, TargetTensor>();
  const dtypes: DtypeException[] = [];
  const copied: Skipped[] = [];
  const Vp = paddedVocab(c.vocabSize, opts.makeVocabSizeDivisibleBy, opts.tp);
  for (const g of fam.globalParams(c)) {
    if (g.kind === 'transpose') {
      const src = get(g.hf, [g.shape[1]!, g.shape[0]!]);
      if (src) targets.set(g.megatron, toStored(TRANSPOSE.toMegatron(g.megatron, [src], g.shape), opts.dtype, g.precision, 'megatron', dtypes));
      continue;
    }
    const src = get(g.hf, g.shape);
    if (!src) continue;
    const pad = g.kind === 'vocab' && Vp > c.vocabSize;
    const segs = [allRows(src.src), ...(pad ? [zeroRows(Vp - c.vocabSize)] : [])];
    targets.set(g.megatron, toStored(rowConcat(g.megatron, src.src.dtype, g.shape.slice(1), segs, `${g.hf}${pad ? ` + ${Vp - c.vocabSize} zero rows` : ''}`), opts.dtype, g.precision, 'megatron', dtypes));
    // Copies Megatron keeps once (absent from checkpoints transformers saved): shape-checked, listed as skipped.
    for (const copy of g.hfCopies ?? []) {
      const t = hf.tensors.get(copy);
      if (!t) continue;
      if (!sameShape(t.shape, g.shape)) throw shapeError(t, g.shape, file);
      used.add(copy);
      copied.push({ name: copy, reason: `a copy of ${g.hf} (Megatron keeps one ${g.megatron}; the export writes the copy back from it)`, carriesData: true });
    }
  }
  for (const { i, prefix, params } of layers(fam, c)) {
    for (const p of params) {
      for (const e of p.experts === undefined ? [undefined] : Array.from({ length: p.experts }, (_, k) => k)) {
        const names = p.hf.map((h) => fill(h, i, e));
        const pieces = names.map((n, k) => get(n, p.hfShapes[k]!, e !== undefined && !p.hf[k]!.includes('{e}') ? e : undefined));
        if (pieces.some((s) => !s)) continue;
        const name = `${prefix}${fill(p.megatron, i, e)}`;
        const described = names.map((n, k) => (pieces[k]!.prefix.length ? `${n}[${e}]` : n)).join(', ');
        targets.set(name, toStored(toMegatron(c, p, name, pieces as SourcePart[], described), opts.dtype, p.precision, 'megatron', dtypes));
      }
    }
  }
  if (missing.length) {
    throw badInput(`${file}: ${missing.length} tensor(s) the config needs are missing: ${missing.slice(0, 8).join(', ')}${missing.length > 8 ? ', …' : ''}`, file, missing[0]);
  }
  const skipped: Skipped[] = [...copied];
  const unmapped: string[] = [];
  const tiedHead = c.tieEmbeddings ? fam.globalParams({ ...c, tieEmbeddings: false }).find((g) => g.megatron === 'output_layer.weight')?.hf : undefined;
  for (const name of hf.tensors.keys()) {
    if (used.has(name)) continue;
    const rule = [...(opts.skip ?? []), ...HF_IGNORED].find((r) => r.pattern.test(name));
    if (rule) skipped.push({ name, reason: rule.reason, carriesData: rule.carriesData });
    else if (name === tiedHead) skipped.push({ name, reason: 'tied to the input embedding', carriesData: false });
    else unmapped.push(name);
  }
  if (unmapped.length && opts.allowUnmapped) for (const name of unmapped) skipped.push({ name, reason: 'not mapped (--allow-unmapped)', carriesData: true });
  else if (unmapped.length) {
    throw badInput(`${file}: ${unmapped.length} tensor(s) have no place in a ${c.family} Megatron model: ${unmapped.slice(0, 8).join(', ')}${unmapped.length > 8 ? ', …' : ''} (--allow-unmapped skips them)`, file, unmapped[0]);
  }
  return { targets, entries: torchDistEntries(fam, c, targets, opts.dtype, opts.spec), skipped, dtypes };
}

export interface ExportOptions {
  readonly allowUnmapped?: boolean;
  /** Source tensors left out on purpose (e.g. `--drop-mtp`). */
  readonly skip?: readonly SkipRule[];
  /** The requested HF dtype (precision rules may keep some tensors float32), or `keep` every stored dtype. */
  readonly dtype: DType | 'keep';
}

/** An HF tensor stacked over experts (`[E, …]`) from per-expert targets. */
function stackExperts(name: string, parts: readonly TargetTensor[]): TargetTensor {
  const first = parts[0]!;
  const asSources: SourceTensor[] = parts.map((t) => ({ name: t.name, dtype: t.dtype, shape: [1, ...t.shape], byteLength: t.byteLength, where: t.describe, read: (b, o) => produceBox(t, { start: b.start.slice(1), size: b.size.slice(1) }, o) }));
  return rowConcat(name, first.dtype, first.shape, asSources.map((s) => allRows(s)), `stack of ${parts.length} experts (${first.describe}, …)`);
}

/** Megatron → HF. */
export function buildExport(c: ModelConfig, meg: CheckpointSource, opts: ExportOptions): { tensors: TargetTensor[]; skipped: Skipped[]; dtypes: DtypeException[] } {
  const fam: Family = familyOf(c);
  const file = meg.path;
  const view = canonicalMegatron(meg, c, fam);
  const used = new Set<string>();
  const missing: string[] = [];
  const out: TargetTensor[] = [];
  const dtypes: DtypeException[] = [];
  const find = (names: readonly string[]): SourcePart | undefined => {
    for (const n of names) {
      const v = view.get(n);
      if (v) {
        used.add(v.origin);
        for (const o of v.alsoFrom ?? []) used.add(o);
        return v.part;
      }
    }
    missing.push(names[0]!);
    return undefined;
  };
  const expect = (p: SourcePart, want: readonly number[]): void => {
    const have = p.src.shape.slice(p.prefix.length);
    if (!sameShape(have, want)) {
      const stacked = p.prefix.length ? `[${p.src.shape.slice(0, p.prefix.length).join(', ')}, ${want.join(', ')}]` : `[${want.join(', ')}]`;
      throw badInput(`${p.src.name}: shape [${p.src.shape.join(', ')}] does not match the config, which needs ${stacked}`, file, p.src.name);
    }
  };
  for (const g of fam.globalParams(c)) {
    const src = find([g.megatron]);
    if (!src) continue;
    if (g.kind === 'vocab') {
      const s = src.src;
      if (s.shape.length !== 2 || s.shape[1] !== c.hiddenSize || s.shape[0]! < c.vocabSize) {
        throw badInput(`${s.name}: shape [${s.shape.join(', ')}] cannot hold the ${c.vocabSize}-token vocabulary with hidden size ${c.hiddenSize}`, file, s.name);
      }
      // Megatron pads the vocabulary; HF has exactly vocab_size rows.
      out.push(toStored(rowConcat(g.hf, s.dtype, [c.hiddenSize], [rows(s, 0, c.vocabSize)], `${s.name}[:${c.vocabSize}]`), opts.dtype, g.precision, 'hf', dtypes));
    } else if (g.kind === 'transpose') {
      expect(src, g.shape);
      out.push(toStored(TRANSPOSE.toHf([g.hf], src, [[g.shape[1]!, g.shape[0]!]])[0]!, opts.dtype, g.precision, 'hf', dtypes));
    } else {
      expect(src, g.shape);
      out.push(toStored(rowConcat(g.hf, src.src.dtype, g.shape.slice(1), [partRows(src, 0, g.shape[0] ?? 1)], src.src.name), opts.dtype, g.precision, 'hf', dtypes));
    }
    const main = out[out.length - 1]!;
    for (const copy of g.hfCopies ?? []) out.push(targetView(main, { name: copy, describe: `${main.describe} (copy for ${copy})` }));
  }
  for (const { i, prefix, params } of layers(fam, c)) {
    for (const p of params) {
      const experts = p.experts === undefined ? [undefined] : Array.from({ length: p.experts }, (_, k) => k);
      // HF pieces stacked over experts are assembled from every expert's part.
      const stacked = new Map<number, TargetTensor[]>();
      for (const e of experts) {
        const names = [p.megatron, ...(p.aliases ?? [])].map((m) => `${prefix}${fill(m, i, e)}`);
        const src = find(names);
        if (!src) continue;
        expect(src, p.shape);
        const hfNames = p.hf.map((h) => fill(h, i, e));
        const pieces = toHf(c, p, hfNames, src);
        pieces.forEach((t, k) => {
          if (e !== undefined && !p.hf[k]!.includes('{e}')) stacked.set(k, [...(stacked.get(k) ?? []), t]);
          else out.push(toStored(t, opts.dtype, p.precision, 'hf', dtypes));
        });
      }
      for (const [k, parts] of stacked) if (parts.length === p.experts) out.push(toStored(stackExperts(fill(p.hf[k]!, i), parts), opts.dtype, p.precision, 'hf', dtypes));
    }
  }
  if (missing.length) {
    throw badInput(`${file}: ${missing.length} tensor(s) the config needs are missing: ${missing.slice(0, 8).join(', ')}${missing.length > 8 ? ', …' : ''}`, file, missing[0]);
  }
  const skipped: Skipped[] = [];
  const unmapped: string[] = [];
  for (const name of meg.tensors.keys()) {
    if (used.has(name)) continue;
    const rule = [...(opts.skip ?? []), ...MEGATRON_IGNORED].find((r) => r.pattern.test(name));
    if (rule) skipped.push({ name, reason: rule.reason, carriesData: rule.carriesData });
    else unmapped.push(name);
  }
  for (const name of meg.objects.keys()) {
    const rule = MEGATRON_IGNORED.find((r) => r.pattern.test(name));
    skipped.push({ name, reason: rule?.reason ?? 'non-tensor entry', carriesData: rule?.carriesData ?? false });
  }
  if (unmapped.length && opts.allowUnmapped) for (const name of unmapped) skipped.push({ name, reason: 'not mapped (--allow-unmapped)', carriesData: true });
  else if (unmapped.length) {
    throw badInput(`${file}: ${unmapped.length} tensor(s) have no place in a ${c.family} HF model: ${unmapped.slice(0, 8).join(', ')}${unmapped.length > 8 ? ', …' : ''} (--allow-unmapped skips them)`, file, unmapped[0]);
  }
  return { tensors: out, skipped, dtypes };
}

/**
 * How a family's `linear_fc1` tensors are fused, over every layer and block: all `[gate; up]`
 * ('gated'), all plain ('plain'), both ('mixed'), or no fc1 at all ('none'). Megatron records one
 * `swiglu` flag for the whole model, and the legacy reader splits fc1 over TP by that flag alone.
 */
export function fc1Gating(fam: Family, c: ModelConfig): 'gated' | 'plain' | 'mixed' | 'none' {
  const params = [...Array.from({ length: c.numLayers }, (_, i) => fam.layerParams(c, i)), ...(fam.blocks?.(c) ?? []).flatMap((b) => Array.from({ length: b.layers }, (_, i) => b.params(i)))].flat();
  const fc1 = params.filter((p) => /(^|\.)linear_fc1\.weight/.test(p.megatron));
  const gated = fc1.filter((p) => p.kind === 'gated' || p.gateUp).length;
  return fc1.length === 0 ? 'none' : gated === fc1.length ? 'gated' : gated === 0 ? 'plain' : 'mixed';
}

/**
 * Whether the canonical Megatron tensor `name` (`decoder.layers.<i>.…`, a block's `<prefix><i>.…`,
 * experts by global index, TE or local-spec names) is a `[gate; up]` fusion in the family's table
 * — how legacy rank files split it over TP. Per layer, from the same parameter lists the maps use.
 */
export function gateUpTest(c: ModelConfig): (name: string) => boolean {
  const fam = familyOf(c);
  const wrap = fam.megatronPrefix?.(c)?.prefix ?? '';
  const stacks: Array<{ prefix: string; params: (i: number) => readonly LayerParam[] }> = [
    { prefix: 'decoder.layers.', params: (i) => fam.layerParams(c, i) },
    ...(fam.blocks?.(c) ?? []).map((b) => ({ prefix: b.prefix, params: (i: number) => b.params(i) })),
  ];
  const cache = new Map<string, readonly RegExp[]>();
  const fused = (prefix: string, i: number, params: (i: number) => readonly LayerParam[]): readonly RegExp[] => {
    const key = `${prefix}${i}`;
    let res = cache.get(key);
    if (!res) {
      res = params(i)
        .filter((p) => p.kind === 'gated' || p.gateUp)
        .flatMap((p) => [p.megatron, ...(p.aliases ?? [])])
        .map((m) => new RegExp(`^${m.replace(/[.]/g, '\\.').replace('{e}', '\\d+')}$`));
      cache.set(key, res);
    }
    return res;
  };
  return (name) => {
    const n = wrap && name.startsWith(wrap) ? name.slice(wrap.length) : name;
    for (const s of stacks) {
      if (!n.startsWith(s.prefix)) continue;
      const m = /^(\d+)\.(.+)$/.exec(n.slice(s.prefix.length));
      if (m) return fused(s.prefix, Number(m[1]), s.params).some((re) => re.test(m[2]!));
    }
    return false;
  };
}
