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
 * The kernels (on whichever thread runs them); the lazy view over a checkpoint's pairs, which reads
 * only the blocks and scales of the rows and column blocks a box covers, is `formats/mxfp4.ts`.
 */

/** Staging per slice of rows of a box read (see `mxfp4Tensor`). */
export const SLICE_BYTES = 1 << 20;

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
export function writeRows(blk: Uint8Array, sc: Uint8Array, gn: number, n: number, q: (x: number) => number, off: number, cn: number, out: Uint8Array): void {
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
