/**
 * The hub's MXFP4 expert pairs (`X_blocks`, `X_scales`) of a checkpoint read as the bf16 tensor
 * `X` transformers dequantises them to (the arithmetic and its proof: `tensor/mxfp4.ts`). The
 * view is lazy: a box reads only the blocks and scales of the rows and column blocks it covers,
 * and slices read into the executor's shared arena are dequantised on the task pool.
 */
import type { CheckpointSource } from './types.js';
import type { SourceTensor } from '../lazy/types.js';
import { badInput } from '../util/errors.js';
import { byteLength, numelOf } from '../tensor/dtype.js';
import type { Box } from '../tensor/layout.js';
import { poolThreads, poolWorthIt, runOnPool } from '../tensor/pool.js';
import { SLICE_BYTES, runMxfp4Rows, writeRows, type Mxfp4RowsTask } from '../tensor/mxfp4.js';

/** Reused shared staging buffers (SLICE_BYTES each): a fresh SharedArrayBuffer per slice piles up until a GC. */
const freeShared: SharedArrayBuffer[] = [];
function takeShared(n: number): Uint8Array {
  return new Uint8Array(freeShared.pop() ?? new SharedArrayBuffer(n));
}
function giveShared(b: Uint8Array): void {
  if (freeShared.length < 32) freeShared.push(b.buffer as SharedArrayBuffer);
}

/**
 * Where one slice is dequantised: on the task pool when it is large enough to pay for the trip,
 * else inline (in the same shared staging, so the caller does not care which).
 */
function dequantiseSlice(task: Mxfp4RowsTask): Promise<number> {
  return poolWorthIt(task.rows.length * task.cn * 2) ? runOnPool(task) : Promise.resolve(runMxfp4Rows(task));
}

/**
 * The lazy bf16 view `name` [E, 32G, R] of `blocks` [E, R, G, 16] and `scales` [E, R, G] — the
 * tensor transformers dequantises the pair to. Besides the `SourceTensor` read (a box of the
 * transposed view), `readPackedRows` reads whole rows of the untransposed [E, R, 32G] layout: the
 * Megatron experts are that layout (GPT-OSS's `linear_fc1`/`linear_fc2` are the transposes of
 * transformers' tensors), so the GPT-OSS mapping reads rows and never transposes twice.
 */
export class Mxfp4Tensor implements SourceTensor {
  readonly dtype = 'BF16' as const;
  readonly shape: readonly number[];
  readonly byteLength: number;
  readonly where: string;
  /** Leading (expert) dims, rows R, groups G of the packed layout. */
  private readonly lead: readonly number[];
  private readonly R: number;
  private readonly G: number;

  constructor(
    readonly name: string,
    private readonly blocks: SourceTensor,
    private readonly scales: SourceTensor,
    file?: string,
  ) {
    const bs = blocks.shape;
    const ss = scales.shape;
    if (blocks.dtype !== 'U8' || scales.dtype !== 'U8' || bs.length < 3 || bs[bs.length - 1] !== 16 || ss.length !== bs.length - 1 || ss.some((d, k) => d !== bs[k])) {
      throw badInput(
        `${blocks.name} (${blocks.dtype} [${bs.join(', ')}]) and ${scales.name} (${scales.dtype} [${ss.join(', ')}]) are not MXFP4 blocks and scales: blocks must be U8 [..., R, G, 16] and scales U8 [..., R, G]`,
        file,
        blocks.name,
      );
    }
    this.lead = bs.slice(0, -3);
    this.R = bs[bs.length - 3]!;
    this.G = bs[bs.length - 2]!;
    this.shape = [...this.lead, this.G * 32, this.R];
    this.byteLength = byteLength('BF16', numelOf(this.shape));
    this.where = `MXFP4 ${blocks.name} + ${scales.name}`;
  }

  /** The untransposed shape [..., R, 32G]: what `readPackedRows` reads rows of. */
  get packedShape(): readonly number[] {
    return [...this.lead, this.R, this.G * 32];
  }

  /**
   * Rows `rowOf(0) … rowOf(n − 1)` of the packed layout at leading index `at`, columns
   * `c0 … c0+cn`, as bf16 into `out` ([n, cn], row-major). Reads only the blocks and scales of
   * those rows' span and column groups, at most SLICE_BYTES of them at a time; rows are in any
   * order (GPT-OSS's de-interleave takes every other row).
   */
  async readPackedRows(at: readonly number[], n: number, rowOf: (i: number) => number, c0: number, cn: number, out: Uint8Array): Promise<void> {
    const g0 = Math.floor(c0 / 32);
    const gn = Math.ceil((c0 + cn) / 32) - g0;
    const span = Math.max(1, Math.floor(SLICE_BYTES / (gn * 17))); // 16 bytes of blocks + 1 scale per group
    const off = (c0 - g0 * 32) * 2;
    const one = at.map(() => 1);
    // Into the executor's shared arena, slices are dequantised on the pool while the next is read.
    // (Only the executor's arena is shared memory; any other `out` is filled inline.)
    const offload = out.buffer instanceof SharedArrayBuffer && poolThreads() > 0 ? dequantiseSlice : undefined;
    const pending: Array<Promise<number>> = [];
    // Two staging buffers per call: one being read while the pool dequantises the other.
    const staging: Array<{ raw: Uint8Array; busy?: Promise<number> }> = [];
    let turn = 0;
    let local: Uint8Array | undefined;
    try {
      for (let i = 0; i < n; ) {
        // The longest run of rows from i whose span fits the staging.
        let lo = rowOf(i);
        let hi = lo;
        let j = i + 1;
        for (; j < n; j++) {
          const r = rowOf(j);
          const nlo = Math.min(lo, r);
          const nhi = Math.max(hi, r);
          if (nhi - nlo + 1 > span) break;
          lo = nlo;
          hi = nhi;
        }
        const rk = hi - lo + 1;
        let raw: Uint8Array;
        if (offload) {
          const k = turn++ % 2;
          if (!staging[k]) staging[k] = { raw: takeShared(SLICE_BYTES) };
          if (staging[k]!.busy) await staging[k]!.busy;
          raw = staging[k]!.raw.subarray(0, rk * gn * 17);
        } else raw = (local ??= new Uint8Array(span * gn * 17));
        const blk = raw.subarray(0, rk * gn * 16);
        const sc = raw.subarray(rk * gn * 16, rk * gn * 17);
        await this.blocks.read({ start: [...at, lo, g0, 0], size: [...one, rk, gn, 16] }, blk);
        await this.scales.read({ start: [...at, lo, g0], size: [...one, rk, gn] }, sc);
        const dst = out.subarray(i * cn * 2, j * cn * 2);
        if (offload) {
          const rows = Int32Array.from({ length: j - i }, (_, x) => rowOf(i + x) - lo);
          const task = offload({ kind: 'mxfp4', raw: raw.buffer as SharedArrayBuffer, span: rk, groups: gn, rows, off, cn, out: out.buffer as SharedArrayBuffer, outOffset: dst.byteOffset });
          staging[(turn - 1) % 2]!.busy = task;
          pending.push(task);
        } else writeRows(blk, sc, gn, j - i, (x) => rowOf(i + x) - lo, off, cn, dst);
        i = j;
      }
    } catch (e) {
      // Every task settles before `out` is reused after a failure.
      await Promise.allSettled(pending);
      for (const b of staging) giveShared(b.raw);
      throw e;
    }
    // … and before `out` is handed on.
    const settled = await Promise.allSettled(pending);
    for (const b of staging) giveShared(b.raw);
    const bad = settled.find((r) => r.status === 'rejected');
    if (bad) throw (bad as PromiseRejectedResult).reason;
  }

  /** A box of the transposed view [..., 32G, R]. */
  async read(box: Box, out: Uint8Array): Promise<void> {
    const n = this.lead.length;
    const c0 = box.start[n]!;
    const cn = box.size[n]!;
    const r0 = box.start[n + 1]!;
    const rn = box.size[n + 1]!;
    const outer = numelOf(box.size.slice(0, n));
    // Rows a slice at a time so the staging stays at SLICE_BYTES whatever the box (the executor
    // has several boxes in flight and counts only their outputs).
    const rs = Math.max(1, Math.min(rn, Math.floor(SLICE_BYTES / (Math.max(1, cn) * 2))));
    const rowsBuf = new Uint8Array(rs * cn * 2);
    const rows16 = new Uint16Array(rowsBuf.buffer);
    const aligned = out.byteOffset % 2 === 0;
    const o16 = aligned ? new Uint16Array(out.buffer, out.byteOffset, out.byteLength / 2) : new Uint16Array(numelOf(box.size));
    const idx = box.start.slice(0, n);
    for (let o = 0; o < outer; o++) {
      // The leading indices of this slab, row-major within the box.
      let rem = o;
      for (let d = n - 1; d >= 0; d--) {
        idx[d] = box.start[d]! + (rem % box.size[d]!);
        rem = Math.floor(rem / box.size[d]!);
      }
      const base = o * cn * rn;
      for (let ra = 0; ra < rn; ra += rs) {
        const rk = Math.min(rs, rn - ra);
        await this.readPackedRows(idx, rk, (i) => r0 + ra + i, c0, cn, rowsBuf);
        // Transpose [rk, cn] into rows ra … ra+rk of [cn, rn].
        for (let r = 0; r < rk; r++) for (let c = 0; c < cn; c++) o16[base + c * rn + ra + r] = rows16[r * cn + c]!;
      }
    }
    if (!aligned) out.set(new Uint8Array(o16.buffer));
  }
}

/** The lazy bf16 view `name` [E, 32G, R] of `blocks` [E, R, G, 16] and `scales` [E, R, G]. */
export function mxfp4Tensor(name: string, blocks: SourceTensor, scales: SourceTensor, file?: string): Mxfp4Tensor {
  return new Mxfp4Tensor(name, blocks, scales, file);
}

/**
 * `src` with every `X_blocks` / `X_scales` pair replaced by the dequantised bf16 `X`; `src` itself
 * when it holds none. A blocks tensor without its scales (or the reverse) is an error.
 */
export function withMxfp4Dequantized(src: CheckpointSource): CheckpointSource {
  const names = [...src.tensors.keys()];
  if (!names.some((n) => n.endsWith('_blocks') || n.endsWith('_scales'))) return src;
  const tensors = new Map<string, SourceTensor>();
  for (const [n, t] of src.tensors) {
    const b = /^(.*)_blocks$/.exec(n);
    const s = /^(.*)_scales$/.exec(n);
    if (b) {
      const scales = src.tensors.get(`${b[1]}_scales`);
      if (!scales) throw badInput(`${n}: MXFP4 blocks without ${b[1]}_scales`, src.path, n);
      tensors.set(b[1]!, mxfp4Tensor(b[1]!, t, scales, src.path));
    } else if (s) {
      if (!src.tensors.has(`${s[1]}_blocks`)) throw badInput(`${n}: MXFP4 scales without ${s[1]}_blocks`, src.path, n);
    } else tensors.set(n, t);
  }
  return { ...src, tensors };
}
