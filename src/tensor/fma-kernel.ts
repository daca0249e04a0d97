/**
 * Blocks of `B @ A` as exact fp32 FMA chains, in WebAssembly SIMD — the hot loop of a LoRA merge.
 *
 * `fp32.ts` defines the arithmetic: every output element is MKL's sgemm order (FMA chains from 0
 * over blocks of kc, block sums added in fp32), each FMA correctly rounded. In JavaScript that is
 * ~4 ns per FMA; this kernel does the same in two lanes of f64 per instruction, four lane groups
 * in flight (8 output elements per group), about an order of magnitude faster.
 *
 * Why it is exact: a product of two float32 is exact in binary64, so an FMA is one binary64 add
 * and a rounding to binary32 — which is a *double* rounding, wrong exactly when the binary64 sum
 * lands on a binary32 midpoint. The fast path rounds twice and flags any lane whose binary64 sum
 * is such a midpoint: `chains` tests the normal-range midpoint pattern only, which is complete
 * when the factors' magnitudes keep every sum on the binary32 subnormal grid (`onGrid`, true for
 * any real adapter); `chainsSafe` flags every sum with its low 28 mantissa bits clear that is not
 * a binary32, subnormal midpoints included. A flagged group is recomputed with the exact step: the binary64 sum rounded to odd (TwoSum error
 * decides the last bit), which makes the second rounding exact (Boldo & Melquiond, "Emulation of
 * FMA and correctly rounded sums: proved algorithms using rounding to odd", 2008). Random fp32
 * factors flag almost no groups; low-precision factors (bf16 values) flag more, and stay exact.
 *
 * Where the engine fuses WebAssembly's relaxed-SIMD `f32x4.relaxed_madd` (V8 on x86 with FMA3,
 * for one), a second kernel does each step as one hardware FMA on four fp32 lanes — exactly MKL's
 * arithmetic, several times faster again. "Relaxed" permits an unfused multiply-add, so that
 * kernel is used only after a probe on known double-rounding cases (`fusedKernel`) returns the
 * exact kernel's bits; otherwise, or with `setFmaKernel('exact')`, the f64 kernel runs.
 *
 * The WAT and the reason for its shape are in `scripts/build-wasm.mjs`; the bytes are generated
 * into `fma-kernel.wasm.ts`. Hand-written because no library computes an fp32 GEMM in a chosen
 * FMA order with correct rounding.
 */
import v8 from 'node:v8';
import { FMA_FUSED_KERNEL_GROUP, FMA_FUSED_KERNEL_WASM, FMA_KERNEL_GROUP, FMA_KERNEL_WASM } from './fma-kernel.wasm.js';

// @types/node 20 does not declare WebAssembly; the little used here, typed locally.
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { exports: unknown };
};

interface KernelExports {
  memory: { readonly buffer: ArrayBuffer; grow(pages: number): number };
  chains(x: number, y: number, out: number, n: number, w8: number, r: number, kc: number, scale: number, mode: number): number;
  chainsSafe(x: number, y: number, out: number, n: number, w8: number, r: number, kc: number, scale: number, mode: number): number;
  chainsExact(x: number, y: number, out: number, n: number, w8: number, r: number, kc: number, scale: number, mode: number): number;
}

let compiled: object | undefined;
let instance: KernelExports | undefined;

interface FusedExports {
  memory: KernelExports['memory'];
  chains(x: number, y: number, out: number, n: number, w16: number, r: number, kc: number, scale: number, mode: number): number;
}

/** Which kernel merges: `auto` — the fused one where the probe passes; `exact` — the f64 one. */
export type FmaKernelChoice = 'auto' | 'exact';

let choice: FmaKernelChoice = process.env.SHARDSHIFT_FMA === 'exact' ? 'exact' : 'auto';

/** Sets the kernel choice of this thread (tests; `LoraMergeTask.kernel` carries it to workers). */
export function setFmaKernel(c: FmaKernelChoice): void {
  choice = c;
}

export function fmaKernelChoice(): FmaKernelChoice {
  return choice;
}

/** undefined: not tried yet; null: unavailable or not fused here. */
let fused: FusedExports | null | undefined;

function compileFused(): object | undefined {
  const bytes = Buffer.from(FMA_FUSED_KERNEL_WASM, 'base64');
  try {
    return new WebAssembly.Module(bytes);
  } catch {
    // Node 20's V8 (11.3) has relaxed SIMD behind a flag (on by default from V8 11.4); the flag
    // is read when a module is compiled, so setting it now is enough.
    try {
      v8.setFlagsFromString('--experimental-wasm-relaxed-simd');
      return new WebAssembly.Module(bytes);
    } catch {
      return undefined;
    }
  }
}

/** The fused kernel if this engine has it and it fuses (probed once per thread), else null. */
export function fusedKernel(): FusedExports | null {
  if (fused !== undefined) return fused;
  fused = null;
  const mod = compileFused();
  if (!mod) return null;
  const k = new WebAssembly.Instance(mod, {}).exports as unknown as FusedExports;
  fused = probeFused(k) ? k : null;
  return fused;
}

/**
 * Runs the fused kernel on cases where an unfused multiply-add (or a different chain order)
 * gives other bits — the binary64 double-rounding trap and wide-range random values, over three
 * chain blocks — and compares with the exact kernel.
 */
function probeFused(k: FusedExports): boolean {
  const r = 40;
  const w = 32;
  const n = 3;
  let seed = 12345;
  const rnd = (): number => {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    return seed / 2 ** 32;
  };
  const wide = (): number => Math.fround((rnd() < 0.5 ? -1 : 1) * (1 + rnd()) * 2 ** Math.floor(rnd() * 24 - 12));
  const x = Float64Array.from({ length: n * r }, wide);
  const y = Float64Array.from({ length: r * w }, wide);
  // Row 0, column 0: fma(a, b, fma(c, 1, 0)) = 1 + 2^-23 exactly; unfused gives 1 + 2^-22.
  x.fill(0, 0, r);
  for (let kk = 0; kk < r; kk++) y[kk * w] = 0;
  x[0] = Math.fround(1 + 2 ** -23);
  y[0] = 1;
  x[1] = Math.fround(1 + 2 ** -23);
  y[w] = Math.fround(2 ** -24 * (1 - 2 ** -23));
  const block: ChainBlock = { x, x0: 0, y, yCols: w, y0: 0, n, w, r, kc: 16, scale: 1 };
  const want = new Float32Array(n * w);
  runExact(block, MODE.delta, new Uint8Array(want.buffer), 4, undefined, true);
  if (want[0] !== 1 + 2 ** -23) return false;
  const got = new Float32Array(n * w);
  try {
    runFused(k, block, MODE.delta, new Uint8Array(got.buffer), 4);
  } catch {
    return false;
  }
  return Buffer.from(got.buffer).equals(Buffer.from(want.buffer));
}

function kernel(): KernelExports {
  if (instance) return instance;
  compiled ??= new WebAssembly.Module(Buffer.from(FMA_KERNEL_WASM, 'base64'));
  instance = new WebAssembly.Instance(compiled, {}).exports as unknown as KernelExports;
  return instance;
}

/** Output rows per kernel call hold at most this many elements (bounds x and out; y is r × w). */
const BATCH_ELEMENTS = 1 << 20;

export interface ChainBlock {
  /** x: float32 values as f64, row-major [xRows, r]; rows x0 .. x0+n are used. */
  readonly x: Float64Array;
  readonly x0: number;
  /** y: float32 values as f64, row-major [r, yCols]; columns y0 .. y0+w are used. */
  readonly y: Float64Array;
  readonly yCols: number;
  readonly y0: number;
  readonly n: number;
  readonly w: number;
  readonly r: number;
  /** Block length of the FMA chains (see fp32.ts `mklBlock`). */
  readonly kc: number;
  /** Applied to each sum: f32(sum × scale), one rounding. */
  readonly scale: number;
}

export interface ChainStats {
  /** 8-element groups recomputed on the exact path. */
  exactGroups: number;
}

/** The smallest nonzero |v| (Infinity when there is none). */
function minMagnitude(v: Float64Array): number {
  let m = Infinity;
  for (let i = 0; i < v.length; i++) {
    const a = Math.abs(v[i]!);
    if (a !== 0 && a < m) m = a;
  }
  return m;
}

/**
 * True when every product x·y of nonzero float32 factors at least this large is a multiple of
 * 2^-149 (ulp(x)·ulp(y) ≥ 2^-149, i.e. floor(log2 x) + floor(log2 y) ≥ -103; a margin of 2 covers
 * Math.log2's rounding). Then every exact sum of the chains is on the float32 subnormal grid, so a
 * sum below 2^-126 is a float32 and cannot be misrounded: only normal-range midpoints need the
 * flag, and the kernel's cheaper `chains` is exact. Otherwise `chainsSafe` flags every midpoint.
 */
function onGrid(xLow: number, yLow: number): boolean {
  if (xLow === Infinity || yLow === Infinity) return true;
  return Math.floor(Math.log2(xLow)) + Math.floor(Math.log2(yLow)) >= -101;
}

/** The kernel's epilogue modes (see scripts/build-wasm.mjs). */
const MODE = { delta: 0, bf16: 1, bf16SafeMerge: 2, f32: 3 } as const;

/** Base dtypes the kernel merges into itself; others take ΔW from `chainBlock` and merge in JS. */
export type KernelMergeDtype = 'BF16' | 'F32';

export interface MergeInto {
  readonly dtype: KernelMergeDtype;
  /** ΔW rounded to the base dtype before the add (peft's safe_merge). */
  readonly roundDelta: boolean;
  /** The base block, row-major [n, w] in `dtype`; replaced by the merged values. */
  readonly bytes: Uint8Array;
}

/**
 * out[i·w + j] = f32(chain(Σ_k x[x0+i, k]·y[k, y0+j]) × scale) for i < n, j < w. `exactOnly`
 * runs every group on the exact path (tests).
 */
export function chainBlock(b: ChainBlock, out: Float32Array, stats?: ChainStats, exactOnly = false): void {
  run(b, MODE.delta, new Uint8Array(out.buffer, out.byteOffset, out.byteLength), 4, stats, exactOnly);
}

/** The kernel `chainBlock`/`mergeBlock` use on this thread: `fused` or `exact` (f64 lanes). */
export function activeKernel(): 'fused' | 'exact' {
  return choice === 'auto' && fusedKernel() ? 'fused' : 'exact';
}

/**
 * base ← dtype(f32(base + ΔW)) in place, ΔW as `chainBlock` computes it (rounded to the dtype
 * first when `roundDelta`): one LoRA merge block, entirely in the kernel.
 */
export function mergeBlock(b: ChainBlock, into: MergeInto, stats?: ChainStats, exactOnly = false): void {
  const mode = into.dtype === 'F32' ? MODE.f32 : into.roundDelta ? MODE.bf16SafeMerge : MODE.bf16;
  run(b, mode, into.bytes, into.dtype === 'F32' ? 4 : 2, stats, exactOnly, true);
}

function run(b: ChainBlock, mode: number, io: Uint8Array, item: number, stats: ChainStats | undefined, exactOnly: boolean, load = false): void {
  const f = !exactOnly && choice === 'auto' ? fusedKernel() : null;
  if (f) runFused(f, b, mode, io, item, load);
  else runExact(b, mode, io, item, stats, exactOnly, load);
}

/** Where a kernel call finds its inputs in the kernel's memory, and the rows it covers. */
interface KernelCall {
  x: number;
  y: number;
  out: number;
  m: number;
  wg: number;
  /** The batch's x rows as copied (for the exact kernel's grid test). */
  xm: Float32Array | Float64Array;
}

/**
 * Lays a block out in a kernel's memory — y's columns [y0, y0+w) zero-padded to a multiple of
 * `group`, then x rows and the base/output rows in batches — and calls `call` per batch.
 * `Lane` is the kernel's input element type (f32 for the fused kernel, f64 for the exact one).
 */
function drive(
  memory: KernelExports['memory'],
  Lane: Float32ArrayConstructor | Float64ArrayConstructor,
  group: number,
  b: ChainBlock,
  io: Uint8Array,
  item: number,
  load: boolean,
  call: (c: KernelCall, ym: Float32Array | Float64Array) => void,
): void {
  const { r, w, n } = b;
  const lane = Lane.BYTES_PER_ELEMENT;
  const wg = Math.ceil(w / group) * group;
  const rows = Math.max(1, Math.min(n, Math.floor(BATCH_ELEMENTS / wg)));
  const yBytes = r * wg * lane;
  const xBytes = rows * r * lane;
  const need = yBytes + xBytes + rows * wg * 4;
  const have = memory.buffer.byteLength;
  if (need > have) memory.grow(Math.ceil((need - have) / 65536));
  const mem = memory.buffer;
  const [yPtr, xPtr, outPtr] = [0, yBytes, yBytes + xBytes];
  const ym = new Lane(mem, yPtr, r * wg);
  for (let kk = 0; kk < r; kk++) {
    ym.set(b.y.subarray(kk * b.yCols + b.y0, kk * b.yCols + b.y0 + w), kk * wg);
    if (wg > w) ym.fill(0, kk * wg + w, (kk + 1) * wg);
  }
  const xm = new Lane(mem, xPtr, rows * r);
  const om = new Uint8Array(mem, outPtr, rows * wg * item);
  const [rowIn, rowPad] = [w * item, wg * item];
  for (let i0 = 0; i0 < n; i0 += rows) {
    const m = Math.min(rows, n - i0);
    xm.set(b.x.subarray((b.x0 + i0) * r, (b.x0 + i0 + m) * r));
    const block = io.subarray(i0 * rowIn, (i0 + m) * rowIn);
    if (load) {
      if (wg === w) om.set(block);
      else for (let i = 0; i < m; i++) om.set(block.subarray(i * rowIn, (i + 1) * rowIn), i * rowPad);
    }
    call({ x: xPtr, y: yPtr, out: outPtr, m, wg, xm: xm.subarray(0, m * r) }, ym);
    if (wg === w) block.set(om.subarray(0, m * rowIn));
    else for (let i = 0; i < m; i++) block.set(om.subarray(i * rowPad, i * rowPad + rowIn), i * rowIn);
  }
}

/** The fused kernel over a block: x, y as f32 in its memory. */
function runFused(k: FusedExports, b: ChainBlock, mode: number, io: Uint8Array, item: number, load = false): void {
  drive(k.memory, Float32Array, FMA_FUSED_KERNEL_GROUP, b, io, item, load, (c) => {
    k.chains(c.x, c.y, c.out, c.m, c.wg, b.r, b.kc, b.scale, mode);
  });
}

/** The exact kernel over a block: x, y as f64; picks `chains` where the grid test allows it. */
function runExact(b: ChainBlock, mode: number, io: Uint8Array, item: number, stats: ChainStats | undefined, exactOnly: boolean, load = false): void {
  const k = kernel();
  let yLow: number | undefined;
  drive(k.memory, Float64Array, FMA_KERNEL_GROUP, b, io, item, load, (c, ym) => {
    yLow ??= minMagnitude(ym as Float64Array);
    const fn = exactOnly ? k.chainsExact : onGrid(minMagnitude(c.xm as Float64Array), yLow) ? k.chains : k.chainsSafe;
    const flagged = fn(c.x, c.y, c.out, c.m, c.wg, b.r, b.kc, b.scale, mode);
    if (stats) stats.exactGroups += flagged;
  });
}
