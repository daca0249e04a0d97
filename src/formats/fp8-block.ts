/**
 * Block-scaled FP8 weights (DeepSeek-V3 / R1 / V3.1 hub checkpoints: `X` float8_e4m3fn with
 * `X_scale_inv` float32 over `weight_block_size` blocks, per `quantization_config`
 * `{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}`) read as the bf16
 * tensors the reference dequantises them to (the arithmetic and why it is exact:
 * `tensor/fp8-block.ts`). Lazy: a box reads only its own fp8 bytes and the scales of the blocks it
 * touches, a slice of rows at a time, so the staging stays small whatever the box.
 */
import type { CheckpointSource } from './types.js';
import type { SourceTensor } from '../lazy/types.js';
import { badInput, unsupported } from '../util/errors.js';
import { byteLength, numelOf } from '../tensor/dtype.js';
import type { Box } from '../tensor/layout.js';
import { castBytes } from '../tensor/cast.js';
import { dequantFp8Block } from '../tensor/fp8-block.js';

/** Staging per slice (fp8 bytes). */
const SLICE_BYTES = 1 << 20;

/** The block grid of an FP8 checkpoint, from its `quantization_config`. */
export interface Fp8BlockScheme {
  readonly blockRows: number;
  readonly blockCols: number;
}

/**
 * The FP8 scheme a config.json's `quantization_config` names, or undefined when it names none.
 * Anything but DeepSeek's block-scaled e4m3 weights with dynamic activations is refused by name.
 */
export function fp8SchemeOf(cfg: Readonly<Record<string, unknown>>, file: string): Fp8BlockScheme | undefined {
  const q = cfg.quantization_config as Record<string, unknown> | undefined;
  if (!q || typeof q !== 'object' || q.quant_method !== 'fp8') return undefined;
  const fmt = q.fmt ?? 'e4m3';
  // DeepSeek's configs say "e4m3", MiniMax-M2's the torch dtype name "float8_e4m3fn": one format.
  if (fmt !== 'e4m3' && fmt !== 'float8_e4m3fn') throw unsupported(`${file}: quantization_config fmt ${JSON.stringify(fmt)}; FP8 weights are read as e4m3 (float8_e4m3fn) only`, file);
  const act = q.activation_scheme ?? 'dynamic';
  if (act !== 'dynamic') throw unsupported(`${file}: quantization_config activation_scheme ${JSON.stringify(act)}: static activation scales are not carried`, file);
  const b = q.weight_block_size;
  if (!Array.isArray(b) || b.length !== 2 || !b.every((x) => typeof x === 'number' && Number.isInteger(x) && x > 0)) {
    throw unsupported(`${file}: quantization_config weight_block_size ${JSON.stringify(b)}; only block-scaled FP8 ([rows, cols] blocks) is read`, file);
  }
  return { blockRows: b[0] as number, blockCols: b[1] as number };
}

/** The lazy bf16 view `name` of an e4m3 weight [..., R, C] and its float32 (or bf16) block scales [..., ⌈R/br⌉, ⌈C/bc⌉]. */
export class Fp8BlockTensor implements SourceTensor {
  readonly dtype = 'BF16' as const;
  readonly shape: readonly number[];
  readonly byteLength: number;
  readonly where: string;
  private readonly R: number;
  private readonly C: number;
  private readonly lead: number;

  constructor(
    readonly name: string,
    private readonly weight: SourceTensor,
    private readonly scales: SourceTensor,
    private readonly scheme: Fp8BlockScheme,
    file?: string,
  ) {
    const ws = weight.shape;
    const ss = scales.shape;
    if (ws.length < 2) throw badInput(`${weight.name}: an FP8 block-scaled weight must have at least 2 dimensions, not [${ws.join(', ')}]`, file, weight.name);
    this.R = ws[ws.length - 2]!;
    this.C = ws[ws.length - 1]!;
    this.lead = ws.length - 2;
    const want = [...ws.slice(0, -2), Math.ceil(this.R / scheme.blockRows), Math.ceil(this.C / scheme.blockCols)];
    if (ss.length !== want.length || ss.some((d, k) => d !== want[k])) {
      throw badInput(
        `${scales.name}: shape [${ss.join(', ')}] does not fit ${weight.name} [${ws.join(', ')}] in ${scheme.blockRows}×${scheme.blockCols} blocks, which needs [${want.join(', ')}]`,
        file,
        scales.name,
      );
    }
    if (scales.dtype !== 'F32' && scales.dtype !== 'BF16') throw badInput(`${scales.name}: FP8 block scales must be F32 (or BF16), not ${scales.dtype}`, file, scales.name);
    this.shape = ws;
    this.byteLength = byteLength('BF16', numelOf(ws));
    this.where = `FP8 ${weight.name} × ${scales.name}`;
  }

  async read(box: Box, out: Uint8Array): Promise<void> {
    const n = this.lead;
    const { blockRows: br, blockCols: bc } = this.scheme;
    const r0 = box.start[n]!;
    const rn = box.size[n]!;
    const c0 = box.start[n + 1]!;
    const cn = box.size[n + 1]!;
    if (rn === 0 || cn === 0) return;
    const outer = numelOf(box.size.slice(0, n));
    const step = Math.max(1, Math.min(rn, Math.floor(SLICE_BYTES / cn)));
    const q = new Uint8Array(step * cn);
    const cb0 = Math.floor(c0 / bc);
    const sCols = Math.floor((c0 + cn - 1) / bc) - cb0 + 1;
    const idx = box.start.slice(0, n);
    const one = idx.map(() => 1);
    for (let o = 0; o < outer; o++) {
      let rem = o;
      for (let d = n - 1; d >= 0; d--) {
        idx[d] = box.start[d]! + (rem % box.size[d]!);
        rem = Math.floor(rem / box.size[d]!);
      }
      for (let ra = 0; ra < rn; ra += step) {
        const rk = Math.min(step, rn - ra);
        const rs = r0 + ra;
        const rb0 = Math.floor(rs / br);
        const sRows = Math.floor((rs + rk - 1) / br) - rb0 + 1;
        const raw = new Uint8Array(sRows * sCols * (this.scales.dtype === 'F32' ? 4 : 2));
        await this.scales.read({ start: [...idx, rb0, cb0], size: [...one, sRows, sCols] }, raw);
        const f = this.scales.dtype === 'F32' ? raw : castBytes(raw, 'BF16', 'F32');
        const sc = new Float32Array(f.buffer.slice(f.byteOffset, f.byteOffset + sRows * sCols * 4));
        const qs = q.subarray(0, rk * cn);
        await this.weight.read({ start: [...idx, rs, c0], size: [...one, rk, cn] }, qs);
        const at = (o * rn + ra) * cn * 2;
        dequantFp8Block(qs, rk, cn, rs, c0, br, bc, sc, sCols, out.subarray(at, at + rk * cn * 2));
      }
    }
  }
}

/**
 * `src` with every e4m3 weight `X` and its `X_scale_inv` replaced by the dequantised bf16 `X`;
 * `src` itself when the checkpoint is not FP8. An FP8 weight without scales, scales without their
 * weight, or a scale of another dtype is an error naming the tensor, never a bare cast.
 */
export function withFp8Dequantized(src: CheckpointSource, scheme: Fp8BlockScheme | undefined): CheckpointSource {
  const fp8 = [...src.tensors.values()].filter((t) => t.dtype === 'F8_E4M3');
  const scaleNames = [...src.tensors.keys()].filter((n) => n.endsWith('_scale_inv'));
  if (!fp8.length && !scaleNames.length) return src;
  if (!scheme) {
    const t = fp8[0] ?? src.tensors.get(scaleNames[0]!)!;
    throw badInput(`${t.name}: the checkpoint holds FP8 weights or block scales, but config.json has no FP8 quantization_config naming their block size ({"quant_method": "fp8", "weight_block_size": [128, 128]})`, src.path, t.name);
  }
  const tensors = new Map<string, SourceTensor>();
  for (const [n, t] of src.tensors) {
    const s = /^(.*)_scale_inv$/.exec(n);
    if (s) {
      const w = src.tensors.get(s[1]!);
      if (!w) throw badInput(`${n}: FP8 block scales without their weight ${s[1]}`, src.path, n);
      if (w.dtype !== 'F8_E4M3') throw badInput(`${n}: block scales for ${s[1]}, which is ${w.dtype}, not FP8 (F8_E4M3)`, src.path, n);
      continue;
    }
    if (t.dtype === 'F8_E4M3') {
      const scales = src.tensors.get(`${n}_scale_inv`);
      if (!scales) throw badInput(`${n}: an FP8 (F8_E4M3) weight without ${n}_scale_inv; read as bf16 without its block scales it would be garbage`, src.path, n);
      tensors.set(n, new Fp8BlockTensor(n, t, scales, scheme, src.path));
    } else tensors.set(n, t);
  }
  return { ...src, tensors };
}
