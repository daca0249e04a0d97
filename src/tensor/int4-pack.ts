/**
 * compressed-tensors' `pack-quantized` INT4 weights (Kimi K2-Thinking / K2.5 / K2.6 routed experts:
 * symmetric, per-group scales along the input dim) dequantised bit for bit as the package itself
 * does (`PackedQuantizationCompressor.decompress_weight`):
 *
 *   unpack_from_int32: value k of row r = ((packed[r, k / 8] >> 4·(k % 8)) & 0xF) − 8   (int8)
 *   dequantize:        x = (value.to(scale.dtype) * scale[r, k / group]).to(scale.dtype)
 *
 * The product of a 4-bit integer and a bf16 (8-bit) / fp16 (11-bit) / fp32 (24-bit) scale is exact
 * in a double; rounding it once to the scale's dtype is what torch's CPU kernels do (they compute
 * the bf16 product in float32, where it is exact too, then round to nearest-even). The float32 →
 * bf16 / fp16 step is `cast.ts`'s, proven against torch.
 */
import { castBytes } from './cast.js';

export type ScaleDtype = 'BF16' | 'F16' | 'F32';

/**
 * Rows of a box: `packed` holds `rows × words` little-endian int32 words starting at word column
 * `w0`; `scales` the rows' scales as float32, `rows × sCols` from group column `g0`; writes
 * `rows × cn` values of columns `c0 … c0 + cn` in `dtype` into `out`. `f32` is scratch of at
 * least rows × cn floats.
 */
export function dequantInt4Rows(
  packed: Uint8Array,
  rows: number,
  words: number,
  w0: number,
  scales: Float32Array,
  sCols: number,
  g0: number,
  group: number,
  c0: number,
  cn: number,
  dtype: ScaleDtype,
  f32: Float32Array,
  out: Uint8Array,
): void {
  const dv = new DataView(packed.buffer, packed.byteOffset, packed.byteLength);
  for (let r = 0; r < rows; r++) {
    for (let j = 0; j < cn; j++) {
      const c = c0 + j;
      const word = dv.getInt32((r * words + (Math.floor(c / 8) - w0)) * 4, true);
      const q = ((word >>> (4 * (c % 8))) & 0xf) - 8;
      f32[r * cn + j] = q * scales[r * sCols + Math.floor(c / group) - g0]!;
    }
  }
  const bytes = new Uint8Array(f32.buffer, f32.byteOffset, rows * cn * 4);
  if (dtype === 'F32') out.set(bytes);
  else castBytes(bytes, 'F32', dtype, out);
}
