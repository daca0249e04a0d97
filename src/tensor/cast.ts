/**
 * Exact floating-point dtype casts among F32, F16, BF16, F8_E4M3 (torch.float8_e4m3fn) and
 * F8_E5M2 (torch.float8_e5m2), bit-for-bit equal to `tensor.to(dtype)` in torch 2.13 on an x86
 * CPU with AVX2/AVX512 (the vectorized kernels a large contiguous tensor goes through).
 *
 * Why hand-written: no JavaScript library does bf16/fp8 at all with torch's exact rounding, and
 * "exact" here includes the parts that are not IEEE-specified and differ between torch's own code
 * paths: which NaN bit pattern comes out (sign, payload, quieting), and what happens on overflow
 * (float8_e4m3fn has no Inf: torch saturates finite overflow AND ±Inf to ±448). Every rule below
 * was measured against torch (test/oracle/cast_tables.py, checked exhaustively for all 16-bit and
 * 8-bit sources and for ~1.8M f32 inputs by test/interop/cast.test.ts):
 *
 *  - F32→BF16: round-to-nearest-even (RNE); every NaN becomes 0xFFFF (the AVX kernel's
 *    constant; torch's scalar c10 code, e.g. for a strided source, gives 0x7FC0). Overflow
 *    rounds to ±Inf.
 *  - any other source →BF16 (F16, F8_*): RNE via f32; every NaN becomes 0x7FC0 (sign dropped).
 *  - →F16: what x86 F16C `vcvtps2ph` does: RNE, |x| ≥ 65520 → ±Inf, NaN keeps its sign and the
 *    top 10 payload bits with the quiet bit forced on.
 *  - F16→F32 (and F8_E5M2→F32, which goes through f16): exact, NaN quieted (bit 22 set), payload
 *    kept. BF16→F32: a plain 16-bit shift (NaN payload kept, not quieted).
 *  - F8_E4M3→F32: exact; its NaN (0x7F/0xFF) becomes ±0x7FF00000 (c10's bit formula).
 *  - →F8_E4M3: RNE; NaN → 0x7F|sign; |x| ≥ 464 (the 448/480 tie and above) and ±Inf → ±448 (0x7E).
 *  - →F8_E5M2: RNE; NaN → 0x7F|sign; |x| ≥ 61440 rounds to ±Inf (0x7C), ±Inf stays ±Inf.
 *  - 16- and 8-bit sources are widened to f32 exactly first, and F32→F8 rounds once, directly
 *    (not through f16/bf16), so there is no double rounding anywhere.
 *
 * AVX2 and AVX512 torch agree on all of this. With ATEN_CPU_CAPABILITY=default (no vector
 * kernels) only NaN bit patterns differ: F32→BF16 gives 0x7FC0 and →F16 gives 0x7E00|sign.
 * That is not what torch runs on x86 by default.
 *
 * Speed: 16- and 8-bit sources go through lookup tables (built lazily, at most 65,536 entries
 * each); F32 sources use integer bit arithmetic on Int32Array views. Unaligned views (Node
 * Buffers from the pool often are) are processed in chunks through aligned scratch buffers.
 */
import type { DType } from './dtype.js';

type Castable = 'F32' | 'F16' | 'BF16' | 'F8_E4M3' | 'F8_E5M2';

/** Dtypes castDType supports. */
export const CASTABLE: readonly DType[] = Object.freeze(['F32', 'F16', 'BF16', 'F8_E4M3', 'F8_E5M2'] as DType[]);

const SIZE: Record<Castable, number> = { F32: 4, F16: 2, BF16: 2, F8_E4M3: 1, F8_E5M2: 1 };

function isCastable(d: DType): d is Castable {
  return Object.prototype.hasOwnProperty.call(SIZE, d);
}

export function canCast(from: DType, to: DType): boolean {
  return isCastable(from) && isCastable(to);
}

// ---------------------------------------------------------------------------------------------
// Scalar bit conversions. Inputs and outputs are bit patterns held in JS numbers; f32 patterns
// may arrive as int32 (negative when the sign bit is set), so everything masks before comparing.

/**
 * Round-to-nearest-even of a positive finite f32 (bits `a`) that lies below a narrow type's
 * normal range, to an integer multiple of 2^(base-150): the narrow type's subnormal encoding
 * (reaching the smallest normal's encoding when it rounds up). Equal to the c10 / F16C trick
 * `bits(x + 2^(base-127)) - (base << 23)`.
 */
function rneSubnormal(a: number, base: number): number {
  const e = a >>> 23;
  const sh = base - (e === 0 ? 1 : e);
  if (sh > 24) return 0; // below half the smallest subnormal
  const m = e === 0 ? a : (a & 0x7fffff) | 0x800000;
  const q = m >>> sh;
  const r = m - (q << sh);
  const half = 1 << (sh - 1);
  return r > half || (r === half && (q & 1) !== 0) ? q + 1 : q;
}

/** f32 → f16 as F16C vcvtps2ph (RNE; NaN: sign kept, top payload bits kept, quiet bit set). */
function f32ToF16Bits(u: number): number {
  const s = (u >>> 16) & 0x8000;
  const a = u & 0x7fffffff;
  if (a >= 0x38800000) {
    if (a < 0x477ff000) return s | ((a - 0x38000000 + 0xfff + ((a >>> 13) & 1)) >>> 13);
    if (a <= 0x7f800000) return s | 0x7c00;
    return s | 0x7e00 | ((a >>> 13) & 0x3ff);
  }
  return s | rneSubnormal(a, 126);
}

/** f32 → bf16, RNE; NaN → `nan` (0xFFFF in torch's vectorized f32 kernel, 0x7FC0 elsewhere). */
function f32ToBf16Bits(u: number, nan: number): number {
  return (u & 0x7fffffff) > 0x7f800000 ? nan : ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** f32 → float8_e4m3fn as c10 / ATen do: RNE, NaN → 0x7F|sign, overflow and ±Inf → ±448. */
function f32ToE4m3Bits(u: number): number {
  const s = (u >>> 24) & 0x80;
  const a = u & 0x7fffffff;
  let r: number;
  if (a >= 0x43f00000) r = a > 0x7f800000 ? 0x7f : 0x7e;
  else if (a < 0x3c800000) r = rneSubnormal(a, 141);
  else {
    r = (a - 0x3c000000 + 0x7ffff + ((a >>> 20) & 1)) >>> 20;
    if (r === 0x7f) r = 0x7e;
  }
  return s | r;
}

/** f32 → float8_e5m2 as c10 / ATen do: RNE, NaN → 0x7F|sign, overflow → ±Inf (0x7C). */
function f32ToE5m2Bits(u: number): number {
  const s = (u >>> 24) & 0x80;
  const a = u & 0x7fffffff;
  let r: number;
  if (a >= 0x47800000) r = a > 0x7f800000 ? 0x7f : 0x7c;
  else if (a < 0x38800000) r = rneSubnormal(a, 134);
  else r = (a - 0x38000000 + 0xfffff + ((a >>> 21) & 1)) >>> 21;
  return s | r;
}

/** f16 → f32 as F16C vcvtph2ps: exact; NaN gets its quiet bit set. Returns int32 bits. */
function f16ToF32Bits(h: number): number {
  const s = (h & 0x8000) << 16;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0x1f) return s | 0x7f800000 | (m << 13) | (m !== 0 ? 0x400000 : 0);
  if (e !== 0) return s | ((e + 112) << 23) | (m << 13);
  if (m === 0) return s;
  let ee = 113;
  let mm = m;
  while ((mm & 0x400) === 0) {
    mm <<= 1;
    ee--;
  }
  return s | (ee << 23) | ((mm & 0x3ff) << 13);
}

/** float8_e4m3fn → f32 (c10): exact; NaN (0x7F/0xFF) → ±0x7FF00000. Returns int32 bits. */
function e4m3ToF32Bits(x: number): number {
  const s = (x & 0x80) << 24;
  const e = (x >>> 3) & 0xf;
  const m = x & 7;
  if (e === 0xf && m === 7) return s | 0x7ff00000;
  if (e !== 0) return s | ((e + 120) << 23) | (m << 20);
  if (m === 0) return s;
  // subnormal m * 2^-9: normalise the 3-bit mantissa
  const lz = m >= 4 ? 0 : m >= 2 ? 1 : 2;
  return s | ((120 - lz) << 23) | (((m << (lz + 1)) & 7) << 20);
}

/** float8_e5m2 → f32: torch widens through f16 (x << 8), so NaN is quieted like F16→F32. */
function e5m2ToF32Bits(x: number): number {
  return f16ToF32Bits(x << 8);
}

const WIDEN: Record<Castable, (x: number) => number> = {
  F32: (x) => x | 0,
  F16: f16ToF32Bits,
  BF16: (x) => x << 16,
  F8_E4M3: e4m3ToF32Bits,
  F8_E5M2: e5m2ToF32Bits,
};

/** f32 bits → `to` bits, as torch does it when the source dtype is `from`. */
function narrowFn(from: Castable, to: Castable): (u: number) => number {
  switch (to) {
    case 'F32':
      return (u) => u | 0;
    case 'F16':
      return f32ToF16Bits;
    case 'BF16':
      return from === 'F32' ? (u) => f32ToBf16Bits(u, 0xffff) : (u) => f32ToBf16Bits(u, 0x7fc0);
    case 'F8_E4M3':
      return f32ToE4m3Bits;
    case 'F8_E5M2':
      return f32ToE5m2Bits;
  }
}

// ---------------------------------------------------------------------------------------------
// Lookup tables for 8- and 16-bit sources, built on first use.

type Table = Uint8Array | Uint16Array | Int32Array;
const tables = new Map<string, Table>();

function tableFor(from: Castable, to: Castable): Table {
  const key = `${from}>${to}`;
  let t = tables.get(key);
  if (t) return t;
  const n = 1 << (8 * SIZE[from]);
  const outSize = SIZE[to];
  t = outSize === 4 ? new Int32Array(n) : outSize === 2 ? new Uint16Array(n) : new Uint8Array(n);
  const widen = WIDEN[from];
  const narrow = narrowFn(from, to);
  for (let x = 0; x < n; x++) t[x] = narrow(widen(x));
  tables.set(key, t);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Kernels over aligned typed-array views. One function per (src width, dst width) keeps every
// loop monomorphic. `sb/so` and `db/dof` are buffer and byte offset (aligned to the item size).

type Kernel = (sb: ArrayBufferLike, so: number, db: ArrayBufferLike, dof: number, n: number) => void;

function lut8to8(t: Uint8Array): Kernel {
  return (sb, so, db, dof, n) => {
    const s = new Uint8Array(sb, so, n);
    const d = new Uint8Array(db, dof, n);
    for (let i = 0; i < n; i++) d[i] = t[s[i]!]!;
  };
}
function lut8to16(t: Uint16Array): Kernel {
  return (sb, so, db, dof, n) => {
    const s = new Uint8Array(sb, so, n);
    const d = new Uint16Array(db, dof, n);
    for (let i = 0; i < n; i++) d[i] = t[s[i]!]!;
  };
}
function lut8to32(t: Int32Array): Kernel {
  return (sb, so, db, dof, n) => {
    const s = new Uint8Array(sb, so, n);
    const d = new Int32Array(db, dof, n);
    for (let i = 0; i < n; i++) d[i] = t[s[i]!]!;
  };
}
function lut16to8(t: Uint8Array): Kernel {
  return (sb, so, db, dof, n) => {
    const s = new Uint16Array(sb, so, n);
    const d = new Uint8Array(db, dof, n);
    for (let i = 0; i < n; i++) d[i] = t[s[i]!]!;
  };
}
function lut16to16(t: Uint16Array): Kernel {
  return (sb, so, db, dof, n) => {
    const s = new Uint16Array(sb, so, n);
    const d = new Uint16Array(db, dof, n);
    for (let i = 0; i < n; i++) d[i] = t[s[i]!]!;
  };
}
function lut16to32(t: Int32Array): Kernel {
  return (sb, so, db, dof, n) => {
    const s = new Uint16Array(sb, so, n);
    const d = new Int32Array(db, dof, n);
    for (let i = 0; i < n; i++) d[i] = t[s[i]!]!;
  };
}

const bf16ToF32: Kernel = (sb, so, db, dof, n) => {
  const s = new Uint16Array(sb, so, n);
  const d = new Int32Array(db, dof, n);
  for (let i = 0; i < n; i++) d[i] = s[i]! << 16;
};

const f32ToBf16: Kernel = (sb, so, db, dof, n) => {
  const s = new Int32Array(sb, so, n);
  const d = new Uint16Array(db, dof, n);
  for (let i = 0; i < n; i++) {
    const u = s[i]!;
    d[i] = (u & 0x7fffffff) > 0x7f800000 ? 0xffff : (u + 0x7fff + ((u >>> 16) & 1)) >>> 16;
  }
};

// The F32-source kernels split three ways: normal results (integer RNE on the bits), results
// below the target's normal range (the c10 / F16C trick: adding 2^k rounds |x| to the target's
// subnormal spacing in one f32 addition; Math.fround of the double sum is that f32 sum exactly,
// since double has more than 2*24+2 bits), and overflow / Inf / NaN.

const f32ToF16: Kernel = (sb, so, db, dof, n) => {
  const s = new Int32Array(sb, so, n);
  const f = new Float32Array(sb, so, n);
  const d = new Uint16Array(db, dof, n);
  for (let i = 0; i < n; i++) {
    const u = s[i]!;
    const a = u & 0x7fffffff;
    if (a < 0x38800000) {
      d[i] = ((u >>> 16) & 0x8000) | ((Math.fround(Math.abs(f[i]!) + 0.5) - 0.5) * 16777216);
    } else if (a < 0x477ff000) {
      d[i] = ((u >>> 16) & 0x8000) | ((a - 0x38000000 + 0xfff + ((a >>> 13) & 1)) >>> 13);
    } else {
      d[i] = f32ToF16Bits(u);
    }
  }
};

const f32ToE4m3: Kernel = (sb, so, db, dof, n) => {
  const s = new Int32Array(sb, so, n);
  const f = new Float32Array(sb, so, n);
  const d = new Uint8Array(db, dof, n);
  for (let i = 0; i < n; i++) {
    const u = s[i]!;
    const a = u & 0x7fffffff;
    if (a < 0x3c800000) {
      d[i] = ((u >>> 24) & 0x80) | ((Math.fround(Math.abs(f[i]!) + 16384) - 16384) * 512);
    } else if (a < 0x43e80000) {
      d[i] = ((u >>> 24) & 0x80) | ((a - 0x3c000000 + 0x7ffff + ((a >>> 20) & 1)) >>> 20);
    } else {
      d[i] = ((u >>> 24) & 0x80) | (a > 0x7f800000 ? 0x7f : 0x7e);
    }
  }
};

const f32ToE5m2: Kernel = (sb, so, db, dof, n) => {
  const s = new Int32Array(sb, so, n);
  const f = new Float32Array(sb, so, n);
  const d = new Uint8Array(db, dof, n);
  for (let i = 0; i < n; i++) {
    const u = s[i]!;
    const a = u & 0x7fffffff;
    if (a < 0x38800000) {
      d[i] = ((u >>> 24) & 0x80) | ((Math.fround(Math.abs(f[i]!) + 128) - 128) * 65536);
    } else if (a < 0x47800000) {
      d[i] = ((u >>> 24) & 0x80) | ((a - 0x38000000 + 0xfffff + ((a >>> 21) & 1)) >>> 21);
    } else {
      d[i] = ((u >>> 24) & 0x80) | (a > 0x7f800000 ? 0x7f : 0x7c);
    }
  }
};

const kernels = new Map<string, Kernel>();

function kernelFor(from: Castable, to: Castable): Kernel {
  const key = `${from}>${to}`;
  let k = kernels.get(key);
  if (k) return k;
  if (from === 'F32') {
    k = to === 'BF16' ? f32ToBf16 : to === 'F16' ? f32ToF16 : to === 'F8_E4M3' ? f32ToE4m3 : f32ToE5m2;
  } else if (from === 'BF16' && to === 'F32') {
    k = bf16ToF32;
  } else {
    const t = tableFor(from, to);
    const wide = SIZE[from] === 2;
    if (t instanceof Int32Array) k = wide ? lut16to32(t) : lut8to32(t);
    else if (t instanceof Uint16Array) k = wide ? lut16to16(t) : lut8to16(t);
    else k = wide ? lut16to8(t) : lut8to8(t);
  }
  kernels.set(key, k);
  return k;
}

// ---------------------------------------------------------------------------------------------

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Elements per chunk on the unaligned path. */
const CHUNK = 16384;
let scratchIn: Uint8Array | undefined;
let scratchOut: Uint8Array | undefined;

/**
 * Converts `src` (raw little-endian bytes of `from`) into `out` (bytes of `to`, length
 * numel*itemsize(to)); returns out. Works for any byteOffset alignment of src/out. `out` may be
 * omitted (a new array is allocated); if it overlaps `src`, `src` is copied first.
 * Throws a RangeError naming both dtypes if the cast is unsupported.
 */
export function castBytes(src: Uint8Array, from: DType, to: DType, out?: Uint8Array): Uint8Array {
  if (!isCastable(from) || !isCastable(to)) {
    throw new RangeError(`castBytes: cannot cast ${from} to ${to} (supported dtypes: ${CASTABLE.join(', ')})`);
  }
  const inSize = SIZE[from];
  const outSize = SIZE[to];
  if (src.byteLength % inSize !== 0) {
    throw new RangeError(`castBytes ${from}→${to}: source length ${src.byteLength} is not a multiple of ${inSize}`);
  }
  const n = src.byteLength / inSize;
  if (out === undefined) out = new Uint8Array(n * outSize);
  else if (out.byteLength !== n * outSize) {
    throw new RangeError(`castBytes ${from}→${to}: output length ${out.byteLength} != ${n} elements × ${outSize} bytes`);
  }
  if (n === 0) return out;
  if (from === to) {
    out.set(src); // TypedArray.prototype.set copies correctly even when the two overlap
    return out;
  }
  if (!LITTLE_ENDIAN) throw new Error('castBytes: big-endian hosts are not supported');
  if (
    out.buffer === src.buffer &&
    out.byteOffset < src.byteOffset + src.byteLength &&
    src.byteOffset < out.byteOffset + out.byteLength
  ) {
    src = src.slice();
  }
  const kernel = kernelFor(from, to);
  const srcAligned = src.byteOffset % inSize === 0;
  const outAligned = out.byteOffset % outSize === 0;
  if (srcAligned && outAligned) {
    kernel(src.buffer, src.byteOffset, out.buffer, out.byteOffset, n);
    return out;
  }
  scratchIn ??= new Uint8Array(CHUNK * 4);
  scratchOut ??= new Uint8Array(CHUNK * 4);
  for (let i = 0; i < n; i += CHUNK) {
    const m = Math.min(CHUNK, n - i);
    let sb: ArrayBufferLike = src.buffer;
    let so = src.byteOffset + i * inSize;
    if (!srcAligned) {
      scratchIn.set(src.subarray(i * inSize, (i + m) * inSize));
      sb = scratchIn.buffer;
      so = 0;
    }
    if (outAligned) {
      kernel(sb, so, out.buffer, out.byteOffset + i * outSize, m);
    } else {
      kernel(sb, so, scratchOut.buffer, 0, m);
      out.set(scratchOut.subarray(0, m * outSize), i * outSize);
    }
  }
  return out;
}
