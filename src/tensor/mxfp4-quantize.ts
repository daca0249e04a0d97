/**
 * bf16 → MXFP4 as transformers 5.24 quantizes GPT-OSS experts (`integrations/mxfp4.py:
 * quantize_to_mxfp4` → the hub kernel's `numerics_details.mxfp.downcast_to_mxfp_torch(w.to(bf16),
 * uint8, axis=1)`, DequantScaleRoundingMode.ROUND_UP), laid out as the hub checkpoints store it
 * (`Mxfp4ReverseDeserialize`: blocks [..., N, K/32, 16], scales [..., N, K/32] for an HF weight
 * [..., K, N] quantized along its input dim K). Per block of 32 inputs of one output row:
 *
 *   max   = max |x| (fp32)            ds = fp32(max / 6)
 *   scale = (bits(ds) + 0x7FFFFF) & 0x7F800000   — ds rounded up to a power of two
 *   q     = fp32(x · (scale == 0 ? 0 : 1 / scale))
 *   code  = sign(q) | min(7, ((E2 << 2 | top two mantissa bits of q) + 1) >> 1), E2 the e2m1
 *           exponent (fp32 exponents below 127 shift the mantissa right first: the subnormals)
 *   byte  = code[2j] | code[2j+1] << 4,   scale byte = bits(scale) >> 23
 *
 * That is the kernel's own integer formulation (round half away from zero on the kept bits, no
 * sticky bit), not IEEE rounding; it is reproduced bit for bit, checked against the real function
 * on every bf16 exponent and the edge cases (test/fixtures/mxfp4-quantize.safetensors, made by
 * test/oracle/mxfp4_oracle.py). Non-finite weights are refused: MXFP4 has no encoding for them and
 * the kernel turns a whole block into garbage around one.
 *
 * Written by hand: no JavaScript library implements the kernel's rounding.
 */
import { badInput } from '../util/errors.js';
import type { DType } from './dtype.js';
import type { Box } from './layout.js';

const f32 = new Float32Array(1);
const i32 = new Int32Array(f32.buffer);

function bitsOf(x: number): number {
  f32[0] = x;
  return i32[0]!;
}

/** The e2m1 code (sign in bit 3) of an fp32 value given by its bits, as the kernel computes it. */
export function e2m1Code(q: number): number {
  const sign = q < 0 ? 8 : 0; // bit 31
  const exp = (q >>> 23) & 0xff;
  let mant = q & 0x7fffff;
  if (exp < 127) {
    const shift = 127 - exp - 1;
    // torch's >> on int32 saturates at 31 bits (a positive value becomes 0); JS takes it mod 32.
    mant = shift >= 31 ? 0 : (0x400000 | (mant >>> 1)) >> shift;
  }
  const e = Math.max(exp, 126) - 126;
  const code = (((e << 2) | (mant >>> 21)) + 1) >>> 1;
  return sign | Math.min(code, 7);
}

/**
 * CODE[exponent << 7 | mantissa]: the e2m1 magnitude of a normal fp32 value whose bf16 bits are
 * (exponent, 7-bit mantissa) — every product x · 2^k of a bf16 x with a normal result is such a
 * value, so a block quantizes by table lookup after an exponent add. Built from `e2m1Code`.
 */
let CODE: Uint8Array | undefined;
function codeTable(): Uint8Array {
  if (CODE) return CODE;
  const t = new Uint8Array(256 * 128);
  for (let e = 1; e < 255; e++) for (let m = 0; m < 128; m++) t[(e << 7) | m] = e2m1Code(((e << 23) | (m << 16)) >>> 0) & 7;
  CODE = t;
  return t;
}

/** Why a row cannot be quantized: a non-finite value at column `col`. */
export class NonFiniteWeight extends Error {
  constructor(readonly col: number) {
    super(`non-finite value at input ${col}`);
  }
}

/**
 * Quantizes one row of `K` bf16 values (bits in `row[at … at+K)`, K a multiple of 32) into
 * `blocks[b0 …]` (K/2 bytes; none: scales only) and `scales[s0 …]` (K/32 bytes).
 */
export function quantizeRow(row: Uint16Array, at: number, K: number, blocks: Uint8Array | undefined, b0: number, scales: Uint8Array, s0: number): void {
  const table = codeTable();
  for (let g = 0; g < K / 32; g++) {
    const base = at + g * 32;
    let maxBits = 0;
    for (let j = 0; j < 32; j++) {
      const m = row[base + j]! & 0x7fff;
      if (m >= 0x7f80) throw new NonFiniteWeight(g * 32 + j);
      if (m > maxBits) maxBits = m;
    }
    // max / 6 in fp32 (a double quotient of two floats rounds to the same fp32), rounded up to a power of two.
    const ds = bitsOf(Math.fround(bitsToFloat(maxBits << 16) / 6));
    const rounded = ((ds + 0x7fffff) | 0) & 0x7f800000;
    const se = rounded >>> 23;
    scales[s0 + g] = se;
    if (!blocks) continue; // scales only
    const o = b0 + g * 16;
    if (rounded === 0 || se === 255) {
      // quant scale 0 (a zero block, or a scale past fp32's range): every q is ±0.
      for (let j = 0; j < 16; j++) blocks[o + j] = ((row[base + 2 * j]! >> 12) & 8) | (((row[base + 2 * j + 1]! >> 12) & 8) << 4);
      continue;
    }
    const k = 127 - se; // q = x · 2^k, exactly (k in −127 … 126)
    const quant = 2 ** k;
    for (let j = 0; j < 16; j++) {
      let byte = 0;
      for (let h = 0; h < 2; h++) {
        const b = row[base + 2 * j + h]!;
        const ex = (b >> 7) & 0xff;
        const eq = ex + k;
        let code: number;
        if (ex !== 0 && eq > 0 && eq < 255) code = ((b >> 12) & 8) | table[(eq << 7) | (b & 0x7f)]!;
        else code = e2m1Code(bitsOf(Math.fround(bitsToFloat(b << 16) * quant))); // subnormal x or product: the slow path
        byte |= code << (4 * h);
      }
      blocks[o + j] = byte;
    }
  }
}

function bitsToFloat(bits: number): number {
  i32[0] = bits;
  return f32[0]!;
}

/** What the quantizer reads: a lazy bf16 tensor's boxes (a produced target tensor is one). */
export interface Bf16Boxes {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  produce(box: Box, out: Uint8Array): Promise<void>;
}

/** Staging per slice of a quantizing read. */
const SLICE_BYTES = 4 << 20;

/**
 * Output rows n0 … n0+nn of `w` [..., K, N] at leading index `lead`, quantized: `blocks`
 * [nn, K/32, 16] and `scales` [nn, K/32], read a slice of rows at a time.
 */
export async function quantizeRows(w: Bf16Boxes, lead: readonly number[], n0: number, nn: number, blocks: Uint8Array | undefined, scales: Uint8Array): Promise<void> {
  const K = w.shape[w.shape.length - 2]!;
  const G = K / 32;
  const ns = Math.max(1, Math.min(nn, Math.floor(SLICE_BYTES / (K * 2))));
  const buf = new Uint16Array(K * ns);
  const bytes = new Uint8Array(buf.buffer);
  const rowsT = new Uint16Array(K * ns);
  const one = lead.map(() => 1);
  for (let a = 0; a < nn; a += ns) {
    const m = Math.min(ns, nn - a);
    // [K, m] of the input-major HF weight: column r is output row n0 + a + r.
    await w.produce({ start: [...lead, 0, n0 + a], size: [...one, K, m] }, bytes.subarray(0, K * m * 2));
    // Transposed to [m, K] in 32 × 32 tiles (a column-by-column gather misses the cache on every element).
    for (let c0 = 0; c0 < K; c0 += 32) {
      const c1 = Math.min(K, c0 + 32);
      for (let r0 = 0; r0 < m; r0 += 32) {
        const r1 = Math.min(m, r0 + 32);
        for (let c = c0; c < c1; c++) for (let r = r0; r < r1; r++) rowsT[r * K + c] = buf[c * m + r]!;
      }
    }
    for (let r = 0; r < m; r++) {
      try {
        quantizeRow(rowsT, r * K, K, blocks, (a + r) * G * 16, scales, (a + r) * G);
      } catch (e) {
        if (e instanceof NonFiniteWeight) throw badInput(`${w.name}: [${[...lead, e.col, n0 + a + r].join(', ')}] is not finite; MXFP4 cannot encode it (--quantize mxfp4)`, undefined, w.name);
        throw e;
      }
    }
  }
}

/** The hub's MXFP4 tensor pair for an HF weight `w` [..., K, N]: shapes, and a box reader each. */
export interface Mxfp4Pair {
  readonly blocksShape: readonly number[];
  readonly scalesShape: readonly number[];
  /** A box of blocks [..., N, G, 16]. */
  blocks(box: { readonly start: readonly number[]; readonly size: readonly number[] }, out: Uint8Array): Promise<void>;
  /** A box of scales [..., N, G]. */
  scales(box: { readonly start: readonly number[]; readonly size: readonly number[] }, out: Uint8Array): Promise<void>;
}

/**
 * Lazy MXFP4 blocks and scales of `w` (bf16 [..., K, N], K a multiple of 32). Each reads the
 * rows its box covers: the scales re-read the bf16 rows the blocks read (a scale is 1/16 of its
 * block's bytes; keeping them between the two tensors would cost memory the plan does not count).
 */
export function mxfp4Pair(w: Bf16Boxes): Mxfp4Pair {
  if (w.dtype !== 'BF16') throw badInput(`${w.name}: MXFP4 quantizes bf16 weights, not ${w.dtype}`, undefined, w.name);
  const nd = w.shape.length;
  if (nd < 2) throw badInput(`${w.name}: an MXFP4 weight needs at least 2 dims, not [${w.shape.join(', ')}]`, undefined, w.name);
  const lead = w.shape.slice(0, nd - 2);
  const K = w.shape[nd - 2]!;
  const N = w.shape[nd - 1]!;
  if (K % 32 !== 0) throw badInput(`${w.name}: input dim ${K} is not a multiple of the 32-value MXFP4 block`, undefined, w.name);
  const G = K / 32;
  // Over the leading indices in the box, then rows; `inner` trailing dims per row cut to the box.
  const read = async (box: { readonly start: readonly number[]; readonly size: readonly number[] }, out: Uint8Array, kind: 'blocks' | 'scales'): Promise<void> => {
    const L = lead.length;
    const n0 = box.start[L]!;
    const nn = box.size[L]!;
    const g0 = box.start[L + 1]!;
    const gn = box.size[L + 1]!;
    const j0 = kind === 'blocks' ? box.start[L + 2]! : 0;
    const jn = kind === 'blocks' ? box.size[L + 2]! : 1;
    const outer = box.size.slice(0, L).reduce((p, d) => p * d, 1);
    // Rows a slice at a time: a box of scales covers 16× its bytes of blocks.
    const rs = Math.max(1, Math.min(nn, Math.floor(SLICE_BYTES / (G * 16))));
    const blk = new Uint8Array(kind === 'blocks' ? rs * G * 16 : 0);
    const sc = new Uint8Array(rs * G);
    const idx = box.start.slice(0, L);
    let o = 0;
    for (let x = 0; x < outer; x++) {
      let rem = x;
      for (let d = L - 1; d >= 0; d--) {
        idx[d] = box.start[d]! + (rem % box.size[d]!);
        rem = Math.floor(rem / box.size[d]!);
      }
      for (let a = 0; a < nn; a += rs) {
        const m = Math.min(rs, nn - a);
        await quantizeRows(w, idx, n0 + a, m, kind === 'blocks' ? blk : undefined, sc);
        for (let r = 0; r < m; r++) {
          if (kind === 'scales') {
            out.set(sc.subarray(r * G + g0, r * G + g0 + gn), o);
            o += gn;
          } else if (j0 === 0 && jn === 16) {
            out.set(blk.subarray((r * G + g0) * 16, (r * G + g0 + gn) * 16), o);
            o += gn * 16;
          } else {
            for (let g = g0; g < g0 + gn; g++) {
              out.set(blk.subarray((r * G + g) * 16 + j0, (r * G + g) * 16 + j0 + jn), o);
              o += jn;
            }
          }
        }
      }
    }
  };
  return {
    blocksShape: [...lead, N, G, 16],
    scalesShape: [...lead, N, G],
    blocks: (box, out) => read(box, out, 'blocks'),
    scales: (box, out) => read(box, out, 'scales'),
  };
}
