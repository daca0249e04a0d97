/**
 * Exact IEEE single-precision arithmetic in JavaScript numbers, for reproducing torch's fp32 LoRA
 * merge bit for bit.
 *
 * JS numbers are binary64. For two float32 values, `Math.fround(a + b)`, `Math.fround(a * b)`,
 * `Math.fround(a / b)` and `Math.fround(Math.sqrt(a))` are the correctly rounded float32 results
 * (binary64 has more than 2·24 + 2 bits, so rounding twice is harmless for these operations).
 * A fused multiply-add is different: the exact `a·b + c` can need more than 53 bits, and rounding
 * it first to binary64 and then to binary32 goes wrong exactly when the binary64 result lands on a
 * midpoint between two float32 values. `fma32` detects that case and decides it by the sign of the
 * binary64 rounding error, so it is exact.
 *
 * MKL's sgemm (torch's CPU matmul on x86) accumulates each element of `B @ A` as chains of FMAs
 * over blocks of k, each chain from 0, the block sums added in fp32 in order. The blocking depends
 * on the kernel MKL dispatches to, i.e. on the CPU torch runs on (measured with torch 2.13, MKL
 * 2024.2, 1 and 2 threads):
 * - AVX512 (Intel, avx512f): r ≤ 384 one chain; 384 < r ≤ 768 two chains over the first ⌈r/2⌉
 *   and the rest (shapes 16×16 to 4096×2816). Above 768 not identified: blocks of at most 384.
 * - AVX2 (this includes AMD EPYC without AVX512): blocks of 192 in order, every r up to 1000
 *   checked (0 of 3072 elements differ for r = 400, 500, 600, 768, 1000).
 * The kernel is picked like MKL picks it, from the CPU's flags (Linux /proc/cpuinfo), so a merge
 * equals what torch computes on the same machine; SHARDSHIFT_MKL_PATH=avx2|avx512 reproduces
 * another machine's merge.
 */
import { readFileSync } from 'node:fs';
import { castBytes } from './cast.js';
import type { DType } from './dtype.js';

/** 2^28 + 1: Veltkamp's splitter leaving a 25-bit head of a binary64. */
const SPLIT = 268435457;

/** The float32 nearest `p + c` (exact sum) when `s` is its binary64 rounding; handles the midpoint case. */
function round32(p: number, c: number, s: number): number {
  const r = Math.fround(s);
  if (r === s) return r;
  // Does s have at most 25 significant bits (a float32 midpoint, or a float32)? Cheap test first.
  const g = SPLIT * s;
  const hi = g - (g - s);
  if (hi !== s || !Number.isFinite(r)) return r;
  const q = 2 * s - r; // the other float32 neighbour when s is a midpoint
  if (Math.fround(q) !== q) return r;
  // s is exactly halfway between r and q: the binary64 rounding error of p + c decides (TwoSum).
  const bb = s - p;
  const err = p - (s - bb) + (c - bb);
  if (err === 0) return r; // a true tie: Math.fround already rounded it to even
  return err > 0 ? Math.max(r, q) : Math.min(r, q);
}

/** Correctly rounded float32 `a·b + c` for float32-valued a, b, c (an IEEE fusedMultiplyAdd). */
export function fma32(a: number, b: number, c: number): number {
  const p = a * b; // exact: 24 + 24 bits
  return round32(p, c, p + c);
}

/**
 * Σ_k x[xo + k]·y[yo + k] for k = 0..n-1 as a float32 FMA chain from 0 (MKL's sgemm order for one
 * output element).
 */
export function dotChain(x: Float32Array, xo: number, y: Float32Array, yo: number, n: number): number {
  let acc = 0;
  for (let k = 0; k < n; k++) {
    const p = x[xo + k]! * y[yo + k]!;
    const s = p + acc;
    const r = Math.fround(s);
    acc = r === s ? r : round32(p, acc, s);
  }
  return acc;
}

/** The values of raw little-endian `bytes` of a float dtype, exactly, as a Float32Array. */
export function toF32(bytes: Uint8Array, dtype: DType): Float32Array {
  const out = new Float32Array(bytes.byteLength / (dtype === 'F32' ? 4 : dtype === 'F16' || dtype === 'BF16' ? 2 : 1));
  castBytes(bytes, dtype, 'F32', new Uint8Array(out.buffer));
  return out;
}

/** Rounds float32 `values` to `dtype` (torch's rounding) into `out` (raw bytes). */
export function fromF32(values: Float32Array, dtype: DType, out: Uint8Array): void {
  castBytes(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), 'F32', dtype, out);
}

/** `values` rounded to `dtype` and widened back to float32, in place (a no-op for F32). */
export function roundThrough(values: Float32Array, dtype: DType): void {
  if (dtype === 'F32') return;
  const bytes = new Uint8Array((values.length * (dtype === 'F16' || dtype === 'BF16' ? 2 : 1)));
  fromF32(values, dtype, bytes);
  castBytes(bytes, dtype, 'F32', new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
}

/** Largest inner dimension MKL's AVX512 kernel sums in one FMA chain; up to twice this it uses two halves. */
export const MKL_KC = 384;
/** The k block of MKL's AVX2 kernel. */
export const MKL_AVX2_KC = 192;

export type MklPath = 'avx512' | 'avx2';

let path: MklPath | undefined;

/** The sgemm kernel MKL uses on this machine (or as SHARDSHIFT_MKL_PATH says). */
export function mklPath(): MklPath {
  if (path) return path;
  const env = process.env.SHARDSHIFT_MKL_PATH;
  if (env === 'avx2' || env === 'avx512') return (path = env);
  let info = '';
  try {
    info = readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    // Not Linux: MKL on current x86 servers is mostly AVX512-capable Intel; say so in docs.
  }
  return (path = /\bavx512f\b/.test(info) && /GenuineIntel/.test(info) ? 'avx512' : info ? 'avx2' : 'avx512');
}

/** Fixes the kernel whose order `loraDot` follows (undefined: detect again). */
export function setMklPath(p: MklPath | undefined): void {
  path = p;
}

/**
 * The k block of MKL's FMA chains for inner dimension r on this machine's kernel: each output
 * element is chains over [0, kc), [kc, 2kc), … summed in fp32 in order.
 */
export function mklBlock(r: number): number {
  if (mklPath() === 'avx2') return MKL_AVX2_KC;
  return r <= MKL_KC ? MKL_KC : Math.ceil(r / Math.ceil(r / MKL_KC));
}

/** One element of `B @ A` (x a row of B, y a column of A, r the rank) in MKL's order (see above). */
export function loraDot(x: Float32Array, xo: number, y: Float32Array, yo: number, r: number): number {
  const kc = mklBlock(r);
  if (r <= kc) return dotChain(x, xo, y, yo, r);
  let acc = dotChain(x, xo, y, yo, kc);
  for (let k = kc; k < r; k += kc) acc = Math.fround(acc + dotChain(x, xo + k, y, yo + k, Math.min(kc, r - k)));
  return acc;
}
