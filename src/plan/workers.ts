/**
 * Work the executor moves off the main thread, and the knobs that decide when.
 *
 * - SHA-256 of each output file runs on one dedicated worker thread (`hash-worker.ts`): a file's
 *   hash is a sequential stream, so it cannot be split over a task pool. The worker reads the
 *   bytes straight from the executor's SharedArrayBuffer arena; nothing is copied.
 * - Casts and LoRA merges run as tasks on one tinypool of worker threads sized to the cores
 *   (`pool-worker.ts`), also in place in the arena.
 *
 * Both are started lazily, only for outputs large enough to pay for a thread's start-up, and are
 * unref'd while idle so they never keep the process alive.
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import Tinypool from 'tinypool';
import type { DType } from '../tensor/dtype.js';
import type { TargetTensor } from '../formats/types.js';
import type { LoraMergeTask } from '../lora/merge-task.js';
import { mxfp4Offload, runMxfp4Rows, type Mxfp4RowsTask } from '../tensor/mxfp4.js';

/** When the executor uses worker threads (bytes of one output file / of one cast chunk). */
export const workerTuning = {
  /** Files at least this large are hashed on the hash worker; smaller ones inline. */
  hashWorkerMinBytes: 64 << 20,
  /** Cast chunks at least this large go to the cast pool; smaller ones are cast inline. */
  castWorkerMinBytes: 1 << 20,
  /** Threads of the task pool for casts and LoRA merges (0: everything inline). */
  castThreads: availableParallelism(),
};

// ---------------------------------------------------------------------------------------------
// Casts as lazy targets: `castTo` (targets.ts) tags its target so the executor can run the cast
// itself, in its arena and on the pool, instead of calling `produce` (which needs a temporary).

export const CAST_OF = Symbol('shardshift.castOf');

export interface CastInfo {
  readonly inner: TargetTensor;
  readonly from: DType;
  readonly to: DType;
}

export type CastTarget = TargetTensor & { readonly [CAST_OF]?: CastInfo };

export function castInfo(t: TargetTensor): CastInfo | undefined {
  return (t as CastTarget)[CAST_OF];
}

/** Reusable temporaries for casts produced outside the executor (verify, diff, library use). */
const scratch: Uint8Array[] = [];
const SCRATCH_KEEP = 4;

export function takeScratch(n: number): Uint8Array {
  const i = scratch.findIndex((b) => b.length >= n);
  const b = i >= 0 ? scratch.splice(i, 1)[0]! : new Uint8Array(n);
  return b.subarray(0, n);
}

export function giveScratch(b: Uint8Array): void {
  const whole = new Uint8Array(b.buffer, 0, b.buffer.byteLength);
  if (scratch.length < SCRATCH_KEEP) scratch.push(whole);
  else {
    // Keep the largest few.
    scratch.sort((x, y) => x.length - y.length);
    if (scratch[0]!.length < whole.length) scratch[0] = whole;
  }
}

export interface CastTask {
  kind: 'cast';
  arena: SharedArrayBuffer;
  src: number;
  srcLength: number;
  from: DType;
  to: DType;
  dst: number;
  dstLength: number;
}

export type PoolTask = CastTask | LoraMergeTask | Mxfp4RowsTask;

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

/** Runs a cast on the pool; undefined when the pool is disabled (cast inline instead). */
export function castOnPool(task: Omit<CastTask, 'kind'>): Promise<number> | undefined {
  if (poolThreads() <= 0) return undefined;
  return runOnPool({ kind: 'cast', ...task });
}

/**
 * MXFP4 rows read into the arena are dequantised on the pool (`tensor/mxfp4.ts`); slices below
 * the cast threshold, or with the pool disabled, inline.
 */
mxfp4Offload.run = (task: Mxfp4RowsTask): Promise<number> =>
  poolThreads() > 0 && task.rows.length * task.cn * 2 >= workerTuning.castWorkerMinBytes ? runOnPool(task) : Promise.resolve(runMxfp4Rows(task));

// ---------------------------------------------------------------------------------------------
// The hash worker.

export type HashRequest =
  | { type: 'begin'; file: number; arena: SharedArrayBuffer }
  /** Ranges [offset, length] of the file's arena, or copied bytes, in file order. */
  | { type: 'update'; file: number; seq: number; chunks: Array<[number, number] | Uint8Array> }
  | { type: 'digest'; file: number }
  | { type: 'drop'; file: number };

export type HashReply =
  | { type: 'updated'; file: number; seq: number }
  | { type: 'digest'; file: number; hex: string }
  | { type: 'error'; file: number; message: string };

let worker: Worker | undefined;
let nextFile = 1;
const open = new Map<number, HashStream>();

function hashWorker(): Worker {
  if (worker) return worker;
  const w = new Worker(new URL('./hash-worker.js', import.meta.url));
  w.on('message', (m: HashReply) => open.get(m.file)?.onReply(m));
  w.on('error', (e) => {
    worker = undefined;
    for (const s of open.values()) s.fail(e);
  });
  w.on('exit', () => {
    if (worker === w) worker = undefined;
    for (const s of open.values()) s.fail(new Error('the hash worker exited'));
  });
  w.unref();
  worker = w;
  return w;
}

/**
 * One file's SHA-256 on the hash worker. `update` posts ranges of `arena` in file order and calls
 * `done` when the worker has consumed them; `digest` ends the stream.
 */
export class HashStream {
  private readonly id = nextFile++;
  private readonly w: Worker;
  private seq = 0;
  private readonly pending = new Map<number, () => void>();
  private digestWaiter: { res: (hex: string) => void; rej: (e: Error) => void } | undefined;
  private error: Error | undefined;

  constructor(arena: SharedArrayBuffer) {
    this.w = hashWorker();
    if (open.size === 0) this.w.ref();
    open.set(this.id, this);
    this.post({ type: 'begin', file: this.id, arena });
  }

  private post(m: HashRequest): void {
    this.w.postMessage(m);
  }

  update(chunks: Array<[number, number] | Uint8Array>, done: () => void): void {
    if (this.error) throw this.error;
    const seq = this.seq++;
    this.pending.set(seq, done);
    this.post({ type: 'update', file: this.id, seq, chunks });
  }

  digest(): Promise<string> {
    if (this.error) return Promise.reject(this.error);
    return new Promise((res, rej) => {
      this.digestWaiter = { res, rej };
      this.post({ type: 'digest', file: this.id });
    });
  }

  /** Abandons the stream (after an error). */
  drop(): void {
    if (!open.has(this.id)) return;
    this.post({ type: 'drop', file: this.id });
    this.close();
  }

  onReply(m: HashReply): void {
    if (m.type === 'updated') {
      const f = this.pending.get(m.seq);
      this.pending.delete(m.seq);
      f?.();
    } else if (m.type === 'digest') {
      this.close();
      this.digestWaiter?.res(m.hex);
    } else this.fail(new Error(m.message));
  }

  fail(e: Error): void {
    this.error = e;
    this.close();
    this.digestWaiter?.rej(e);
    // Release whoever waits on an update; the executor sees the error at its next step.
    for (const f of this.pending.values()) f();
    this.pending.clear();
  }

  get failed(): Error | undefined {
    return this.error;
  }

  private close(): void {
    open.delete(this.id);
    if (open.size === 0) this.w.unref();
  }
}
