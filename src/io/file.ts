/**
 * Read-only positioned access to a file, or to a byte range of one (DCP stores each tensor as a
 * small torch.save archive inside a larger `.distcp` file). Sources never open files for writing.
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { badInput } from '../util/errors.js';

export interface ByteSource {
  /** For messages: the file path, plus the range when this is a window of a file. */
  readonly name: string;
  readonly size: number;
  /** Reads exactly `length` bytes at `position` into `into` (or a new buffer). */
  read(position: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
}

export class ReadOnlyFile implements ByteSource {
  private constructor(
    readonly name: string,
    private readonly fh: FileHandle,
    readonly size: number,
  ) {}

  /**
   * Opens a regular file. Anything else a checkpoint's metadata may name is refused by name: a
   * directory (reads fail with EISDIR), a device, or a named pipe — opened without O_NONBLOCK, a
   * pipe nobody writes to would block the run for ever.
   */
  static async open(path: string): Promise<ReadOnlyFile> {
    const fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
    const st = await fh.stat();
    if (!st.isFile()) {
      await fh.close();
      throw badInput(`${path} is ${st.isDirectory() ? 'a directory' : st.isFIFO() ? 'a named pipe' : 'not a regular file'}, not a checkpoint file`, path);
    }
    return new ReadOnlyFile(path, fh, st.size);
  }

  async read(position: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    if (position < 0 || length < 0 || position + length > this.size) {
      throw badInput(
        `${this.name}: needs bytes ${position}..${position + length} but the file has ${this.size} bytes (truncated?)`,
        this.name,
      );
    }
    const buf = into ?? new Uint8Array(length);
    if (buf.length < length) throw new RangeError('read buffer too small');
    let done = 0;
    // fs reads are capped at 2 GiB per call; loop until the range is filled.
    while (done < length) {
      const n = Math.min(length - done, 1 << 30);
      const { bytesRead } = await this.fh.read(buf, done, n, position + done);
      if (bytesRead === 0) throw badInput(`${this.name}: unexpected end of file at byte ${position + done}`, this.name);
      done += bytesRead;
    }
    return buf.length === length ? buf : buf.subarray(0, length);
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** A window [offset, offset+size) of another ByteSource, addressed from 0. */
export class ByteWindow implements ByteSource {
  constructor(
    private readonly base: ByteSource,
    private readonly offset: number,
    readonly size: number,
    readonly name: string = `${base.name}[${offset}..${offset + size}]`,
  ) {
    if (offset < 0 || size < 0 || offset + size > base.size) {
      throw badInput(`${base.name}: range ${offset}..${offset + size} lies past the end of the file (${base.size} bytes)`, base.name);
    }
  }

  read(position: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    if (position < 0 || position + length > this.size) {
      throw badInput(`${this.name}: needs bytes ${position}..${position + length} of a ${this.size}-byte range`, this.name);
    }
    return this.base.read(this.offset + position, length, into);
  }
}

/** Bytes already in memory (tests, small embedded records). */
export class MemorySource implements ByteSource {
  constructor(readonly bytes: Uint8Array, readonly name = '<memory>') {}
  get size(): number {
    return this.bytes.length;
  }
  async read(position: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    if (position < 0 || position + length > this.bytes.length) {
      throw badInput(`${this.name}: needs bytes ${position}..${position + length} of ${this.bytes.length}`, this.name);
    }
    const src = this.bytes.subarray(position, position + length);
    if (!into) return src.slice();
    into.set(src);
    return into.subarray(0, length);
  }
}

/** Largest side file (config, metadata, tracker, YAML) read whole; a bigger one is refused. */
export const MAX_WHOLE_FILE = 256 << 20;

/**
 * Reads a small input file whole — a config.json, a DCP `.metadata`, a tracker, a YAML config —
 * through `ReadOnlyFile.open`: a regular file only (a planted named pipe would block `readFile`
 * for ever), and at most `limit` bytes (a "config.json" of 100 GB is not read into memory).
 */
export async function readWholeFile(path: string, limit = MAX_WHOLE_FILE): Promise<Buffer> {
  const f = await ReadOnlyFile.open(path);
  try {
    if (f.size > limit) throw badInput(`${path} is ${f.size} bytes; a file read whole (a config, metadata or tracker) may hold at most ${limit}`, path);
    return Buffer.from(await f.read(0, f.size));
  } finally {
    await f.close();
  }
}

/** `readWholeFile` as UTF-8 text. */
export async function readTextFile(path: string, limit = MAX_WHOLE_FILE): Promise<string> {
  return (await readWholeFile(path, limit)).toString('utf8');
}
