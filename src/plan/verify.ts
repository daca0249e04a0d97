/**
 * `verify` and `diff`: proving what was written.
 *
 * verify checks an output against its own manifest (every file's size and SHA-256), against the
 * model config it declares (every expected tensor present, right dtype and shape), for NaN/Inf,
 * and — with a source — that every output tensor equals its mapping of the source (bit-exact for
 * layout moves). diff compares two checkpoints of any formats, mapping one onto the other's names
 * through the model map when they differ (HF ↔ Megatron), and reports per-tensor differences.
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { openCheckpoint } from '../checkpoints/registry.js';
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import type { DcpTensorEntry } from '../formats/dcp.js';
import { openMegatron } from '../megatron/checkpoint.js';
import { dtypeInfo, itemSize, numelOf, type DType } from '../tensor/dtype.js';
import { canCast, castBytes } from '../tensor/cast.js';
import type { Box } from '../tensor/layout.js';
import { chunkBoxes } from '../exec/executor.js';
import { MANIFEST_NAME, type Manifest } from '../exec/manifest.js';
import { buildExport, buildImport, mainDtype } from '../bridge/map.js';
import { configFromHfDir, withHfLayout } from '../bridge/megatron-config.js';
import { produceBox } from '../lazy/expr.js';
import { readTextFile } from '../io/file.js';

const CHUNK = 16 << 20;

/** Anything with a dtype, shape and a way to read boxes. */
interface Readable {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
}
type ReadFn = (box: Box, out: Uint8Array) => Promise<void>;

function readerOf(t: SourceTensor | TargetTensor): ReadFn {
  return 'read' in t ? (b, o) => t.read(b, o) : (b, o) => produceBox(t, b, o);
}

function boxBytes(d: DType, b: Box): number {
  return (numelOf(b.size) * dtypeInfo(d).bits) / 8;
}

/** Floating types whose NaN/Inf we can count (via an exact widening to f32). */
function widenable(d: DType): boolean {
  return d === 'F32' || (canCast(d, 'F32') && dtypeInfo(d).float);
}

export interface NonFinite {
  readonly nan: number;
  readonly inf: number;
}

export async function countNonFinite(t: Readable, read: ReadFn): Promise<NonFinite> {
  if (!widenable(t.dtype)) return { nan: 0, inf: 0 };
  let nan = 0;
  let inf = 0;
  for (const b of chunkBoxes(t, CHUNK)) {
    const raw = new Uint8Array(boxBytes(t.dtype, b));
    await read(b, raw);
    const f = t.dtype === 'F32' ? raw : castBytes(raw, t.dtype, 'F32');
    const v = new Float32Array(f.buffer, f.byteOffset, f.byteLength / 4);
    for (let i = 0; i < v.length; i++) {
      const x = v[i]!;
      if (x !== x) nan++;
      else if (x === Infinity || x === -Infinity) inf++;
    }
  }
  return { nan, inf };
}

export interface TensorDiff {
  readonly name: string;
  readonly equal: boolean;
  /** Elements whose bits differ. */
  readonly differing: number;
  readonly maxAbs: number;
  /** Largest distance in units in the last place of the compared dtype (floats only). */
  readonly maxUlp: number;
  readonly note?: string;
}

/** Orders the bits of a float so that adjacent representable values differ by 1. */
function ordered(bits: number, width: number): number {
  const sign = 2 ** (width - 1);
  return bits >= sign ? sign - 1 - (bits - sign) - sign + 1 : bits + sign;
}

function bitsAt(raw: Uint8Array, i: number, item: number): number {
  let v = 0;
  for (let k = item - 1; k >= 0; k--) v = v * 256 + raw[i * item + k]!;
  return v;
}

/** Compares two tensors of the same shape box by box (b cast to a's dtype when they differ). */
export async function compareTensors(name: string, a: Readable, readA: ReadFn, b: Readable, readB: ReadFn): Promise<TensorDiff> {
  if (a.shape.length !== b.shape.length || a.shape.some((d, i) => d !== b.shape[i])) {
    return { name, equal: false, differing: numelOf(a.shape), maxAbs: Infinity, maxUlp: Infinity, note: `shape [${a.shape.join(', ')}] vs [${b.shape.join(', ')}]` };
  }
  const item = itemSize(a.dtype);
  if (item === undefined) return { name, equal: false, differing: 0, maxAbs: 0, maxUlp: 0, note: `cannot compare ${a.dtype}` };
  if (a.dtype !== b.dtype && !canCast(b.dtype, a.dtype)) {
    return { name, equal: false, differing: numelOf(a.shape), maxAbs: Infinity, maxUlp: Infinity, note: `dtype ${a.dtype} vs ${b.dtype}` };
  }
  const isFloat = widenable(a.dtype) && item <= 4;
  let differing = 0;
  let maxAbs = 0;
  let maxUlp = 0;
  for (const box of chunkBoxes(a, CHUNK)) {
    const ra = new Uint8Array(boxBytes(a.dtype, box));
    await readA(box, ra);
    const rbRaw = new Uint8Array(boxBytes(b.dtype, box));
    await readB(box, rbRaw);
    const rb = a.dtype === b.dtype ? rbRaw : castBytes(rbRaw, b.dtype, a.dtype);
    if (Buffer.from(ra.buffer, ra.byteOffset, ra.length).equals(Buffer.from(rb.buffer, rb.byteOffset, rb.length))) continue;
    const n = ra.length / item;
    const fa = isFloat ? (a.dtype === 'F32' ? ra : castBytes(ra, a.dtype, 'F32')) : undefined;
    const fb = isFloat ? (a.dtype === 'F32' ? rb : castBytes(rb, a.dtype, 'F32')) : undefined;
    const va = fa ? new Float32Array(fa.buffer, fa.byteOffset, n) : undefined;
    const vb = fb ? new Float32Array(fb.buffer, fb.byteOffset, n) : undefined;
    for (let i = 0; i < n; i++) {
      const x = bitsAt(ra, i, item);
      const y = bitsAt(rb, i, item);
      if (x === y) continue;
      differing++;
      if (va && vb) {
        const d = Math.abs(va[i]! - vb[i]!);
        if (d > maxAbs || d !== d) maxAbs = d !== d ? Infinity : d;
        const u = Math.abs(ordered(x, item * 8) - ordered(y, item * 8));
        if (u > maxUlp) maxUlp = u;
      } else {
        const d = Math.abs(x - y);
        if (d > maxAbs) maxAbs = d;
      }
    }
  }
  return { name, equal: differing === 0, differing, maxAbs, maxUlp };
}

export interface VerifyReport {
  readonly path: string;
  readonly format: string;
  readonly checks: Array<{ check: string; ok: boolean; detail: string }>;
  readonly ok: boolean;
}

/** Where a verify or diff is: which stage, how many of its bytes are done, on which file or tensor. */
export interface CheckProgress {
  readonly stage: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly item: string;
}

/** Reports a stage's progress, at most every 100 ms (and at each item's end). */
function stageReporter(stage: string, total: number, onProgress: ((e: CheckProgress) => void) | undefined): { add(bytes: number, item: string, force?: boolean): void } {
  let done = 0;
  let last = 0;
  return {
    add: (bytes, item, force = false) => {
      done += bytes;
      const now = Date.now();
      if (!onProgress || (!force && now - last < 100)) return;
      last = now;
      onProgress({ stage, bytesDone: done, bytesTotal: total, item });
    },
  };
}

async function sha256Of(path: string, onBytes?: (n: number) => void): Promise<{ size: number; sha256: string }> {
  const h = createHash('sha256');
  let size = 0;
  for await (const c of createReadStream(path, { highWaterMark: 1 << 22 })) {
    h.update(c as Buffer);
    size += (c as Buffer).length;
    onBytes?.((c as Buffer).length);
  }
  return { size, sha256: h.digest('hex') };
}

/** Expected tensors (name → shape) of an HF directory's declared config, through the model map. */
async function expectedHfShapes(dir: string, out: CheckpointSource): Promise<Map<string, readonly number[]> | undefined> {
  if (!(await stat(join(dir, 'config.json')).then(() => true, () => false))) return undefined;
  let cfg;
  try {
    cfg = withHfLayout(await configFromHfDir(dir), out);
  } catch {
    return undefined; // not a model family we map: no config check
  }
  // Building the import plan from the output itself checks every name and shape against the config.
  const { entries } = buildImport(cfg, out, { tp: 1, makeVocabSizeDivisibleBy: 1, dtype: mainDtype(out) });
  void entries;
  return new Map([...out.tensors.values()].map((t) => [t.name, t.shape]));
}

export async function verifyOutput(path: string, opts: { against?: string; onProgress?: (e: CheckProgress) => void } = {}): Promise<VerifyReport> {
  const checks: VerifyReport['checks'] = [];
  const add = (check: string, ok: boolean, detail: string): void => {
    checks.push({ check, ok, detail });
  };
  // 1. The manifest's checksums.
  const manifestPath = join(path, MANIFEST_NAME);
  let manifest: Manifest | undefined;
  try {
    manifest = JSON.parse(await readTextFile(manifestPath)) as Manifest;
  } catch {
    add('manifest', false, `${manifestPath} is missing or unreadable`);
  }
  if (manifest) {
    const bad: string[] = [];
    const sums = stageReporter('checksums', Object.values(manifest.files).reduce((n, r) => n + (typeof r.size === 'number' ? r.size : 0), 0), opts.onProgress);
    for (const [rel, rec] of Object.entries(manifest.files)) {
      const got = await sha256Of(join(path, rel), (n) => sums.add(n, rel)).catch(() => undefined);
      sums.add(0, rel, true);
      if (!got) bad.push(`${rel} missing`);
      else if (got.size !== rec.size || got.sha256 !== rec.sha256) bad.push(`${rel} ${got.size !== rec.size ? `is ${got.size} bytes, manifest says ${rec.size}` : 'fails its SHA-256'}`);
    }
    add('manifest checksums', bad.length === 0, bad.length ? bad.join('; ') : `${Object.keys(manifest.files).length} files match`);
  }
  // 2. The tensors against the declared config.
  const isMegatron = await stat(join(path, 'latest_checkpointed_iteration.txt')).then(() => true, () => false);
  const out = isMegatron ? { ...(await openMegatron(path)).source, format: 'megatron' as const } : await openCheckpoint(path);
  try {
    if (isMegatron) {
      const hfDir = join((await openMegatronIterDir(path)), 'hf');
      try {
        const cfg = await configFromHfDir(hfDir);
        buildExport(cfg, out, { dtype: 'F32' });
        add('tensors match the config', true, `${cfg.family}: every expected Megatron tensor present with the right shape`);
      } catch (e) {
        add('tensors match the config', false, (e as Error).message);
      }
    } else {
      try {
        const shapes = await expectedHfShapes(out.root, out);
        add('tensors match the config', true, shapes ? 'every expected HF tensor present with the right shape' : 'no model config to check against (format-only output)');
      } catch (e) {
        add('tensors match the config', false, (e as Error).message);
      }
    }
    // 3. NaN / Inf (and, with a source, equality with its mapping).
    const src = opts.against ? await openAgainst(opts.against, out) : undefined;
    try {
      const nonFinite: string[] = [];
      const scan = stageReporter('NaN/Inf scan', [...out.tensors.values()].reduce((n, t) => n + t.byteLength, 0), opts.onProgress);
      for (const t of out.tensors.values()) {
        const nf = await countNonFinite(t, readerOf(t));
        scan.add(t.byteLength, t.name);
        if (nf.nan + nf.inf === 0) continue;
        const mapped = src?.get(t.name);
        const srcNf = mapped ? await countNonFinite(mapped, readerOf(mapped)) : undefined;
        if (!srcNf || srcNf.nan + srcNf.inf === 0) nonFinite.push(`${t.name} (${nf.nan} NaN, ${nf.inf} Inf)`);
      }
      add('no NaN/Inf the source did not have', nonFinite.length === 0, nonFinite.length ? nonFinite.slice(0, 8).join(', ') : 'none');
      if (src) {
        const diffs: string[] = [];
        let compared = 0;
        const cmp = stageReporter('comparing with the source', [...out.tensors.values()].reduce((n, t) => n + (src.has(t.name) ? t.byteLength : 0), 0), opts.onProgress);
        for (const t of out.tensors.values()) {
          const m = src.get(t.name);
          if (!m) continue;
          compared++;
          const d = await compareTensors(t.name, t, readerOf(t), m, readerOf(m));
          cmp.add(t.byteLength, t.name);
          if (!d.equal) diffs.push(`${t.name}: ${d.note ?? `${d.differing} elements differ (max ${d.maxUlp} ulp)`}`);
        }
        const unmatched = [...out.tensors.keys()].filter((n) => !src.has(n));
        add(
          'equal to the source\'s mapping',
          diffs.length === 0 && unmatched.length === 0,
          diffs.length || unmatched.length
            ? [...diffs.slice(0, 8), ...(unmatched.length ? [`${unmatched.length} output tensors have no source mapping (${unmatched.slice(0, 3).join(', ')})`] : [])].join('; ')
            : `${compared} tensors bit-identical to their mapping of ${opts.against}`,
        );
      }
    } finally {
      await src?.closeAll();
    }
  } finally {
    await out.close();
  }
  return { path, format: out.format, checks, ok: checks.every((c) => c.ok) };
}

async function openMegatronIterDir(path: string): Promise<string> {
  const m = await openMegatron(path);
  await m.source.close();
  return m.resolved.iterDir;
}

/**
 * The source's tensors under the output's names: the same names for format conversions, or the
 * model map for HF ↔ Megatron (chosen by which side is Megatron).
 */
async function openAgainst(srcPath: string, out: CheckpointSource): Promise<Map<string, SourceTensor | TargetTensor> & { closeAll(): Promise<void> }> {
  const srcIsMegatron = await stat(join(srcPath, 'latest_checkpointed_iteration.txt')).then(() => true, () => false)
    || (await stat(join(srcPath, 'metadata.json')).then(() => true, () => false) && (await stat(join(srcPath, '.metadata')).then(() => true, () => false)));
  const result = new Map<string, SourceTensor | TargetTensor>() as Map<string, SourceTensor | TargetTensor> & { closeAll(): Promise<void> };
  if (out.format === 'megatron' && !srcIsMegatron) {
    // HF source → Megatron output: compare global tensors with the import plan's.
    const src = await openCheckpoint(srcPath);
    const cfg = withHfLayout(await configFromHfDir(src.root), src);
    const emb = out.tensors.get('embedding.word_embeddings.weight');
    const Vp = emb?.shape[0] ?? cfg.vocabSize;
    // Pad to the output's row count (a divisor equal to it reproduces the same padding).
    // The output's keys say which layer spec named them (they differ for MoE pre-MLP norms).
    const keyed = (spec: 'te' | 'local'): ReturnType<typeof buildImport>['entries'] => buildImport(cfg, src, { tp: 1, makeVocabSizeDivisibleBy: Vp, dtype: emb?.dtype ?? 'BF16', spec }).entries;
    const te = keyed('te');
    const entries = te.every((e) => out.tensors.has(e.name)) ? te : keyed('local');
    for (const e of entries) {
      result.set(e.name, entryTarget(e));
    }
    result.closeAll = () => src.close();
    return result;
  }
  if (srcIsMegatron && out.format !== 'megatron') {
    const m = await openMegatron(srcPath);
    const refDir = join(m.resolved.iterDir, 'hf');
    const cfg = await configFromHfDir((await stat(join(out.root, 'config.json')).then(() => true, () => false)) ? out.root : refDir);
    const { tensors } = buildExport(cfg, m.source, { dtype: mainDtype(out) });
    for (const t of tensors) result.set(t.name, t);
    result.closeAll = () => m.source.close();
    return result;
  }
  const src = await openCheckpoint(srcPath);
  for (const t of src.tensors.values()) result.set(t.name, t);
  result.closeAll = () => src.close();
  return result;
}

export interface DiffReport {
  readonly a: string;
  readonly b: string;
  readonly tensors: TensorDiff[];
  readonly onlyInA: string[];
  readonly onlyInB: string[];
  readonly identical: boolean;
}

/**
 * A torch_dist entry as one target: any box is served chunk by chunk (chunks are boxes of the
 * global tensor, e.g. one per layer or per layer and expert), each intersection staged and
 * scattered into place.
 */
function entryTarget(e: DcpTensorEntry): TargetTensor {
  const item = dtypeInfo(e.dtype).bits / 8;
  return { kind: 'produced',
    name: e.name,
    dtype: e.dtype,
    shape: e.shape,
    byteLength: 0,
    describe: 'mapping',
    produce: async (box, out) => {
      for (const c of e.chunks) {
        const lo = box.start.map((s, d) => Math.max(s, c.offsets[d]!));
        const hi = box.start.map((s, d) => Math.min(s + box.size[d]!, c.offsets[d]! + c.tensor.shape[d]!));
        if (lo.some((l, d) => l >= hi[d]!)) continue;
        const size = lo.map((l, d) => hi[d]! - l);
        const tmp = new Uint8Array(numelOf(size) * item);
        await produceBox(c.tensor, { start: lo.map((l, d) => l - c.offsets[d]!), size }, tmp);
        scatter(tmp, size, out, box.size, lo.map((l, d) => l - box.start[d]!), item);
      }
    },
  };
}

/** Copies a dense block of shape `size` into a dense array of shape `into` at `at`. */
function scatter(src: Uint8Array, size: readonly number[], dst: Uint8Array, into: readonly number[], at: readonly number[], item: number): void {
  const n = size.length;
  const strides = new Array<number>(n).fill(item);
  for (let d = n - 2; d >= 0; d--) strides[d] = strides[d + 1]! * into[d + 1]!;
  const run = (size[n - 1] ?? 1) * item;
  const count = numelOf(size.slice(0, -1));
  const idx = new Array<number>(Math.max(0, n - 1)).fill(0);
  for (let k = 0; k < count; k++) {
    let off = n ? at[n - 1]! * item : 0;
    for (let d = 0; d < n - 1; d++) off += (at[d]! + idx[d]!) * strides[d]!;
    dst.set(src.subarray(k * run, (k + 1) * run), off);
    for (let d = n - 2; d >= 0; d--) {
      if (++idx[d]! < size[d]!) break;
      idx[d] = 0;
    }
  }
}

/** Compares two checkpoints; b is mapped onto a's names when one is Megatron and the other HF. */
export async function diffCheckpoints(aPath: string, bPath: string, opts: { onProgress?: (e: CheckProgress) => void } = {}): Promise<DiffReport> {
  const aIsMeg = await stat(join(aPath, 'latest_checkpointed_iteration.txt')).then(() => true, () => false);
  const a = aIsMeg ? { ...(await openMegatron(aPath)).source, format: 'megatron' as const } : await openCheckpoint(aPath);
  try {
    const b = await openAgainst(bPath, a);
    try {
      const tensors: TensorDiff[] = [];
      const cmp = stageReporter('comparing', [...a.tensors.values()].reduce((n, t) => n + (b.has(t.name) ? t.byteLength : 0), 0), opts.onProgress);
      for (const t of a.tensors.values()) {
        const m = b.get(t.name);
        if (!m) continue;
        tensors.push(await compareTensors(t.name, t, readerOf(t), m, readerOf(m)));
        cmp.add(t.byteLength, t.name);
      }
      const onlyInA = [...a.tensors.keys()].filter((n) => !b.has(n));
      const onlyInB = [...b.keys()].filter((n) => !a.tensors.has(n));
      return { a: aPath, b: bPath, tensors, onlyInA, onlyInB, identical: onlyInA.length === 0 && onlyInB.length === 0 && tensors.every((d) => d.equal) };
    } finally {
      await b.closeAll();
    }
  } finally {
    await a.close();
  }
}
