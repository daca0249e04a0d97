/**
 * Streams output files to disk with memory bounded by a byte budget.
 *
 * Each file is a list of parts (literal bytes, tensor slots, bytes computed after earlier parts).
 * A tensor is moved in chunks — boxes of at most `chunkBytes` — through one fixed arena of
 * memory (a SharedArrayBuffer allocated once per executor and reused, so the hot path never
 * touches fresh pages). The arena is a ring: chunks are produced into it in file order, read
 * ahead across tensor and part boundaries as far as the arena allows, and released once their
 * bytes have gone on. Reads, casts, hashing and writes all overlap, and peak memory is the arena
 * (plus the staging blocks of direct writes) whatever the model's size.
 *
 * In file order on the main thread: CRC-32 of zip records, computed parts (which may need those
 * CRCs), and handing the bytes to a sink. Off the main thread: reads and writes (libuv), SHA-256
 * of each large file (the hash worker) and casts (a tinypool sized to the cores) — see
 * `tensor/pool.ts` and `exec/hash-worker.ts`. Two sinks:
 *
 * - `BufferedSink` (the default): adjacent chunks batched into one `writev`, two in flight at
 *   distinct positions, and write-back started every 64 MiB (`fdatasync`, one at a time) so the
 *   disk works while tensors are produced and dirty pages never pile up into throttling.
 * - `DirectSink` (large files with SHARDSHIFT_DIRECT_IO=on, when the filesystem takes O_DIRECT):
 *   bytes are copied into aligned staging blocks that are hashed and written straight to the
 *   device, several in flight. It keeps the output out of the page cache, and on one VM it was
 *   the faster path (buffered writes without early write-back stalled on dirty-page throttling);
 *   on another (a virtio disk that splits requests at 254 segments) O_DIRECT from user memory
 *   with physically scattered pages ran at a third of buffered speed — bench/README.md. Opt-in.
 *
 * All-zero runs of tensor data are left as holes (the file is extended to its full size at the
 * end), as `cp --sparse=auto` does; they read back as the same zeros.
 */
import { createExclusive } from '../io/create.js';
import { open, mkdir, unlink, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants, writeSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { crc32 } from 'node:zlib';
import { createHash, type Hash } from 'node:crypto';
import { dtypeInfo, itemSize, numelOf } from '../tensor/dtype.js';
import { castBytes } from '../tensor/cast.js';
import type { Box } from '../tensor/layout.js';
import type { CastTensor, OutputFile, TargetTensor, TensorSlot } from '../lazy/types.js';
import { aborted, ioError, isErrno, unsupported } from '../util/errors.js';
import { castOnPool, workerTuning } from '../tensor/pool.js';
import { HashStream } from './hash.js';
import { produceBox } from '../lazy/expr.js';
import { liveHeapBytes } from '../util/heap.js';

export interface ExecuteOptions {
  /** Byte budget: the plan's live heap and the tensor buffers together. */
  maxMemory: number;
  /** What the plan occupies of the budget (default: the live heap, measured after a full collection). */
  planBytes?: number;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run between chunks: the file being written is dropped, finished files are kept. */
  signal?: AbortSignal;
}

export interface ProgressEvent {
  /** 'writing' while tensor bytes stream out; 'finishing' while the output is fsynced, recorded and renamed into place. */
  readonly phase: 'writing' | 'finishing';
  readonly file: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  /** Of `bytesDone`, bytes of files kept from an interrupted run (resumed, not written again). */
  readonly bytesReused: number;
  /** Files kept from an interrupted run so far. */
  readonly filesReused: number;
}

export const DEFAULT_MAX_MEMORY = 1 << 30;

/** Sizes of the pipeline (exported for benchmarks and tests). */
export const executorTuning = {
  /** The arena never exceeds this, however large the budget: more read-ahead buys no speed. */
  maxArena: 256 << 20,
  /** … nor goes below this, whatever the plan leaves of the budget. */
  minArena: 8 << 20,
  maxChunk: 32 << 20,
  minChunk: 1 << 20,
  /** Largest single writev. */
  maxWrite: 64 << 20,
  /** Writes in flight at once (at distinct positions). */
  writesInFlight: 2,
  /** Buffered writes: start writing dirty pages back after this many bytes (see BufferedSink). */
  writeBackBytes: 64 << 20,
  /** Tensor chunks at least this large are checked for all-zero and left as holes. */
  holeMinBytes: 64 << 10,
  /** O_DIRECT staging: blocks of this size (at most the chunk size) … */
  directBlock: 16 << 20,
  /** … this many (0: no direct writes — the default; SHARDSHIFT_DIRECT_IO=on makes it 4) … */
  directBlocks: process.env.SHARDSHIFT_DIRECT_IO === 'on' ? 4 : 0,
  /** … used only with at least this budget (files must also be ≥ workerTuning.hashWorkerMinBytes). */
  directMinBudget: 128 << 20,
};

/** Splits a tensor into boxes of at most `chunkBytes` (whole rows where possible). */
export function chunkBoxes(t: Pick<TargetTensor, 'name' | 'dtype' | 'shape'>, chunkBytes: number): Box[] {
  const shape = t.shape;
  const bits = dtypeInfo(t.dtype).bits;
  if (shape.length === 0 || numelOf(shape) === 0) return [{ start: shape.map(() => 0), size: [...shape] }];
  // inner[k] = bits of one index step along dim k (product of dims after k).
  const innerBits: number[] = new Array(shape.length);
  let acc = bits;
  for (let d = shape.length - 1; d >= 0; d--) {
    innerBits[d] = acc;
    acc *= shape[d]!;
  }
  if (acc <= chunkBytes * 8) return [{ start: shape.map(() => 0), size: [...shape] }];
  let k = 0;
  let step: number;
  if (itemSize(t.dtype) === undefined) {
    // Sub-byte dtypes (F4, F6): only whole bytes can be moved, so split along dim 0 in a number
    // of rows whose bits fill whole bytes.
    const unit = 8 / gcd(innerBits[0]! % 8, 8);
    if (unit * innerBits[0]! > chunkBytes * 8) {
      throw unsupported(`tensor ${t.name}: ${unit} row(s) of ${t.dtype} exceed the ${chunkBytes}-byte chunk; raise --max-memory`, undefined, t.name);
    }
    step = Math.max(unit, Math.floor((chunkBytes * 8) / innerBits[0]!));
    step -= step % unit;
  } else {
    // Split along the outermost dim whose single step fits the chunk.
    while (k < shape.length - 1 && innerBits[k]! > chunkBytes * 8) k++;
    step = Math.max(1, Math.floor((chunkBytes * 8) / innerBits[k]!));
  }
  const boxes: Box[] = [];
  const outer = shape.slice(0, k);
  const idx = outer.map(() => 0);
  for (;;) {
    for (let a = 0; a < shape[k]!; a += step) {
      const start = [...idx, a, ...shape.slice(k + 1).map(() => 0)];
      const size = [...outer.map(() => 1), Math.min(step, shape[k]! - a), ...shape.slice(k + 1)];
      boxes.push({ start, size });
    }
    let d = k - 1;
    while (d >= 0) {
      idx[d]!++;
      if (idx[d]! < shape[d]!) break;
      idx[d] = 0;
      d--;
    }
    if (d < 0) break;
  }
  return boxes;
}

function gcd(a: number, b: number): number {
  return b === 0 ? a : gcd(b, a % b);
}

function boxBytes(t: Pick<TargetTensor, 'dtype'>, b: Box): number {
  return (numelOf(b.size) * dtypeInfo(t.dtype).bits) / 8;
}

const ALIGN = 64;
const alignUp = (n: number): number => Math.ceil(n / ALIGN) * ALIGN;

interface Region {
  readonly start: number;
  readonly length: number;
  released: boolean;
}

/**
 * A ring allocator over one SharedArrayBuffer. Regions are taken in FIFO order (waiting for
 * space when the ring is full) and may be released in any order; space is reclaimed from the
 * oldest region on, so a pipeline that finishes roughly in order keeps the ring full.
 */
class Arena {
  readonly sab: SharedArrayBuffer;
  readonly bytes: Uint8Array;
  private head = 0;
  private readonly live: Region[] = [];
  private liveStart = 0;
  private readonly waiters: Array<{ n: number; res: (r: Region) => void }> = [];

  constructor(readonly size: number) {
    this.sab = new SharedArrayBuffer(size);
    this.bytes = new Uint8Array(this.sab);
  }

  alloc(n: number): Promise<Region> {
    if (n > this.size) throw new Error(`internal: ${n}-byte region in a ${this.size}-byte arena`);
    if (this.waiters.length === 0) {
      const r = this.tryAlloc(n);
      if (r) return Promise.resolve(r);
    }
    return new Promise((res) => this.waiters.push({ n, res }));
  }

  private tryAlloc(n: number): Region | undefined {
    if (n === 0) return { start: 0, length: 0, released: true };
    const len = alignUp(n);
    let start: number;
    if (this.liveStart === this.live.length) {
      this.live.length = 0;
      this.liveStart = 0;
      start = 0;
    } else {
      const tail = this.live[this.liveStart]!.start;
      if (this.head > tail) {
        if (this.size - this.head >= len) start = this.head;
        else if (tail >= len) start = 0;
        else return undefined;
      } else if (tail - this.head >= len) start = this.head;
      else return undefined;
    }
    const r: Region = { start, length: len, released: false };
    this.head = start + len;
    this.live.push(r);
    return r;
  }

  release(r: Region): void {
    if (r.released) return;
    r.released = true;
    while (this.liveStart < this.live.length && this.live[this.liveStart]!.released) this.liveStart++;
    if (this.liveStart > 1024) {
      this.live.splice(0, this.liveStart);
      this.liveStart = 0;
    }
    while (this.waiters.length) {
      const got = this.tryAlloc(this.waiters[0]!.n);
      if (!got) break;
      this.waiters.shift()!.res(got);
    }
  }

  view(r: Region, offset: number, length: number): Uint8Array {
    return new Uint8Array(this.sab, r.start + offset, length);
  }
}

/** One unit of a file, in file order. */
interface Item {
  /** Bytes to write (a view of the arena, or the caller's literal bytes); set when produced. */
  data?: Uint8Array;
  region?: Region;
  /** For computed parts: evaluated when its turn to be written comes. */
  compute?: () => Uint8Array;
  /** Resolves when `data` holds the item's bytes. */
  ready: Promise<void>;
  settled: boolean;
  slot?: TensorSlot;
  /** First / last chunk of its tensor slot. */
  first?: boolean;
  last?: boolean;
  /** Tensor data that may be left as a hole if all zero. */
  holeable?: boolean;
}

/** A FIFO of items between the producer and the writer. */
class ItemQueue {
  private readonly items: Item[] = [];
  private waiter: (() => void) | undefined;
  private ended = false;
  private error: unknown;
  private spaceWaiter: (() => void) | undefined;
  constructor(private readonly cap: number) {}
  async push(it: Item): Promise<void> {
    while (this.items.length >= this.cap && !this.ended) await new Promise<void>((r) => (this.spaceWaiter = r));
    this.items.push(it);
    this.wake();
  }
  end(error?: unknown): void {
    this.ended = true;
    if (error !== undefined && this.error === undefined) this.error = error;
    this.wake();
    this.spaceWaiter?.();
  }
  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }
  /** The next item, or undefined at the end; throws the producer's error. */
  async next(): Promise<Item | undefined> {
    while (this.items.length === 0) {
      if (this.ended) {
        if (this.error !== undefined) throw this.error;
        return undefined;
      }
      await new Promise<void>((r) => (this.waiter = r));
    }
    const it = this.items.shift()!;
    const s = this.spaceWaiter;
    this.spaceWaiter = undefined;
    s?.();
    return it;
  }
  peek(): Item | undefined {
    return this.items[0];
  }
  drain(): Item[] {
    return this.items.splice(0);
  }
}

/** The SHA-256 of one file: inline for small files, on the hash worker for large ones. */
interface FileHasher {
  update(chunks: Uint8Array[], done: () => void): void;
  digest(): Promise<string>;
  drop(): void;
}

class InlineHasher implements FileHasher {
  private readonly h: Hash = createHash('sha256');
  update(chunks: Uint8Array[], done: () => void): void {
    for (const c of chunks) this.h.update(c);
    done();
  }
  digest(): Promise<string> {
    return Promise.resolve(this.h.digest('hex'));
  }
  drop(): void {}
}

class WorkerHasher implements FileHasher {
  private readonly s: HashStream;
  constructor(private readonly sab: SharedArrayBuffer) {
    this.s = new HashStream(sab);
  }
  update(chunks: Uint8Array[], done: () => void): void {
    this.s.update(
      chunks.map((c) => (c.buffer === this.sab ? ([c.byteOffset, c.length] as [number, number]) : c.slice())),
      done,
    );
  }
  digest(): Promise<string> {
    return this.s.digest();
  }
  drop(): void {
    this.s.drop();
  }
}

/** True when every byte of `b` is zero (early exit on the first non-zero word). */
function isAllZero(b: Uint8Array): boolean {
  if (b.length === 0 || b[0] !== 0 || b[b.length - 1] !== 0) return b.length === 0;
  const head = (4 - (b.byteOffset % 4)) % 4;
  for (let i = 0; i < head && i < b.length; i++) if (b[i] !== 0) return false;
  const words = Math.max(0, Math.floor((b.length - head) / 4));
  const w = new Uint32Array(b.buffer, b.byteOffset + head, words);
  for (let i = 0; i < words; i += 1024) {
    let acc = 0;
    const end = Math.min(words, i + 1024);
    for (let j = i; j < end; j++) acc |= w[j]!;
    if (acc !== 0) return false;
  }
  for (let i = head + words * 4; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

export class Executor {
  readonly chunkBytes: number;
  private readonly arenaBytes: number;
  private arena: Arena | undefined;
  private done = 0;
  private total = 0;

  private readonly directBlock: number;

  constructor(private readonly opts: ExecuteOptions) {
    const t = executorTuning;
    // The budget holds the plan (the live heap once planning's garbage is collected), the arena
    // and, when direct writes are possible, their staging blocks.
    const plan = opts.planBytes ?? liveHeapBytes();
    const direct = opts.maxMemory - plan >= t.directMinBudget && t.directBlocks > 0;
    const staging = direct ? t.directBlock * t.directBlocks : 0;
    // Half of what is left is the arena; the other half is for what producing a chunk stages
    // outside it (a transposing or dequantising view reads its source rectangle into a temporary
    // of up to its box, and up to eight boxes are in flight), so the arena is not the only
    // consumer of the budget.
    const room = Math.max(Math.min(t.minArena, opts.maxMemory - staging), Math.min(Math.floor((opts.maxMemory - staging - plan) / 2), t.maxArena));
    // At least two chunks fit in the arena so reading and writing overlap.
    this.chunkBytes = Math.max(t.minChunk, Math.min(t.maxChunk, Math.floor(room / 8)));
    this.arenaBytes = Math.max(2 * this.chunkBytes, room);
    this.directBlock = direct ? t.directBlock : 0;
  }

  /** Sets the byte total progress is reported against. */
  setTotal(total: number): void {
    this.total = total;
  }

  /** Counts a file that needs no writing (already complete on resume) as done. */
  skipFile(f: OutputFile): void {
    this.done += f.size;
    this.reused += f.size;
    this.filesReused++;
    this.emit('writing', f.relPath);
  }

  private reused = 0;
  private filesReused = 0;

  /** Reports the finishing phase (fsync, manifest, rename): the bytes are all out. */
  finishing(): void {
    this.emit('finishing', '');
  }

  private emit(phase: ProgressEvent['phase'], file: string, done = this.done): void {
    this.opts.onProgress?.({ phase, file, bytesDone: done, bytesTotal: this.total, bytesReused: this.reused, filesReused: this.filesReused });
  }

  /** Writes every file under `dir` (which must exist); each file is created fresh and fsynced. */
  async writeAll(dir: string, files: readonly OutputFile[]): Promise<void> {
    this.setTotal(files.reduce((s, f) => s + f.size, 0));
    for (const f of files) await this.writeFile(join(dir, f.relPath), f);
  }

  /**
   * Writes one file (created fresh; `replace` truncates a leftover from an interrupted run),
   * fsyncs it, and returns the SHA-256 of its content, computed as the bytes stream out.
   */
  async writeFile(path: string, f: OutputFile, opts: { replace?: boolean } = {}): Promise<string> {
    try {
      return await this.writeFileIn(path, f, opts);
    } catch (e) {
      throw isErrno(e) ? ioError(e, path) : e;
    }
  }

  /** Throws when the caller's AbortSignal has fired. */
  private checkAborted(file: string): void {
    const sig = this.opts.signal;
    if (sig?.aborted) throw aborted(`aborted while writing ${file}`, sig.reason);
  }

  private async writeFileIn(path: string, f: OutputFile, opts: { replace?: boolean }): Promise<string> {
    this.checkAborted(f.relPath);
    await mkdir(dirname(path), { recursive: true });
    this.arena ??= new Arena(this.arenaBytes);
    const large = f.size >= workerTuning.hashWorkerMinBytes;
    const sink: Sink = (large && (await DirectSink.open(path, opts.replace ?? false, this))) || (await BufferedSink.open(path, opts.replace ?? false, this.arena, large));
    let hex: string | undefined;
    let reported = 0;
    try {
      const size = await this.pipeline(f, sink, (p) => {
        // Writes in flight may complete out of order: count only progress past the last report.
        if (p <= reported) return;
        this.done += p - reported;
        reported = p;
        this.report(f.relPath, this.done);
      });
      if (size !== f.size) throw new Error(`internal: ${f.relPath} came out ${size} bytes, planned ${f.size}`);
      hex = await sink.finish(size);
    } finally {
      if (hex === undefined) await sink.abort();
    }
    this.done += f.size - reported;
    // Every finished file is reported, whatever the throttle.
    this.emit('writing', f.relPath);
    return hex;
  }

  private readonly stagings: Staging[] = [];
  /**
   * Aligned staging blocks for one file's direct writes (undefined when the budget is too small
   * for them). One set is reused file after file; files written concurrently get one each.
   */
  takeStaging(): Staging | undefined {
    if (this.directBlock === 0) return undefined;
    return this.stagings.pop() ?? new Staging(this.directBlock, executorTuning.directBlocks);
  }

  giveStaging(st: Staging): void {
    this.stagings.push(st);
  }

  private lastReport = 0;
  private report(file: string, done: number): void {
    if (!this.opts.onProgress) return;
    const now = Date.now();
    if (now - this.lastReport < 100) return;
    this.lastReport = now;
    this.emit('writing', file, done);
  }

  /** Produces every part of `f` and hands its bytes, in order, to `sink`; returns the file's size. */
  private async pipeline(f: OutputFile, sink: Sink, progress: (pos: number) => void): Promise<number> {
    const arena = this.arena!;
    const queue = new ItemQueue(4096);
    let failed = false;
    const launched: Item[] = [];

    // Producer: walks the parts in order, taking arena space for each chunk and starting its
    // production; runs ahead of the writer as far as the arena allows.
    const produceAll = async (): Promise<void> => {
      for (const part of f.parts) {
        if (failed) return;
        if (part instanceof Uint8Array) {
          await queue.push({ data: part, ready: Promise.resolve(), settled: true });
        } else if (typeof part === 'function') {
          await queue.push({ compute: part, ready: Promise.resolve(), settled: true });
        } else {
          const t = part.tensor;
          const cast = t.kind === 'cast' ? t : undefined;
          const inBits = cast ? dtypeInfo(cast.inner.dtype).bits : 0;
          const outBits = dtypeInfo(t.dtype).bits;
          const chunk = cast ? Math.max(1, Math.floor((this.chunkBytes * outBits) / Math.max(inBits, outBits))) : this.chunkBytes;
          const boxes = chunkBoxes(t, chunk);
          let sum = 0;
          for (const [i, box] of boxes.entries()) {
            this.checkAborted(f.relPath);
            const outLen = boxBytes(t, box);
            const inLen = cast ? boxBytes(cast.inner, box) : 0;
            sum += outLen;
            const region = await arena.alloc(cast ? alignUp(outLen) + inLen : outLen);
            if (failed) {
              arena.release(region);
              return;
            }
            const data = arena.view(region, 0, outLen);
            const it: Item = { data, region, ready: undefined as unknown as Promise<void>, settled: false, slot: part, first: i === 0, last: i === boxes.length - 1, holeable: outLen >= executorTuning.holeMinBytes };
            it.ready = (cast ? this.produceCast(cast, box, arena, region, outLen, inLen) : produceBox(t, box, data)).then(() => {
              it.settled = true;
            });
            // Rejections are handled by the writer (or by the cleanup after a failure).
            it.ready.catch(() => undefined);
            launched.push(it);
            await queue.push(it);
          }
          if (sum !== t.byteLength) throw new Error(`internal: tensor ${t.name} chunks hold ${sum} bytes, expected ${t.byteLength}`);
        }
      }
    };
    const producer = produceAll().then(
      () => queue.end(),
      (e: unknown) => queue.end(e),
    );

    let pos = 0;
    let crc = 0;
    try {
      for (;;) {
        const it = await queue.next();
        if (!it) break;
        await it.ready;
        if (it.compute) it.data = it.compute();
        const data = it.data!;
        if (it.slot?.wantCrc) {
          if (it.first) crc = 0;
          crc = crc32(data, crc);
          if (it.last) it.slot.crc = crc;
        }
        pos += data.length;
        const region = it.region;
        await sink.put(data, it.holeable ?? false, region ? () => arena.release(region) : undefined, queue.peek()?.settled ?? false, progress);
      }
      await sink.drain();
      await producer;
      return pos;
    } catch (e) {
      failed = true;
      // Let every started production and write settle before their memory is reused.
      await Promise.allSettled([...launched.map((it) => it.ready), sink.drain()]);
      for (const it of [...launched, ...queue.drain()]) if (it.region) arena.release(it.region);
      queue.end();
      await producer;
      for (const it of launched) if (it.region) arena.release(it.region);
      throw e;
    }
  }

  /** Produces `box` of the cast's source into the region's tail and casts it into its head. */
  private async produceCast(cast: CastTensor, box: Box, arena: Arena, region: Region, outLen: number, inLen: number): Promise<void> {
    const inOffset = alignUp(outLen);
    const src = arena.view(region, inOffset, inLen);
    await produceBox(cast.inner, box, src);
    const out = arena.view(region, 0, outLen);
    const task =
      outLen >= workerTuning.castWorkerMinBytes
        ? castOnPool({ arena: arena.sab, src: region.start + inOffset, srcLength: inLen, from: cast.inner.dtype, to: cast.dtype, dst: region.start, dstLength: outLen })
        : undefined;
    if (task) await task;
    else castBytes(src, cast.inner.dtype, cast.dtype, out);
  }
}

/** Writes `bufs` back to back at `pos`, in as few `writev` calls as the kernel allows. */
async function writevFully(fh: FileHandle, bufs: Uint8Array[], pos: number): Promise<void> {
  let list = bufs.filter((b) => b.length > 0);
  while (list.length) {
    const { bytesWritten } = await fh.writev(list, pos);
    pos += bytesWritten;
    let n = bytesWritten;
    while (list.length && n >= list[0]!.length) {
      n -= list[0]!.length;
      list = list.slice(1);
    }
    if (n > 0) list[0] = list[0]!.subarray(n);
  }
}

/** Where a file's bytes go, in file order: hashing, holes, writes. */
interface Sink {
  /**
   * Takes the next `data` of the file; calls `release` once the bytes are no longer needed.
   * `more` says the next item is already produced (so a write may wait to batch it).
   */
  put(data: Uint8Array, holeable: boolean, release: (() => void) | undefined, more: boolean, progress: (pos: number) => void): Promise<void>;
  /** Waits for every write started so far (and rethrows a write error). */
  drain(): Promise<void>;
  /** Ends the file at `size`: flushes, extends over trailing holes, fsyncs, closes; the SHA-256. */
  finish(size: number): Promise<string>;
  /** Closes after a failure. */
  abort(): Promise<void>;
}

/**
 * Page-cache writes: adjacent chunks batched into one `writev` (≤ maxWrite), up to
 * `writesInFlight` at distinct positions; each chunk's arena space is released once it is both
 * written and hashed.
 */
class BufferedSink implements Sink {
  private readonly writes = new Set<Promise<void>>();
  private writeError: unknown;
  private batch: Array<{ data: Uint8Array; release: (() => void) | undefined }> = [];
  private batchStart = 0;
  private batchBytes = 0;
  private pos = 0;
  private end = 0;
  private progress: (pos: number) => void = () => undefined;
  /** Bytes written since the last early flush was started. */
  private unsynced = 0;
  private syncing: Promise<void> | undefined;

  private constructor(
    private readonly fh: FileHandle,
    private readonly hasher: FileHasher,
  ) {}

  /**
   * Starts writing the file's dirty pages back while production goes on (one fdatasync at a
   * time, not awaited by the write path). Without it the page cache absorbs the first few GB and
   * the disk only starts at the final fsync, so computing and writing run one after the other.
   */
  private writeBack(len: number): void {
    this.unsynced += len;
    if (this.syncing || this.unsynced < executorTuning.writeBackBytes) return;
    this.unsynced = 0;
    this.syncing = this.fh.datasync().then(
      () => {
        this.syncing = undefined;
      },
      (e: unknown) => {
        this.writeError ??= e;
        this.syncing = undefined;
      },
    );
  }

  static async open(path: string, replace: boolean, arena: Arena, large: boolean): Promise<BufferedSink> {
    const fh = await createExclusive(path, { replace });
    return new BufferedSink(fh, large ? new WorkerHasher(arena.sab) : new InlineHasher());
  }

  async put(data: Uint8Array, holeable: boolean, release: (() => void) | undefined, more: boolean, progress: (pos: number) => void): Promise<void> {
    if (this.writeError) throw this.writeError;
    this.progress = progress;
    if (holeable && isAllZero(data)) {
      // Leave a hole: hash the zeros, write nothing.
      this.flush();
      this.hasher.update([data], () => release?.());
      this.pos += data.length;
      return;
    }
    if (this.batch.length === 0) this.batchStart = this.pos;
    this.batch.push({ data, release });
    this.batchBytes += data.length;
    this.pos += data.length;
    // Keep filling the batch while the next item is already there; write when it is full or the
    // pipeline would otherwise wait.
    if (!more || this.batchBytes >= executorTuning.maxWrite || this.batch.length >= 512) {
      this.flush();
      while (this.writes.size >= executorTuning.writesInFlight) await Promise.race(this.writes);
    }
  }

  private flush(): void {
    if (this.batch.length === 0) return;
    const items = this.batch;
    const at = this.batchStart;
    const bufs = items.map((it) => it.data);
    const len = this.batchBytes;
    this.batch = [];
    this.batchBytes = 0;
    let pending = 2;
    const finish = (): void => {
      if (--pending > 0) return;
      for (const it of items) it.release?.();
    };
    this.hasher.update(bufs, finish);
    const w = writevFully(this.fh, bufs, at).then(
      () => {
        this.writes.delete(w);
        finish();
        this.progress(at + len);
        this.writeBack(len);
      },
      (e: unknown) => {
        this.writes.delete(w);
        this.writeError ??= e;
        finish();
      },
    );
    this.writes.add(w);
    this.end = Math.max(this.end, at + len);
  }

  async drain(): Promise<void> {
    this.flush();
    await Promise.allSettled([...this.writes]);
    if (this.writeError) throw this.writeError;
  }

  async finish(size: number): Promise<string> {
    await this.drain();
    await this.syncing;
    if (this.writeError) throw this.writeError;
    if (this.end < size) await this.fh.truncate(size);
    const hex = await this.hasher.digest();
    await this.fh.sync();
    await this.fh.close();
    return hex;
  }

  async abort(): Promise<void> {
    await Promise.allSettled([...this.writes]);
    // A write that completed meanwhile may have started a write-back: wait for it too.
    while (this.syncing) await this.syncing;
    this.hasher.drop();
    await this.fh.close().catch(() => undefined);
  }
}

/** Aligned blocks for O_DIRECT writes, in one SharedArrayBuffer the hash worker can read. */
class Staging {
  readonly sab: SharedArrayBuffer;
  /** Offset of the first block in `sab`: found by probing (the address must suit O_DIRECT). */
  base = -1;
  constructor(
    readonly block: number,
    readonly count: number,
  ) {
    this.sab = new SharedArrayBuffer(block * count + DIRECT_ALIGN);
  }
}

const DIRECT_ALIGN = 4096;
/** Granularity of holes in direct writes (a multiple of DIRECT_ALIGN). */
const HOLE_UNIT = 64 << 10;

/**
 * O_DIRECT writes: the file's bytes are copied into aligned staging blocks, and each full block
 * is hashed (on the worker) and written straight to the device, several in flight — no page-cache
 * copy (on a VM the costliest step of a buffered write), no dirty-page throttling and almost
 * nothing left to flush at fsync. All-zero 64 KiB units are left as holes. The unaligned tail is
 * written through a normal descriptor. Used for large files when the filesystem accepts O_DIRECT;
 * otherwise `BufferedSink`.
 */
class DirectSink implements Sink {
  private cur = 0;
  private fill = 0;
  private filePos = 0;
  private readonly busy: Array<Promise<void> | undefined>;
  private error: unknown;
  private end = 0;
  private readonly hasher: WorkerHasher;

  private constructor(
    private readonly path: string,
    private readonly fh: FileHandle,
    private readonly st: Staging,
    private readonly ex: Executor,
  ) {
    this.busy = new Array(st.count).fill(undefined);
    this.hasher = new WorkerHasher(st.sab);
  }

  /** Opens `path` for direct writes, or undefined when O_DIRECT cannot be used there. */
  static async open(path: string, replace: boolean, ex: Executor): Promise<DirectSink | undefined> {
    const O_DIRECT = fsConstants.O_DIRECT;
    if (!O_DIRECT) return undefined;
    const st = ex.takeStaging();
    if (!st) return undefined;
    let fh: FileHandle;
    try {
      fh = await createExclusive(path, { replace, flags: O_DIRECT });
    } catch (e) {
      ex.giveStaging(st);
      if ((e as NodeJS.ErrnoException).code === 'EINVAL') return undefined;
      throw e;
    }
    if (st.base < 0) {
      // Find where in the staging buffer a block is aligned as the device wants: write one block
      // of zeros at offset 0 (the file is empty; real data or a hole replaces it later).
      const probe = new Uint8Array(st.sab);
      for (let o = 0; o < DIRECT_ALIGN; o += 16) {
        try {
          writeSync(fh.fd, probe, o, DIRECT_ALIGN, 0);
          st.base = o;
          break;
        } catch {
          // EINVAL: misaligned; try the next offset.
        }
      }
      if (st.base < 0) {
        st.base = Infinity; // never usable here
      }
    }
    if (!Number.isFinite(st.base)) {
      // O_DIRECT is not usable here: remove the file this open created; the buffered sink makes it.
      await fh.close();
      await unlink(path);
      ex.giveStaging(st);
      return undefined;
    }
    return new DirectSink(path, fh, st, ex);
  }

  private blockView(i: number, len: number): Uint8Array {
    return new Uint8Array(this.st.sab, this.st.base + i * this.st.block, len);
  }

  async put(data: Uint8Array, _holeable: boolean, release: (() => void) | undefined, _more: boolean, progress: (pos: number) => void): Promise<void> {
    let o = 0;
    while (o < data.length) {
      if (this.error) throw this.error;
      if (this.fill === 0 && this.busy[this.cur]) await this.busy[this.cur];
      if (this.error) throw this.error;
      const n = Math.min(this.st.block - this.fill, data.length - o);
      this.blockView(this.cur, this.st.block).set(data.subarray(o, o + n), this.fill);
      this.fill += n;
      o += n;
      if (this.fill === this.st.block) this.submit(progress);
    }
    release?.();
  }

  /** Hashes and writes the current block (its aligned part; `tail` bytes go through `tailFh`). */
  private submit(progress: (pos: number) => void, tailFh?: FileHandle): void {
    const i = this.cur;
    const len = this.fill;
    const at = this.filePos;
    const view = this.blockView(i, len);
    let hashed!: () => void;
    const hashDone = new Promise<void>((r) => (hashed = r));
    this.hasher.update([view], hashed);
    // Write the block's non-zero runs of 64 KiB units; all-zero units stay holes.
    const writes: Array<Promise<void>> = [];
    const aligned = len - (len % DIRECT_ALIGN);
    let run = -1;
    for (let u = 0; ; u = Math.min(aligned, u + HOLE_UNIT)) {
      const atEnd = u >= aligned;
      const zero = atEnd || isAllZero(view.subarray(u, Math.min(aligned, u + HOLE_UNIT)));
      if (!zero && run < 0) run = u;
      else if (zero && run >= 0) {
        writes.push(writeFully(this.fh, view.subarray(run, u), at + run));
        this.end = Math.max(this.end, at + u);
        run = -1;
      }
      if (atEnd) break;
    }
    if (aligned < len && !isAllZero(view.subarray(aligned))) {
      if (!tailFh) throw new Error('internal: unaligned direct block before the end of the file');
      writes.push(writeFully(tailFh, view.subarray(aligned), at + aligned));
      this.end = at + len;
    }
    const write = Promise.all(writes);
    this.busy[i] = Promise.all([hashDone, write]).then(
      () => {
        this.busy[i] = undefined;
        progress(at + len);
      },
      (e: unknown) => {
        this.busy[i] = undefined;
        this.error ??= e;
      },
    );
    this.filePos += len;
    this.fill = 0;
    this.cur = (i + 1) % this.st.count;
  }

  async drain(): Promise<void> {
    await Promise.allSettled(this.busy.filter((b) => b));
    if (this.error) throw this.error;
  }

  async finish(size: number): Promise<string> {
    let tail: FileHandle | undefined;
    try {
      if (this.fill > 0) {
        if (this.busy[this.cur]) await this.busy[this.cur];
        if (this.fill % DIRECT_ALIGN) tail = await open(this.path, 'r+');
        this.submit(() => undefined, tail);
      }
      await this.drain();
      if (this.filePos !== size) throw new Error(`internal: direct writes covered ${this.filePos} bytes of ${size}`);
      if (this.end < size) await this.fh.truncate(size);
      const hex = await this.hasher.digest();
      if (tail) await tail.sync();
      await this.fh.sync();
      return hex;
    } finally {
      await tail?.close();
      await this.fh.close();
      this.giveBack();
    }
  }

  private returned = false;
  private giveBack(): void {
    if (!this.returned) this.ex.giveStaging(this.st);
    this.returned = true;
  }

  async abort(): Promise<void> {
    await Promise.allSettled(this.busy.filter((b) => b));
    this.hasher.drop();
    await this.fh.close().catch(() => undefined);
    this.giveBack();
  }
}

async function writeFully(fh: FileHandle, b: Uint8Array, pos: number): Promise<void> {
  let off = 0;
  while (off < b.length) {
    const { bytesWritten } = await fh.write(b, off, b.length - off, pos + off);
    off += bytesWritten;
  }
}
