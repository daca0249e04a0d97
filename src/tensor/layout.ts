/**
 * Where a tensor's bytes are, and how to gather any box of it into a contiguous buffer.
 *
 * Every format describes a tensor as one or more *pieces*: a box of the global tensor and a
 * strided view over a byte source holding it. safetensors has one contiguous piece; torch.save
 * has one piece with arbitrary strides (views, transposes, shared storages); DCP and Megatron
 * have one piece per saved chunk. Reading a box intersects it with each piece and copies the
 * overlap, reading straight into the destination when both sides are contiguous.
 */
import type { ByteSource } from '../io/file.js';
import { dtypeInfo, itemSize, numelOf, type DType } from './dtype.js';
import { badInput, unsupported } from '../util/errors.js';

/** A rectangular region of a tensor: `start[d] ≤ i[d] < start[d] + size[d]` for every dim. */
export interface Box {
  readonly start: readonly number[];
  readonly size: readonly number[];
}

export interface Piece {
  /** The region of the global tensor this piece holds. */
  readonly box: Box;
  readonly file: ByteSource;
  /** Byte position in `file` of the piece's first element (local index 0,…,0). */
  readonly byteOffset: number;
  /** Element strides of the piece's own dims (C-contiguous for most formats). */
  readonly strides: readonly number[];
}

export function wholeBox(shape: readonly number[]): Box {
  return { start: shape.map(() => 0), size: [...shape] };
}

export function contiguousStrides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    s[d] = acc;
    acc *= shape[d]!;
  }
  return s;
}

export function boxNumel(box: Box): number {
  return numelOf(box.size);
}

export function intersect(a: Box, b: Box): Box | undefined {
  const start: number[] = [];
  const size: number[] = [];
  for (let d = 0; d < a.start.length; d++) {
    const lo = Math.max(a.start[d]!, b.start[d]!);
    const hi = Math.min(a.start[d]! + a.size[d]!, b.start[d]! + b.size[d]!);
    if (hi <= lo) return undefined;
    start.push(lo);
    size.push(hi - lo);
  }
  return { start, size };
}

/** True when the strides describe a dense C-order layout of `shape` (size-1 dims are free). */
export function isContiguous(shape: readonly number[], strides: readonly number[]): boolean {
  let expect = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    if (shape[d] !== 1 && strides[d] !== expect) return false;
    expect *= shape[d]!;
  }
  return true;
}

/** Largest element offset a strided view can touch, plus one (0 for an empty view). */
export function stridedExtent(shape: readonly number[], strides: readonly number[]): number {
  if (shape.some((s) => s === 0)) return 0;
  let max = 0;
  for (let d = 0; d < shape.length; d++) max += (shape[d]! - 1) * strides[d]!;
  return max + 1;
}

/**
 * Checks that pieces tile the tensor exactly: each inside the tensor, no two overlapping, and
 * their volumes adding up to the tensor's. Overlap is tested pairwise, which is fine for the
 * piece counts real checkpoints have (one per saved shard).
 */
export function checkTiling(name: string, shape: readonly number[], boxes: readonly Box[], file: string): void {
  const total = numelOf(shape);
  let sum = 0;
  for (const b of boxes) {
    if (b.start.length !== shape.length || b.size.length !== shape.length) {
      throw badInput(`${name}: a chunk has ${b.start.length} dims but the tensor has ${shape.length}`, file, name);
    }
    for (let d = 0; d < shape.length; d++) {
      if (b.start[d]! < 0 || b.size[d]! < 0 || b.start[d]! + b.size[d]! > shape[d]!) {
        throw badInput(
          `${name}: chunk at [${b.start.join(', ')}] of size [${b.size.join(', ')}] lies outside the tensor's shape [${shape.join(', ')}]`,
          file,
          name,
        );
      }
    }
    sum += numelOf(b.size);
  }
  if (boxes.length <= 4096) {
    for (let i = 0; i < boxes.length; i++) {
      for (let j = i + 1; j < boxes.length; j++) {
        const x = intersect(boxes[i]!, boxes[j]!);
        if (x && boxNumel(x) > 0) {
          throw badInput(`${name}: chunks at [${boxes[i]!.start.join(', ')}] and [${boxes[j]!.start.join(', ')}] overlap`, file, name);
        }
      }
    }
  }
  if (sum !== total) {
    throw badInput(`${name}: chunks cover ${sum} of the tensor's ${total} elements (a shard is missing?)`, file, name);
  }
}

export interface ReadOptions {
  /** Largest span read into a scratch buffer to serve a strided copy (bytes). */
  maxStage?: number;
}

/**
 * A strided copy reads windows of at most this many bytes of the source into a scratch buffer
 * (or run by run where the runs are long): the extra memory of a read is bounded whatever the
 * box, so many reads in flight stay within the budget.
 */
const DEFAULT_MAX_STAGE = 1 << 20;
/** Runs at least this long are read one by one (a syscall each is cheaper than staging what lies between them). */
const LONG_RUN = 16 << 10;

/**
 * Gathers `box` of a tensor stored as `pieces` into `out` (C-order, `boxNumel(box)` elements).
 * The pieces must tile the tensor (checked when the source was opened).
 */
export async function readBox(
  tensorName: string,
  dtype: DType,
  shape: readonly number[],
  pieces: readonly Piece[],
  box: Box,
  out: Uint8Array,
  opts: ReadOptions = {},
): Promise<void> {
  for (let d = 0; d < shape.length; d++) {
    if (box.start[d]! < 0 || box.size[d]! < 0 || box.start[d]! + box.size[d]! > shape[d]!) {
      throw new RangeError(`${tensorName}: box outside shape [${shape.join(', ')}]`);
    }
  }
  const item = itemSize(dtype);
  if (item === undefined) return readSubByte(tensorName, dtype, shape, pieces, box, out);
  const n = boxNumel(box);
  if (out.length < n * item) throw new RangeError(`${tensorName}: output buffer too small`);
  if (n === 0) return;
  const outStrides = contiguousStrides(box.size);
  for (const p of pieces) {
    const x = intersect(p.box, box);
    if (!x) continue;
    await copyRegion(p, x, item, out, box, outStrides, opts.maxStage ?? DEFAULT_MAX_STAGE);
  }
}

interface Run {
  src: number; // byte position in the piece's file
  dst: number; // byte position in out
}

/** Copies region `x` (global coords) of piece `p` into `out`, which holds `outBox`. */
async function copyRegion(
  p: Piece,
  x: Box,
  item: number,
  out: Uint8Array,
  outBox: Box,
  outStrides: readonly number[],
  maxStage: number,
): Promise<void> {
  const nd = x.size.length;
  // Fold the innermost dims into one run while both sides are dense across them.
  let runElems = 1;
  let inner = nd; // dims [inner, nd) are folded into the run
  while (inner > 0) {
    const d = inner - 1;
    const srcDense = p.strides[d] === runElems || x.size[d] === 1;
    const dstDense = outStrides[d] === runElems || x.size[d] === 1;
    if (!srcDense || !dstDense) break;
    runElems *= x.size[d]!;
    inner = d;
    // A dim only partly covered ends the fold: the next outer dim would not be dense.
    if (x.size[d] !== p.box.size[d] || x.size[d] !== outBox.size[d]) break;
  }
  const runBytes = runElems * item;
  const runs: Run[] = [];
  const idx = new Array<number>(inner).fill(0);
  const srcBase = p.byteOffset;
  for (;;) {
    let src = 0;
    let dst = 0;
    for (let d = 0; d < nd; d++) {
      const i = d < inner ? idx[d]! : 0;
      src += (x.start[d]! - p.box.start[d]! + i) * p.strides[d]!;
      dst += (x.start[d]! - outBox.start[d]! + i) * outStrides[d]!;
    }
    runs.push({ src: srcBase + src * item, dst: dst * item });
    let d = inner - 1;
    while (d >= 0) {
      idx[d]!++;
      if (idx[d]! < x.size[d]!) break;
      idx[d] = 0;
      d--;
    }
    if (d < 0) break;
  }
  if (runs.length === 1) {
    const r = runs[0]!;
    await p.file.read(r.src, runBytes, out.subarray(r.dst, r.dst + runBytes));
    return;
  }
  // In source order: windows of short runs staged (one read each, at most `maxStage` bytes), long
  // runs — and runs adjacent on both sides, merged — read straight into `out`.
  runs.sort((a, b) => a.src - b.src);
  let stage: Uint8Array | undefined;
  for (let i = 0; i < runs.length; ) {
    let j = i + 1;
    if (runBytes < LONG_RUN) {
      const lo = runs[i]!.src;
      while (j < runs.length && runs[j]!.src + runBytes - lo <= maxStage) j++;
      if (j - i > 1) {
        const span = runs[j - 1]!.src + runBytes - lo;
        stage = stage && stage.length >= span ? stage : new Uint8Array(Math.min(maxStage, Math.max(span, runBytes)));
        await p.file.read(lo, span, stage.subarray(0, span));
        for (let k = i; k < j; k++) out.set(stage.subarray(runs[k]!.src - lo, runs[k]!.src - lo + runBytes), runs[k]!.dst);
        i = j;
        continue;
      }
    }
    while (j < runs.length && runs[j]!.src === runs[j - 1]!.src + runBytes && runs[j]!.dst === runs[j - 1]!.dst + runBytes) j++;
    const len = (j - i) * runBytes;
    await p.file.read(runs[i]!.src, len, out.subarray(runs[i]!.dst, runs[i]!.dst + len));
    i = j;
  }
}

/** Sub-byte dtypes (F4, F6_*): only whole, byte-aligned, contiguous ranges can be moved. */
async function readSubByte(
  name: string,
  dtype: DType,
  shape: readonly number[],
  pieces: readonly Piece[],
  box: Box,
  out: Uint8Array,
): Promise<void> {
  const bits = dtypeInfo(dtype).bits;
  const p = pieces[0];
  const strides = contiguousStrides(shape);
  // The box must be a flat range: full in every dim after the first partial one.
  let first = 0;
  while (first < shape.length && box.size[first] === 1) first++;
  for (let d = first + 1; d < shape.length; d++) {
    if (box.start[d] !== 0 || box.size[d] !== shape[d]) {
      throw unsupported(`${name}: ${dtype} packs ${bits}-bit elements; only whole rows of it can be moved`, p?.file.name, name);
    }
  }
  const flatStart = box.start.reduce((acc, s, d) => acc + s * strides[d]!, 0);
  const count = boxNumel(box);
  if (
    pieces.length !== 1 || !p || !isContiguous(p.box.size, p.strides) || p.box.size.some((s, d) => s !== shape[d]) ||
    (flatStart * bits) % 8 !== 0 || (count * bits) % 8 !== 0
  ) {
    throw unsupported(`${name}: slicing ${dtype} here would split a byte (${bits}-bit elements); shardshift moves ${dtype} only as whole bytes`, p?.file.name, name);
  }
  const len = (count * bits) / 8;
  await p.file.read(p.byteOffset + (flatStart * bits) / 8, len, out.subarray(0, len));
}
