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
 * A box of either tensor reads whole block rows (`br` rows × every column) of the bf16 weight, the
 * band its scales need; the last two bands are kept, so row boxes smaller than a band do not
 * requantize it.
 */
import { badInput } from '../util/errors.js';
import { castBytes } from './cast.js';
import type { Box } from './layout.js';
import type { DType } from './dtype.js';

/** The e4m3 format's largest finite value (torch.finfo(torch.float8_e4m3fn).max). */
const E4M3_MAX = 448;

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

interface Band {
  /** e4m3 bytes, [rows, C]. */
  readonly q: Uint8Array;
  /** Block scales of the band, [⌈C/bc⌉]. */
  readonly scales: Float32Array;
  readonly rows: number;
}

/** The block-scaled FP8 pair of a 2-D bf16 weight [R, C] in `br × bc` blocks. */
export function fp8BlockPair(w: Bf16Weight, br: number, bc: number): Fp8Pair {
  if (w.dtype !== 'BF16') throw badInput(`${w.name}: block FP8 quantizes bf16 weights, not ${w.dtype}`, undefined, w.name);
  if (w.shape.length !== 2) throw badInput(`${w.name}: a block FP8 weight is 2-D, not [${w.shape.join(', ')}]`, undefined, w.name);
  const [R, C] = w.shape as [number, number];
  const sc = Math.ceil(C / bc);
  const cache = new Map<number, Promise<Band>>();
  const band = (b: number): Promise<Band> => {
    let p = cache.get(b);
    if (!p) {
      p = quantizeBand(w, b, br, bc, R, C, sc);
      cache.set(b, p);
      if (cache.size > 2) cache.delete(cache.keys().next().value!);
    }
    return p;
  };
  return {
    scalesShape: [Math.ceil(R / br), sc],
    async weight(box, out) {
      const [r0, c0] = box.start as [number, number];
      const [rn, cn] = box.size as [number, number];
      for (let r = r0; r < r0 + rn; ) {
        const b = Math.floor(r / br);
        const got = await band(b);
        const end = Math.min(r0 + rn, b * br + got.rows);
        for (let x = r; x < end; x++) {
          const at = (x - b * br) * C + c0;
          out.set(got.q.subarray(at, at + cn), (x - r0) * cn);
        }
        r = end;
      }
    },
    async scales(box, out) {
      const [b0, j0] = box.start as [number, number];
      const [bn, jn] = box.size as [number, number];
      const f = new Float32Array(bn * jn);
      for (let b = 0; b < bn; b++) {
        const got = await band(b0 + b);
        f.set(got.scales.subarray(j0, j0 + jn), b * jn);
      }
      out.set(new Uint8Array(f.buffer));
    },
  };
}

async function quantizeBand(w: Bf16Weight, b: number, br: number, bc: number, R: number, C: number, sc: number): Promise<Band> {
  const rows = Math.min(br, R - b * br);
  const raw = new Uint8Array(rows * C * 2);
  await w.produce({ start: [b * br, 0], size: [rows, C] }, raw);
  const fb = castBytes(raw, 'BF16', 'F32');
  const x = new Float32Array(fb.buffer, fb.byteOffset, rows * C);
  const scales = new Float32Array(sc);
  for (let j = 0; j < sc; j++) {
    let amax = 0;
    const c1 = Math.min(C, (j + 1) * bc);
    for (let r = 0; r < rows; r++) {
      for (let c = j * bc; c < c1; c++) {
        const v = Math.abs(x[r * C + c]!);
        if (!(v <= Infinity) || v === Infinity) throw badInput(`${w.name}: row ${b * br + r}, column ${c} is ${x[r * C + c]}; block FP8 has no encoding for non-finite weights`, undefined, w.name);
        if (v > amax) amax = v;
      }
    }
    scales[j] = amax > 0 ? Math.fround(amax / E4M3_MAX) : 1;
  }
  const y = new Float32Array(rows * C);
  for (let r = 0; r < rows; r++) for (let c = 0; c < C; c++) y[r * C + c] = x[r * C + c]! / scales[Math.floor(c / bc)]!;
  const q = castBytes(new Uint8Array(y.buffer), 'F32', 'F8_E4M3');
  return { q, scales, rows };
}
