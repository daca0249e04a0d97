/**
 * Runs a block of the reference forward's matmul (`matmul.ts`) on the task pool: activations and
 * weight rows are copied into one SharedArrayBuffer, a worker writes the products into it, and the
 * result is copied out. Small blocks (and a pool with no threads) run inline.
 */
import { matmulRowsJs } from './matmul.js';
import { poolThreads, runOnPool, type PoolTask } from './pool.js';

/** A worker's share: out = x · wᵀ, all three in `arena` (fp32, at the given element offsets). */
export interface MatmulTask extends PoolTask {
  readonly kind: 'matmul';
  readonly arena: SharedArrayBuffer;
  readonly T: number;
  readonly K: number;
  readonly N: number;
  readonly x: number;
  readonly w: number;
  readonly out: number;
}

/** Multiply-adds below which a block is not worth the trip to a worker. */
const POOL_MIN_MACS = 1 << 18;

export function runMatmulTask(t: MatmulTask): number {
  const f = new Float32Array(t.arena);
  matmulRowsJs(f.subarray(t.x, t.x + t.T * t.K), t.T, t.K, f.subarray(t.w, t.w + t.N * t.K), t.N, f.subarray(t.out, t.out + t.T * t.N), t.N, 0);
  return t.T * t.N;
}

/** out[t * outStride + outCol + n] = Σ_k x[t, k] · w[n, k] for the N rows of `w`. */
export async function matmulRows(x: Float32Array, T: number, K: number, w: Float32Array, N: number, out: Float32Array, outStride: number, outCol: number): Promise<void> {
  const threads = poolThreads();
  if (threads <= 0 || T * K * N < POOL_MIN_MACS) {
    matmulRowsJs(x, T, K, w, N, out, outStride, outCol);
    return;
  }
  // One task per thread, splitting the rows, so every core works on each block.
  const parts = Math.min(threads, Math.ceil(N / 8));
  const per = Math.ceil(N / parts);
  const jobs: Array<Promise<void>> = [];
  for (let p = 0; p < parts; p++) {
    const n0 = p * per;
    const n = Math.min(N, n0 + per) - n0;
    if (n <= 0) break;
    const arena = new SharedArrayBuffer(4 * (T * K + n * K + T * n));
    const f = new Float32Array(arena);
    f.set(x, 0);
    f.set(w.subarray(n0 * K, (n0 + n) * K), T * K);
    const task: MatmulTask = { kind: 'matmul', arena, T, K, N: n, x: 0, w: T * K, out: T * K + n * K };
    jobs.push(
      runOnPool(task).then(() => {
        const r = f.subarray(task.out, task.out + T * n);
        for (let t = 0; t < T; t++) out.set(r.subarray(t * n, (t + 1) * n), t * outStride + outCol + n0);
      }),
    );
  }
  await Promise.all(jobs);
}
