/**
 * The task pool: one tinypool of worker threads sized to the cores that runs the per-chunk
 * kernels in place in a SharedArrayBuffer — casts, LoRA merge blocks, MXFP4 dequantisation. The
 * pool knows nothing of the kernels: a task is a plain object with a `kind`, and the worker
 * (`pool-worker.ts`) dispatches on it. Started lazily and unref'd while idle, so it never keeps
 * the process alive.
 *
 * `workerTuning` holds every threshold that decides when work leaves the main thread (the hash
 * worker's too, so that tests can switch all of them in one place).
 */
import { availableParallelism } from 'node:os';
import Tinypool from 'tinypool';
import type { DType } from './dtype.js';

/** When the executor uses worker threads (bytes of one output file / of one cast chunk). */
export const workerTuning = {
  /** Files at least this large are hashed on the hash worker; smaller ones inline. */
  hashWorkerMinBytes: 64 << 20,
  /** Cast chunks (and MXFP4 slices) at least this large go to the pool; smaller ones run inline. */
  castWorkerMinBytes: 1 << 20,
  /** Threads of the task pool for casts, LoRA merges and MXFP4 (0: everything inline). */
  castThreads: availableParallelism(),
};

/** A unit of pool work: `kind` selects the kernel in `pool-worker.ts`. */
export interface PoolTask {
  readonly kind: string;
}

/** A cast of one chunk between two disjoint ranges of `arena`. */
export interface CastTask extends PoolTask {
  readonly kind: 'cast';
  readonly arena: SharedArrayBuffer;
  readonly src: number;
  readonly srcLength: number;
  readonly from: DType;
  readonly to: DType;
  readonly dst: number;
  readonly dstLength: number;
}

let pool: Tinypool | undefined;

/** Threads of the task pool (0: run tasks inline). */
export function poolThreads(): number {
  return Math.max(0, workerTuning.castThreads);
}

/** Runs a task on the pool (call only when `poolThreads()` > 0); resolves to the bytes it wrote. */
export function runOnPool(task: PoolTask): Promise<number> {
  pool ??= new Tinypool({
    filename: new URL('./pool-worker.js', import.meta.url).href,
    minThreads: 0,
    maxThreads: workerTuning.castThreads,
    idleTimeout: 2000,
  });
  return pool.run(task) as Promise<number>;
}

/** Whether a chunk of `bytes` is worth a trip to the pool. */
export function poolWorthIt(bytes: number): boolean {
  return poolThreads() > 0 && bytes >= workerTuning.castWorkerMinBytes;
}

/** Runs a cast on the pool; undefined when the pool is disabled (cast inline instead). */
export function castOnPool(task: Omit<CastTask, 'kind'>): Promise<number> | undefined {
  if (poolThreads() <= 0) return undefined;
  return runOnPool({ kind: 'cast', ...task } satisfies CastTask);
}
