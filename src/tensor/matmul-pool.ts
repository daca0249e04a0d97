/**
 * Runs blocks of the reference forward's matmul (`matmul-kernel.ts`) on the task pool. The
 * activations, the weight rows (raw, in the checkpoint's dtype, read straight into a shared
 * buffer) and the output are SharedArrayBuffers the workers read and write in place, so the main
 * thread copies nothing; each worker takes a share of the block's rows. Small blocks, and a pool
 * with no threads, run inline.
 */
import type { DType } from './dtype.js';
import { byteLength } from './dtype.js';
import { matmulWasm } from './matmul-kernel.js';
import { poolThreads, runOnPool, type PoolTask } from './pool.js';

/** A worker's share: rows [n0, n0 + N) of the block in `w` against all of `x`, into `out`. */
export interface MatmulTask extends PoolTask {
  readonly kind: 'matmul';
  readonly T: number;
  readonly K: number;
  readonly N: number;
  readonly dtype: DType;
  readonly x: SharedArrayBuffer;
  readonly w: SharedArrayBuffer;
  readonly wOffset: number;
  readonly out: SharedArrayBuffer;
  readonly outStride: number;
  /** Element offset in `out` of this share's first column. */
  readonly outCol: number;
}

/** Multiply-adds below which a block is not worth the trip to a worker. */
const POOL_MIN_MACS = 1 << 20;

export function runMatmulTask(t: MatmulTask): number {
  const w = new Uint8Array(t.w, t.wOffset, byteLength(t.dtype, t.N * t.K));
  matmulWasm(new Float32Array(t.x, 0, t.T * t.K), t.T, t.K, w, t.dtype, t.N, new Float32Array(t.out), t.outStride, t.outCol);
  return t.T * t.N;
}

/** Shared views the pool path needs: `x` and `out` over SharedArrayBuffers, `w` a view of one. */
export interface SharedOperands {
  readonly x: Float32Array;
  readonly w: Uint8Array;
  readonly out: Float32Array;
}

export function sharedF32(n: number): Float32Array {
  return new Float32Array(new SharedArrayBuffer(4 * n));
}

/**
 * out[t * outStride + outCol + n] = Σ_k x[t, k] · w[n, k] for the N rows of `w` (raw bytes of
 * `dtype`). On the pool when `x`, `w` and `out` live in SharedArrayBuffers and the block is big.
 */
export async function matmulRows(x: Float32Array, T: number, K: number, w: Uint8Array, dtype: DType, N: number, out: Float32Array, outStride: number, outCol: number): Promise<void> {
  const threads = poolThreads();
  const shared = x.buffer instanceof SharedArrayBuffer && w.buffer instanceof SharedArrayBuffer && out.buffer instanceof SharedArrayBuffer && x.byteOffset === 0 && out.byteOffset === 0;
  if (threads <= 0 || !shared || T * K * N < POOL_MIN_MACS) {
    matmulWasm(x, T, K, w, dtype, N, out, outStride, outCol);
    return;
  }
  const parts = Math.min(threads, Math.ceil(N / 16));
  const per = Math.ceil(N / parts);
  const rowBytes = byteLength(dtype, K);
  const jobs: Array<Promise<number>> = [];
  for (let n0 = 0; n0 < N; n0 += per) {
    const n = Math.min(N, n0 + per) - n0;
    const task: MatmulTask = {
        kind: 'matmul',
        T,
        K,
        N: n,
        dtype,
        x: x.buffer as SharedArrayBuffer,
        w: w.buffer as SharedArrayBuffer,
        wOffset: w.byteOffset + n0 * rowBytes,
        out: out.buffer as SharedArrayBuffer,
        outStride,
        outCol: outCol + n0,
    };
    jobs.push(runOnPool(task));
  }
  await Promise.all(jobs);
}
