/**
 * SHA-256 of each output file on one dedicated worker thread (`hash-worker.ts`): a file's hash is
 * a sequential stream, so it cannot be split over a task pool. The worker reads the bytes straight
 * from the executor's SharedArrayBuffer arena; nothing is copied. Started lazily, only for files
 * of at least `workerTuning.hashWorkerMinBytes`, and unref'd while idle so it never keeps the
 * process alive.
 */
import { Worker } from 'node:worker_threads';


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
