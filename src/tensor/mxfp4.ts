/**
 * MXFP4 expert weights (openai/gpt-oss hub checkpoints: `X_blocks` uint8 [E, R, G, 16] — two
 * FP4 (E2M1) codes per byte, low nibble first — and `X_scales` uint8 [E, R, G], one power-of-two
 * exponent biased by 127 per block of 32 values) read as the bf16 tensor `X` transformers
 * dequantises them to (`integrations/mxfp4.py: _convert_moe_packed_tensors`, 5.24.0):
 *
 *   out[e, r, 32g + 2j]     = ldexp(FP4[blocks[e, r, g, j] & 0xF], scales[e, r, g] − 127)
 *   out[e, r, 32g + 2j + 1] = ldexp(FP4[blocks[e, r, g, j] >> 4],  scales[e, r, g] − 127)
 *
 * then `[E, R, 32G]` transposed to `[E, 32G, R]` (gate_up_proj [E, H, 2F], down_proj [E, F, H]).
 * torch's ldexp on CPU is exact (x · 2^e without an intermediate inf): an FP4 value times a power
 * of two has at most two significant bits, so it is exact in fp32 and bf16 down to 2^−128; scale
 * 255 (e = 128) gives 0.5 · 2^128 = 2^127, ±inf for larger codes and ±0 for the zero codes — all
 * checked against torch for every scale byte and nibble (test/interop/gptoss.test.ts).
 *
 * The view is lazy: a box reads only the blocks and scales of the rows and column blocks it covers.
 */
import { poolThreads, poolWorthIt, runOnPool } from './pool.js';
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor } from '../lazy/types.js';
import { badInput } from '../util/errors.js';
import { byteLength, numelOf } from './dtype.js';
import type { Box } from './layout.js';

/** Staging per slice of rows of a box read (see `mxfp4Tensor`). */
const SLICE_BYTES = 1 << 20;

const FP4 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6];

/** Dequantises `rows` rows of `groups` blocks each into fp32 values (row-major [rows, 32·groups]). */
export function dequantRows(blocks: Uint8Array, scales: Uint8Array, rows: number, groups: number, out: Float32Array): void {
  for (let r = 0; r < rows; r++) {
    for (let g = 0; g < groups; g++) {
      const s = scales[r * groups + g]!;
      const pow = 2 ** (s - 127); // exact in binary64; the product rounds once to fp32
      const b0 = (r * groups + g) * 16;
      const o0 = r * groups * 32 + g * 32;
      for (let j = 0; j < 16; j++) {
        const byte = blocks[b0 + j]!;
        out[o0 + 2 * j] = Math.fround(FP4[byte & 15]! * pow);
        out[o0 + 2 * j + 1] = Math.fround(FP4[byte >> 4]! * pow);
      }
    }
  }
}

/**
 * byte → the two bf16 values it decodes to, low nibble in the low half (the first value on a
 * little-endian host), for every scale: PAIRS[(scale << 8) | byte]. 256 KiB, built on first use
 * from `dequantRows`' own arithmetic, so a lookup is exact by construction. Each value is exact in
 * bf16 (see the module comment): its bf16 bits are the top half of its fp32 bits.
 */
let PAIRS: Uint32Array | undefined;
function pairs(): Uint32Array {
  if (PAIRS) return PAIRS;
  const t = new Uint32Array(256 * 256);
  const f = new Float32Array(2);
  const u = new Uint32Array(f.buffer);
  for (let s = 0; s < 256; s++) {
    const pow = 2 ** (s - 127);
    for (let byte = 0; byte < 256; byte++) {
      f[0] = FP4[byte & 15]! * pow;
      f[1] = FP4[byte >> 4]! * pow;
      t[(s << 8) | byte] = ((u[1]! >>> 16) << 16) | (u[0]! >>> 16);
    }
  }
  PAIRS = t;
  return t;
}

const LITTLE_ENDIAN = new Uint8Array(Uint16Array.of(1).buffer)[0] === 1;

/**
 * Row `q` of `groups` blocks straight to bf16 pairs at `out[o …]`, one table lookup per byte.
 */
function dequantRowBf16(blocks: Uint8Array, scales: Uint8Array, q: number, groups: number, out: Uint32Array, o: number): void {
  if (!LITTLE_ENDIAN) throw new Error('MXFP4: big-endian hosts are not supported (as castBytes)');
  const t = pairs();
  for (let g = 0; g < groups; g++) {
    const base = scales[q * groups + g]! << 8;
    const b0 = (q * groups + g) * 16;
    const o0 = o + g * 16;
    for (let j = 0; j < 16; j++) out[o0 + j] = t[base | blocks[b0 + j]!]!;
  }
}

/**
 * Dequantising rows on a worker thread: raw blocks then scales of `span` consecutive packed rows
 * in `raw`; output row x (of `rows.length`) is packed row `rows[x]` of the span, columns from byte
 * `off` of the row, `cn` values, written at `outOffset + x · cn · 2` of `out`.
 */
export interface Mxfp4RowsTask {
  readonly kind: 'mxfp4';
  readonly raw: SharedArrayBuffer;
  readonly span: number;
  readonly groups: number;
  readonly rows: Int32Array;
  readonly off: number;
  readonly cn: number;
  readonly out: SharedArrayBuffer;
  readonly outOffset: number;
}

/** Runs an `Mxfp4RowsTask` (on whichever thread holds it); returns the bytes written. */
export function runMxfp4Rows(t: Mxfp4RowsTask): number {
  const blk = new Uint8Array(t.raw, 0, t.span * t.groups * 16);
  const sc = new Uint8Array(t.raw, t.span * t.groups * 16, t.span * t.groups);
  const out = new Uint8Array(t.out, t.outOffset, t.rows.length * t.cn * 2);
  writeRows(blk, sc, t.groups, t.rows.length, (x) => t.rows[x]!, t.off, t.cn, out);
  return out.length;
}

/** Output rows x = 0 … n−1 ← packed row q(x) of `blk`/`sc`, columns from byte `off`, `cn` values. */
function writeRows(blk: Uint8Array, sc: Uint8Array, gn: number, n: number, q: (x: number) => number, off: number, cn: number, out: Uint8Array): void {
  const whole = off === 0 && cn === gn * 32 && out.byteOffset % 4 === 0;
  if (whole) {
    const out32 = new Uint32Array(out.buffer, out.byteOffset, (n * cn) / 2);
    for (let x = 0; x < n; x++) dequantRowBf16(blk, sc, q(x), gn, out32, x * gn * 16);
    return;
  }
  const stage = new Uint32Array(gn * 16);
  const bytes = new Uint8Array(stage.buffer);
  for (let x = 0; x < n; x++) {
    dequantRowBf16(blk, sc, q(x), gn, stage, 0);
    out.set(bytes.subarray(off, off + cn * 2), x * cn * 2);
  }
}

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
