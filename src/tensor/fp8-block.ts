/**
 * Block-scaled FP8 dequantisation (DeepSeek-V3's `float8_e4m3fn` weights with a float32
 * `weight_scale_inv` per 128×128 block), bit-identical to the reference every converter uses:
 * Megatron-Bridge's `quantization_utils.dequantize_fp8_blockwise` —
 * `(weight.float() * scale_inv[bi, bj]).to(torch.bfloat16)`, the same arithmetic as DeepSeek's
 * `fp8_cast_bf16.py` (its Triton `weight_dequant`: `x.to(float32) * s`, stored as bf16) and
 * transformers' FP8 dequantisation.
 *
 * Why the arithmetic is exact here: an e4m3 value has 4 significant bits and a float32 scale 24,
 * so their product has at most 28 and is exact in a double (and well inside its exponent range);
 * storing it into a Float32Array rounds it once, to nearest-even, subnormals and overflow to ±Inf
 * included — exactly IEEE float32 multiplication, which torch's CPU kernels do (no flush to zero).
 * The float32 → bf16 step is `cast.ts`'s, proven against torch (RNE, every NaN → 0x7FC0), and so
 * is the e4m3 → float32 table (its NaN bytes 0x7F / 0xFF stay NaN).
 */
import { castBytes } from './cast.js';

/** float32 value of every e4m3 byte, from the cast proven against torch. */
const E4M3: Float32Array = (() => {
  const all = Uint8Array.from({ length: 256 }, (_, k) => k);
  const f = castBytes(all, 'F8_E4M3', 'F32');
  return new Float32Array(f.buffer, f.byteOffset, 256).slice();
})();

/**
 * The bf16 bits of every e4m3 byte times `scale` (256 entries): one block's whole dequantisation,
 * computed once per block and looked up per value (the same arithmetic as per value, see above).
 */
function blockTable(scale: number, f32: Float32Array, t16: Uint16Array): void {
  for (let b = 0; b < 256; b++) f32[b] = E4M3[b]! * scale;
  castBytes(new Uint8Array(f32.buffer, f32.byteOffset, 1024), 'F32', 'BF16', new Uint8Array(t16.buffer, t16.byteOffset, 512));
}

/**
 * Dequantises rows of a box: `q` holds `rows × cols` e4m3 bytes (row-major) of a weight whose
 * block grid is `br × bc`; the box starts at weight row `r0`, column `c0`; `scales` holds the
 * box's block scales row-major over `[sRows, sCols]` with block (r0/br, c0/bc) first. Writes
 * `rows × cols` bf16 values into `out` (2 bytes each, little-endian).
 */
export function dequantFp8Block(q: Uint8Array, rows: number, cols: number, r0: number, c0: number, br: number, bc: number, scales: Float32Array, sCols: number, out: Uint8Array): void {
  const rb0 = Math.floor(r0 / br);
  const cb0 = Math.floor(c0 / bc);
  const sRows = Math.floor((r0 + rows - 1) / br) - rb0 + 1;
  if (br * bc < 256) {
    // Blocks smaller than a table: value by value (the same arithmetic).
    const f = new Float32Array(rows * cols);
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) f[r * cols + c] = E4M3[q[r * cols + c]!]! * scales[(Math.floor((r0 + r) / br) - rb0) * sCols + Math.floor((c0 + c) / bc) - cb0]!;
    castBytes(new Uint8Array(f.buffer), 'F32', 'BF16', out);
    return;
  }
  // One 256-entry table per block the box touches.
  const tables = new Uint16Array(sRows * sCols * 256);
  const f32 = new Float32Array(256);
  for (let k = 0; k < sRows * sCols; k++) blockTable(scales[k]!, f32, tables.subarray(k * 256, (k + 1) * 256));
  const aligned = out.byteOffset % 2 === 0;
  const o16 = aligned ? new Uint16Array(out.buffer, out.byteOffset, rows * cols) : new Uint16Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const srow = (Math.floor((r0 + r) / br) - rb0) * sCols;
    const base = r * cols;
    let c = 0;
    while (c < cols) {
      const cb = Math.floor((c0 + c) / bc);
      const end = Math.min(cols, (cb + 1) * bc - c0);
      const t = (srow + cb - cb0) * 256;
      for (; c < end; c++) o16[base + c] = tables[t + q[base + c]!]!;
    }
  }
  if (!aligned) out.set(new Uint8Array(o16.buffer, 0, rows * cols * 2));
}
