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
import type { CheckpointSource, SourceTensor } from '../formats/types.js';
import { badInput } from '../errors.js';
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

/** The lazy bf16 view `name` [E, 32G, R] of `blocks` [E, R, G, 16] and `scales` [E, R, G]. */
export function mxfp4Tensor(name: string, blocks: SourceTensor, scales: SourceTensor, file?: string): SourceTensor {
  const bs = blocks.shape;
  const ss = scales.shape;
  if (blocks.dtype !== 'U8' || scales.dtype !== 'U8' || bs.length < 3 || bs[bs.length - 1] !== 16 || ss.length !== bs.length - 1 || ss.some((d, k) => d !== bs[k])) {
    throw badInput(
      `${blocks.name} (${blocks.dtype} [${bs.join(', ')}]) and ${scales.name} (${scales.dtype} [${ss.join(', ')}]) are not MXFP4 blocks and scales: blocks must be U8 [..., R, G, 16] and scales U8 [..., R, G]`,
      file,
      blocks.name,
    );
  }
  const lead = bs.slice(0, -3);
  const R = bs[bs.length - 3]!;
  const G = bs[bs.length - 2]!;
  const shape = [...lead, G * 32, R];
  return {
    name,
    dtype: 'BF16',
    shape,
    byteLength: byteLength('BF16', numelOf(shape)),
    where: `MXFP4 ${blocks.name} + ${scales.name}`,
    read: async (box: Box, out: Uint8Array) => {
      const n = lead.length;
      const c0 = box.start[n]!;
      const cn = box.size[n]!;
      const r0 = box.start[n + 1]!;
      const rn = box.size[n + 1]!;
      const g0 = Math.floor(c0 / 32);
      const gn = Math.ceil((c0 + cn) / 32) - g0;
      const outer = numelOf(box.size.slice(0, n));
      // Rows a slice at a time so the staging stays at SLICE_BYTES whatever the box (the executor
      // has several boxes in flight and counts only their outputs).
      const rs = Math.max(1, Math.min(rn, Math.floor(SLICE_BYTES / (gn * 32 * 4))));
      const blk = new Uint8Array(rs * gn * 16);
      const sc = new Uint8Array(rs * gn);
      const vals = new Float32Array(rs * gn * 32);
      const bits = new Uint32Array(vals.buffer);
      // Every dequantised value is exact in bf16 (see the module comment), so bf16 is the top half
      // of the fp32 bits: no rounding step. Unaligned outputs go through a staging copy.
      const aligned = out.byteOffset % 2 === 0;
      const o16 = aligned ? new Uint16Array(out.buffer, out.byteOffset, out.byteLength / 2) : new Uint16Array(numelOf(box.size));
      const off = c0 - g0 * 32;
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
          await blocks.read({ start: [...idx, r0 + ra, g0, 0], size: [...idx.map(() => 1), rk, gn, 16] }, blk.subarray(0, rk * gn * 16));
          await scales.read({ start: [...idx, r0 + ra, g0], size: [...idx.map(() => 1), rk, gn] }, sc.subarray(0, rk * gn));
          dequantRows(blk, sc, rk, gn, vals);
          // Transpose [rk, 32·gn] (columns from c0) into rows ra … ra+rk of [cn, rn].
          for (let r = 0; r < rk; r++) {
            const v = r * gn * 32 + off;
            for (let c = 0; c < cn; c++) o16[base + c * rn + ra + r] = bits[v + c]! >>> 16;
          }
        }
      }
      if (!aligned) out.set(new Uint8Array(o16.buffer));
    },
  };
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
