/**
 * One block of a LoRA merge, in place: W ← round(W + ΔW) for a box of a 2-D weight, where
 * ΔW = f32(chain(X·Y) × scaling). Runs on the executor's worker pool (`tensor/pool-worker.ts`) or
 * inline; the bytes are the same either way. All inputs are SharedArrayBuffers so a task is posted
 * to a worker without copying.
 *
 * The rounding (see merge.ts): ΔW element by element as the kernel computes it, optionally rounded
 * to the base dtype first (peft's safe_merge / embeddings), then the base value widened to fp32,
 * one fp32 add, one rounding to the base dtype.
 */
import type { DType } from './dtype.js';
import { byteLength } from './dtype.js';
import { chainBlock, mergeBlock, setFmaKernel, type FmaKernelChoice } from './fma-kernel.js';
import { fromF32, roundThrough, toF32 } from './fp32.js';

/** X and Y with W[R, C] = Σ_k X[R, k]·Y[k, C]: float32 values as f64, shared. */
export interface FactorMatrices {
  readonly r: number;
  /** MKL's chain block for r on the machine being reproduced (fp32.ts `mklBlock`). */
  readonly kc: number;
  /** [rows of W, r] */
  readonly x: Float64Array;
  /** [r, cols of W] */
  readonly y: Float64Array;
  readonly cols: number;
}

export interface LoraMergeTask {
  readonly kind: 'lora';
  /** The box's bytes in the base dtype (row-major [n, w]); replaced by the merged bytes. */
  readonly buf: SharedArrayBuffer;
  readonly offset: number;
  readonly dtype: DType;
  /** Box: rows r0..r0+n, columns c0..c0+w of W. */
  readonly r0: number;
  readonly n: number;
  readonly c0: number;
  readonly w: number;
  readonly factors: FactorMatrices;
  /** fp32 scaling. */
  readonly scale: number;
  readonly roundDelta: boolean;
  /** The kernel choice of the thread that made the task (fma-kernel.ts). */
  readonly kernel: FmaKernelChoice;
}

/** f32 ΔW for rows r0..r0+n × cols c0..c0+w (scaled, rounded to `roundTo` first if given). */
export function deltaBlock(f: FactorMatrices, r0: number, n: number, c0: number, w: number, scale: number, roundTo?: DType): Float32Array {
  const out = new Float32Array(n * w);
  chainBlock({ x: f.x, x0: r0, y: f.y, yCols: f.cols, y0: c0, n, w, r: f.r, kc: f.kc, scale }, out);
  if (roundTo) roundThrough(out, roundTo);
  return out;
}

/** Runs a merge task (in a worker or inline); returns the bytes merged. */
export function runLoraMerge(t: LoraMergeTask): number {
  setFmaKernel(t.kernel);
  const bytes = new Uint8Array(t.buf, t.offset, byteLength(t.dtype, t.n * t.w));
  // Rows at a time, so a worker's temporaries stay a few MiB whatever the box (JS epilogue).
  const step = Math.max(1, Math.floor((1 << 20) / t.w));
  const rowBytes = byteLength(t.dtype, t.w);
  const f = t.factors;
  for (let i = 0; i < t.n; i += step) {
    const m = Math.min(step, t.n - i);
    const part = bytes.subarray(i * rowBytes, (i + m) * rowBytes);
    if (t.dtype === 'BF16' || t.dtype === 'F32') {
      // The common dtypes: ΔW, rounding and the add all in the kernel.
      mergeBlock({ x: f.x, x0: t.r0 + i, y: f.y, yCols: f.cols, y0: t.c0, n: m, w: t.w, r: f.r, kc: f.kc, scale: t.scale }, { dtype: t.dtype, roundDelta: t.roundDelta, bytes: part });
      continue;
    }
    const d = deltaBlock(t.factors, t.r0 + i, m, t.c0, t.w, t.scale, t.roundDelta ? t.dtype : undefined);
    const v = toF32(part, t.dtype);
    for (let k = 0; k < v.length; k++) v[k] = Math.fround(v[k]! + d[k]!);
    fromF32(v, t.dtype, part);
  }
  return bytes.length;
}
