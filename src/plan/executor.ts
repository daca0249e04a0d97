/**
 * Streams output files to disk with memory bounded by a byte budget.
 *
 * Each file is a list of parts (literal bytes, tensor slots, bytes computed after earlier parts).
 * A tensor is moved in chunks — boxes of at most `chunkBytes` — through a fixed pool of reused
 * buffers: up to `inflight` chunks are being read while the oldest is written, so reads and
 * writes overlap and peak memory is `inflight × chunkBytes`, whatever the model's size.
 */
import { open } from 'node:fs/promises';
import { join, dirname } from 'node:path';
import { mkdir } from 'node:fs/promises';
import { crc32 } from 'node:zlib';
import { createHash, type Hash } from 'node:crypto';
import { dtypeInfo, itemSize, numelOf } from '../tensor/dtype.js';
import type { Box } from '../tensor/layout.js';
import type { OutputFile, TargetTensor } from '../formats/types.js';
import { unsupported } from '../errors.js';

export interface ExecuteOptions {
  /** Byte budget for tensor buffers. */
  maxMemory: number;
  onProgress?: (e: ProgressEvent) => void;
}

export interface ProgressEvent {
  readonly file: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
}

export const DEFAULT_MAX_MEMORY = 1 << 30;
const MAX_CHUNK = 64 << 20;
const MIN_CHUNK = 1 << 20;

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

/** A fixed set of reusable buffers; `take` waits when all are in use. */
class BufferPool {
  private readonly free: Uint8Array[] = [];
  private readonly waiters: Array<(b: Uint8Array) => void> = [];
  private made = 0;
  constructor(
    private readonly count: number,
    readonly size: number,
  ) {}
  take(): Promise<Uint8Array> {
    const b = this.free.pop();
    if (b) return Promise.resolve(b);
    if (this.made < this.count) {
      this.made++;
      return Promise.resolve(new Uint8Array(this.size));
    }
    return new Promise((res) => this.waiters.push(res));
  }
  give(b: Uint8Array): void {
    const w = this.waiters.shift();
    if (w) w(b);
    else this.free.push(b);
  }
}

export class Executor {
  readonly chunkBytes: number;
  private readonly pool: BufferPool;
  private readonly inflight: number;
  private done = 0;
  private total = 0;

  constructor(private readonly opts: ExecuteOptions) {
    // At least two chunks in flight so reading and writing overlap; chunks no larger than 64 MiB.
    this.chunkBytes = Math.max(MIN_CHUNK, Math.min(MAX_CHUNK, Math.floor(opts.maxMemory / 4)));
    this.inflight = Math.max(2, Math.floor(opts.maxMemory / this.chunkBytes));
    this.pool = new BufferPool(this.inflight, this.chunkBytes);
  }

  /** Sets the byte total progress is reported against. */
  setTotal(total: number): void {
    this.total = total;
  }

  /** Counts a file that needs no writing (already complete on resume) as done. */
  skipFile(f: OutputFile): void {
    this.done += f.size;
    this.opts.onProgress?.({ file: f.relPath, bytesDone: this.done, bytesTotal: this.total });
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
    await mkdir(dirname(path), { recursive: true });
    const fh = await open(path, opts.replace ? 'w' : 'wx');
    const hash = createHash('sha256');
    const base = this.done;
    let pos = 0;
    try {
      for (const part of f.parts) {
        if (part instanceof Uint8Array || typeof part === 'function') {
          const b = part instanceof Uint8Array ? part : part();
          hash.update(b);
          await writeFully(fh, b, pos);
          pos += b.length;
        } else {
          pos = await this.streamTensor(fh, part.tensor, pos, part.wantCrc ? (c) => (part.crc = c) : undefined, hash, (p) => this.report(f.relPath, base + p));
        }
        this.report(f.relPath, base + pos);
      }
      if (pos !== f.size) throw new Error(`internal: ${f.relPath} came out ${pos} bytes, planned ${f.size}`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    this.done = base + pos;
    // Every finished file is reported, whatever the throttle.
    this.opts.onProgress?.({ file: f.relPath, bytesDone: this.done, bytesTotal: this.total });
    return hash.digest('hex');
  }

  private lastReport = 0;
  private report(file: string, done: number): void {
    if (!this.opts.onProgress) return;
    const now = Date.now();
    if (now - this.lastReport < 100) return;
    this.lastReport = now;
    this.opts.onProgress({ file, bytesDone: done, bytesTotal: this.total });
  }

  private async streamTensor(
    fh: import('node:fs/promises').FileHandle,
    t: TargetTensor,
    start: number,
    setCrc: ((crc: number) => void) | undefined,
    hash: Hash,
    progress: (pos: number) => void,
  ): Promise<number> {
    const boxes = chunkBoxes(t, this.chunkBytes);
    let crc = 0;
    let pos = start;
    // Reads run ahead of writes, limited by the pool; writes stay in order.
    const pending: Array<Promise<{ buf: Uint8Array; len: number }>> = [];
    let next = 0;
    const launch = (): void => {
      const b = boxes[next++]!;
      const len = boxBytes(t, b);
      pending.push(
        this.pool.take().then(async (buf) => {
          try {
            await t.produce(b, buf.subarray(0, len));
          } catch (e) {
            this.pool.give(buf);
            throw e;
          }
          return { buf, len };
        }),
      );
    };
    const ahead = Math.max(1, this.inflight - 1);
    while (next < boxes.length && pending.length < ahead) launch();
    try {
      while (pending.length) {
        const { buf, len } = await pending.shift()!;
        if (next < boxes.length) launch();
        const data = buf.subarray(0, len);
        try {
          if (setCrc) crc = crc32(data, crc);
          hash.update(data);
          await writeFully(fh, data, pos);
        } finally {
          this.pool.give(buf);
        }
        pos += len;
        progress(pos);
      }
    } catch (e) {
      // Let reads already started settle so their buffers return to the pool.
      await Promise.allSettled(pending);
      for (const p of pending) p.then((r) => this.pool.give(r.buf), () => undefined);
      throw e;
    }
    if (pos - start !== t.byteLength) throw new Error(`internal: tensor ${t.name} wrote ${pos - start} bytes, expected ${t.byteLength}`);
    setCrc?.(crc);
    return pos;
  }
}

async function writeFully(fh: import('node:fs/promises').FileHandle, b: Uint8Array, pos: number): Promise<void> {
  let off = 0;
  while (off < b.length) {
    const { bytesWritten } = await fh.write(b, off, b.length - off, pos + off);
    off += bytesWritten;
  }
}
