/**
 * bf16 → block-scaled FP8 as DeepSeek-V3's hub checkpoints store it (`X` float8_e4m3fn,
 * `X_scale_inv` float32 per `br × bc` block), computed exactly as the reference quantizer
 * Megatron-Bridge uses to write that layout back (`quantization_utils._quantize_fp8_2d_blocks`
 * with `scale_from_amax`):
 *
 *   amax  = max |x| over the block (float32; x is bf16, widened exactly)
 *   scale = amax > 0 ? fp32(amax / 448) : 1          (stored as X_scale_inv)
 *   q     = e4m3(fp32(x / scale))                     (torch's float32 → float8_e4m3fn cast)
 *
 * In JavaScript both divisions are exact: a double quotient of two float32 values rounded once
 * to float32 is the correctly rounded float32 quotient (53 ≥ 2·24 + 2 bits), and the e4m3 cast is
 * `cast.ts`'s, proven against torch. Non-finite weights are refused: their block's scale would be
 * NaN or Inf and every value of the block garbage.
 *
 * Memory is bounded by a slice, not by the weight: a band's scales (one float per block of a
 * block row) are computed by reading the band's bf16 rows a SLICE_BYTES slice at a time, and a
 * weight box quantizes only its own rows and columns, a slice at a time. Scales are kept in one
 * small cache shared by every weight (SCALE_CACHE bands), so the weight rows of a band and its
 * scales box do not recompute them; the price is that a band's rows are read twice (scales, then
 * values), as the MXFP4 writer's blocks and scales each read their rows.
 */
import { badInput } from '../util/errors.js';
import { castBytes } from './cast.js';
import type { Box } from './layout.js';
import type { DType } from './dtype.js';

/** The e4m3 format's largest finite value (torch.finfo(torch.float8_e4m3fn).max). */
const E4M3_MAX = 448;
const SLICE_BYTES = 4 << 20;
/** Bands whose scales are kept (each ⌈C/bc⌉ floats: a few hundred bytes). */
const SCALE_CACHE = 512;

export interface Bf16Weight {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  produce(box: Box, out: Uint8Array): Promise<void>;
}

export interface Fp8Pair {
  readonly scalesShape: readonly number[];
  weight(box: Box, out: Uint8Array): Promise<void>;
  scales(box: Box, out: Uint8Array): Promise<void>;
}

/** Band scales by (weight, band), oldest first; in-flight computations are shared. */
const scaleCache = new Map<string, Promise<Float32Array>>();
let pairs = 0;

/** Rows [r, r + n), columns [c0, c0 + cn) of the weight as float32 (exact). */
async function rowsF32(w: Bf16Weight, r: number, n: number, c0: number, cn: number): Promise<Float32Array> {
  const raw = new Uint8Array(n * cn * 2);
  await w.produce({ start: [r, c0], size: [n, cn] }, raw);
  const f = castBytes(raw, 'BF16', 'F32');
  return new Float32Array(f.buffer, f.byteOffset, n * cn);
}

/** The block-scaled FP8 pair of a 2-D bf16 weight [R, C] in `br × bc` blocks. */
export function fp8BlockPair(w: Bf16Weight, br: number, bc: number): Fp8Pair {
  if (w.dtype !== 'BF16') throw badInput(`${w.name}: block FP8 quantizes bf16 weights, not ${w.dtype}`, undefined, w.name);
  if (w.shape.length !== 2) throw badInput(`${w.name}: a block FP8 weight is 2-D, not [${w.shape.join(', ')}]`, undefined, w.name);
  const [R, C] = w.shape as [number, number];
  const sc = Math.ceil(C / bc);
  const id = pairs++;
  const sliceRows = (cols: number): number => Math.max(1, Math.floor(SLICE_BYTES / (cols * 4)));

  const computeBand = async (b: number): Promise<Float32Array> => {
    const r0 = b * br;
    const rows = Math.min(br, R - r0);
    const amax = new Float32Array(sc);
    const step = sliceRows(C);
    for (let a = 0; a < rows; a += step) {
      const n = Math.min(step, rows - a);
      const x = await rowsF32(w, r0 + a, n, 0, C);
      for (let r = 0; r < n; r++) {
        for (let c = 0; c < C; c++) {
          const v = Math.abs(x[r * C + c]!);
          if (!(v < Infinity)) throw badInput(`${w.name}: row ${r0 + a + r}, column ${c} is ${x[r * C + c]}; block FP8 has no encoding for non-finite weights`, undefined, w.name);
          const j = Math.floor(c / bc);
          if (v > amax[j]!) amax[j] = v;
        }
      }
    }
    return amax.map((m) => (m > 0 ? Math.fround(m / E4M3_MAX) : 1));
  };
  const band = (b: number): Promise<Float32Array> => {
    const key = `${id}:${b}`;
    let p = scaleCache.get(key);
    if (!p) {
      p = computeBand(b);
      scaleCache.set(key, p);
      // A failed band is not kept: the error is reported once, by the read that asked.
      p.catch(() => scaleCache.delete(key));
      if (scaleCache.size > SCALE_CACHE) scaleCache.delete(scaleCache.keys().next().value!);
    }
    return p;
  };
  return {
    scalesShape: [Math.ceil(R / br), sc],
    async weight(box, out) {
      const [r0, c0] = box.start as [number, number];
      const [rn, cn] = box.size as [number, number];
      if (rn === 0 || cn === 0) return;
      const step = sliceRows(cn);
      for (let a = 0; a < rn; ) {
        // A slice within one band: its rows share one row of scales.
        const b = Math.floor((r0 + a) / br);
        const n = Math.min(step, rn - a, (b + 1) * br - (r0 + a));
        const s = await band(b);
        const x = await rowsF32(w, r0 + a, n, c0, cn);
        for (let r = 0; r < n; r++) for (let c = 0; c < cn; c++) x[r * cn + c] = x[r * cn + c]! / s[Math.floor((c0 + c) / bc)]!;
        castBytes(new Uint8Array(x.buffer, x.byteOffset, n * cn * 4), 'F32', 'F8_E4M3', out.subarray(a * cn, (a + n) * cn));
        a += n;
      }
    },
    async scales(box, out) {
      const [b0, j0] = box.start as [number, number];
      const [bn, jn] = box.size as [number, number];
      const f = new Float32Array(bn * jn);
      for (let b = 0; b < bn; b++) f.set((await band(b0 + b)).subarray(j0, j0 + jn), b * jn);
      out.set(new Uint8Array(f.buffer));
    },
  };
}
