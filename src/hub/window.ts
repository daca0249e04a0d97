/**
 * A model's weight shards as byte sources whose bytes arrive from the hub when the conversion
 * first reads them.
 *
 * Without `maxDisk`, each shard is downloaded whole into the hub cache the first time a read needs
 * it (parallel ranges, verified against its LFS sha256 before use: `transfer.ts`), the next shard
 * is fetched ahead, and the shards stay for the next run.
 *
 * With `maxDisk`, the unit is one tensor's bytes, not a shard: Megatron's torch_dist stacks each
 * weight over all layers, so producing one output tensor reads a slice of every shard, and any
 * window of whole shards smaller than the model would download each shard again and again. A
 * tensor's range is fetched when it is first read (the next tensor of its shard fetched ahead)
 * into a spool directory and deleted once all of its bytes have been read, so the disk holds the
 * tensors being read, not the model. Room is made by deleting tensors already read, then the
 * least recently read ones (fetched again if read again; counted). Each shard's SHA-256 is still
 * checked against the hub's: its bytes are hashed in file order as the ranges arrive (a range
 * that arrives early stays on disk until the hash reaches it, while the budget allows); whatever
 * could not be hashed on the way is fetched again, hashed and dropped in `settle`, which the
 * conversion awaits before its output is committed — a mismatch leaves no output.
 *
 * Shards the cache already held are read in place, never counted and never deleted: they belong
 * to the user.
 */
import { createHash, type Hash } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { createExclusive } from '../io/create.js';
import { ReadOnlyFile, type ByteSource } from '../io/file.js';
import { badInput, usage } from '../util/errors.js';
import { formatBytes } from '../util/size.js';
import type { CachedRepo } from './cache.js';
import type { RemoteFile, RepoListing } from './listing.js';
import { shown } from './repo.js';
import { downloadVerified, fetchRange, transferTuning, type TransferOptions } from './transfer.js';

export interface WindowOptions {
  /** Bytes of downloaded source on disk at once; undefined keeps whole shards in the cache. */
  readonly maxDisk?: number;
  /** Where tensor ranges go under `maxDisk` (created, and removed by `close`). */
  readonly spoolDir: string;
  readonly transfer?: TransferOptions;
  readonly onEvent?: (e: WindowEvent) => void;
}

export type WindowEvent =
  | { readonly kind: 'download'; readonly file: string; readonly size: number; readonly again: boolean }
  | { readonly kind: 'downloaded'; readonly file: string; readonly size: number }
  | { readonly kind: 'bytes'; readonly n: number }
  | { readonly kind: 'evicted'; readonly file: string; readonly size: number };

export interface WindowStats {
  /** Whole shards (cache mode) or tensor ranges (--max-disk) downloaded. */
  readonly downloads: number;
  /** Downloads of bytes deleted earlier to make room. */
  readonly again: number;
  readonly bytesFetched: number;
  /** Bytes fetched a second time only to finish a shard's SHA-256 (--max-disk under pressure). */
  readonly bytesFetchedToVerify: number;
  /** Most bytes of spooled source on disk at once (reserved while downloading). */
  readonly peakDisk: number;
  /** Shards read in place from the user's cache. */
  readonly inPlace: number;
}

/** One tensor's bytes in a shard (bounded mode). */
interface Extent {
  readonly start: number;
  readonly end: number;
  read: number;
  state: 'remote' | 'downloading' | 'local';
  ready?: Promise<void>;
  local?: ReadOnlyFile;
  path?: string;
  reads: number;
  lastUse: number;
  fetched: boolean;
  hashed: boolean;
}

interface Shard {
  readonly file: RemoteFile;
  readonly index: number;
  /** Bounded mode: the shard's tensors in file order, and its SHA-256 so far (header first). */
  extents: Extent[];
  hash?: Hash;
  /** Next extent the hash needs. */
  frontier: number;
  /** Hashing of this shard, one step after another (ranges arrive concurrently). */
  hashing: Promise<void>;
  verified: boolean;
  // Cache mode (whole shard).
  state: 'remote' | 'downloading' | 'local';
  ready?: Promise<void>;
  local?: ReadOnlyFile;
  /** Read from the user's cache: never counted, never deleted. */
  owned: boolean;
}

export class ShardWindow {
  private readonly shards: Shard[];
  private used = 0;
  private tick = 0;
  private readonly waiting: Array<() => void> = [];
  private stats_ = { downloads: 0, again: 0, bytesFetched: 0, bytesFetchedToVerify: 0, peakDisk: 0, inPlace: 0 };
  private failed: unknown;
  private closed = false;
  /** Downloads that hold their room (reserved in `used`). */
  private readonly reserved = new Set<Extent>();

  private constructor(
    private readonly listing: RepoListing,
    private readonly cache: CachedRepo,
    files: readonly RemoteFile[],
    private readonly opts: WindowOptions,
  ) {
    this.shards = files.map((file, index) => ({ file, index, extents: [], frontier: 0, hashing: Promise.resolve(), verified: false, state: 'remote', owned: false }));
  }

  private get bounded(): boolean {
    return this.opts.maxDisk !== undefined;
  }

  /** A window over `files`; fails early, naming the minimum, when the budget cannot hold what one read needs. */
  static async open(listing: RepoListing, cache: CachedRepo, files: readonly RemoteFile[], opts: WindowOptions): Promise<ShardWindow> {
    const w = new ShardWindow(listing, cache, files, opts);
    for (const s of w.shards) {
      const p = await cache.file(listing.commit, s.file.path, s.file.size);
      if (p) {
        s.local = await ReadOnlyFile.open(p);
        s.state = 'local';
        s.owned = true;
        s.verified = true;
        w.stats_.inPlace++;
      }
    }
    if (opts.maxDisk !== undefined && w.shards.some((s) => !s.owned)) await mkdir(opts.spoolDir, { recursive: true });
    return w;
  }

  /**
   * Declares shard `i`'s tensors (data extents) and its header bytes (the hash starts with them).
   * Under `maxDisk`, the largest tensor must fit: the error names the minimum.
   */
  setExtents(i: number, extents: ReadonlyArray<{ name: string; start: number; end: number }>, headerBytes: Uint8Array): void {
    const s = this.shards[i]!;
    if (!this.bounded || s.owned) return;
    // Empty tensors have no bytes to fetch or hash.
    const sorted = extents.filter((e) => e.end > e.start).sort((a, b) => a.start - b.start);
    const big = sorted.reduce((m, e) => (e.end - e.start > m.end - m.start ? e : m), { name: '', start: 0, end: 0 });
    if (big.end - big.start > this.opts.maxDisk!) {
      throw usage(`--max-disk ${formatBytes(this.opts.maxDisk!)} is smaller than the largest tensor, ${big.name} in ${s.file.path} (${formatBytes(big.end - big.start)}): give at least --max-disk ${big.end - big.start} (twice that lets the next one download while it is read)`);
    }
    s.extents = sorted.map((e) => ({ start: e.start, end: e.end, read: 0, state: 'remote', reads: 0, lastUse: 0, fetched: false, hashed: false }));
    s.hash = createHash('sha256').update(headerBytes);
    if (headerBytes.length !== (sorted[0]?.start ?? s.file.size)) throw new Error(`internal: ${s.file.path}: header bytes end at ${headerBytes.length}, data starts at ${sorted[0]?.start}`);
  }

  /** Shard `i` as a byte source; a read waits for its bytes. */
  source(i: number): ByteSource {
    const s = this.shards[i]!;
    return {
      name: `${this.listing.repo.id}/${s.file.path}`,
      size: s.file.size,
      read: (position: number, length: number, into?: Uint8Array): Promise<Uint8Array> => (this.bounded && !s.owned ? this.readRanged(s, position, length, into) : this.readWhole(s, position, length, into)),
    };
  }

  stats(): WindowStats {
    return { ...this.stats_ };
  }

  /** Bounded mode: finishes every shard's SHA-256 (fetching what could not be kept) and checks it. */
  async settle(): Promise<void> {
    if (this.failed) throw this.failed;
    for (const s of this.shards) {
      if (!this.bounded || s.owned || s.verified) continue;
      await s.hashing;
      while (s.frontier < s.extents.length) {
        const e = s.extents[s.frontier]!;
        if (e.state === 'downloading') await e.ready;
        if (e.state === 'local') {
          await this.hashExtent(s, e);
          continue;
        }
        // Deleted (or never read) before the hash reached it: fetch, hash, drop.
        for (let a = e.start; a < e.end; a += transferTuning.partSize) {
          const b = await fetchRange(this.listing.repo, this.listing.commit, s.file, a, Math.min(a + transferTuning.partSize, e.end), { signal: this.opts.transfer?.signal });
          s.hash!.update(b);
          this.stats_.bytesFetchedToVerify += b.length;
        }
        e.hashed = true;
        s.frontier++;
      }
      this.check(s);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const all = this.shards.flatMap((s) => [s.ready, ...s.extents.map((e) => e.ready)]);
    await Promise.all(all.map((p) => p?.catch(() => undefined)));
    await Promise.all(this.shards.flatMap((s) => [s.local?.close(), ...s.extents.map((e) => e.local?.close())]));
    if (this.bounded) await rm(this.opts.spoolDir, { recursive: true, force: true });
  }

  private notify(): void {
    for (const w of this.waiting.splice(0)) w();
  }

  private what(s: Shard): string {
    return `${s.file.path} of ${shown(this.listing.repo)}`;
  }

  // ---------------------------------------------------------------------------------------
  // Cache mode: whole shards.

  private async readWhole(s: Shard, position: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    while (s.state !== 'local') {
      if (this.failed) throw this.failed;
      if (s.state === 'remote') this.startWhole(s);
      await s.ready;
    }
    return s.local!.read(position, length, into);
  }

  private startWhole(s: Shard): void {
    s.state = 'downloading';
    s.ready = (async () => {
      try {
        this.opts.onEvent?.({ kind: 'download', file: s.file.path, size: s.file.size, again: false });
        this.stats_.downloads++;
        await mkdir(join(this.cache.dir, 'blobs'), { recursive: true });
        await downloadVerified(this.listing.repo, this.listing.commit, s.file, this.cache.blob(s.file.identity.hex), { ...this.opts.transfer, onBytes: (n) => this.fetched(n) });
        s.local = await ReadOnlyFile.open(await this.cache.link(this.listing.commit, s.file.path, s.file.identity.hex));
        s.state = 'local';
        s.verified = true;
        this.opts.onEvent?.({ kind: 'downloaded', file: s.file.path, size: s.file.size });
        const next = this.shards.find((x) => x.index > s.index && x.state === 'remote');
        if (next && this.shards.filter((x) => x.state === 'downloading').length < 2) this.startWhole(next);
      } catch (e) {
        s.state = 'remote';
        this.failed ??= e;
        throw e;
      }
    })();
    s.ready.catch(() => undefined);
  }

  private fetched(n: number): void {
    this.stats_.bytesFetched += n;
    this.opts.onEvent?.({ kind: 'bytes', n });
    this.opts.transfer?.onBytes?.(n);
  }

  // ---------------------------------------------------------------------------------------
  // Bounded mode: tensor ranges.

  /** The extent holding byte `pos` (reads never span tensors: each piece is one tensor's bytes). */
  private extentAt(s: Shard, pos: number): number {
    const ex = s.extents;
    let lo = 0;
    let hi = ex.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (ex[mid]!.end <= pos) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private async readRanged(s: Shard, position: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const buf = into ?? new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const i = this.extentAt(s, position + done);
      const e = s.extents[i];
      if (!e || e.start > position + done) throw badInput(`${this.what(s)}: bytes ${position}..${position + length} lie outside its tensors`, s.file.path);
      const n = Math.min(length - done, e.end - (position + done));
      // Once anything failed (a hash mismatch, a lost connection), every read reports that first cause.
      await this.acquire(s, i).catch((err) => Promise.reject(this.failed ?? err));
      try {
        await e.local!.read(position + done - e.start, n, buf.subarray(done, done + n));
      } catch (err) {
        throw this.failed ?? err;
      } finally {
        e.reads--;
        e.read += n;
        await this.afterRead(s, e);
      }
      done += n;
    }
    return buf.length === length ? buf : buf.subarray(0, length);
  }

  private async acquire(s: Shard, i: number): Promise<void> {
    const e = s.extents[i]!;
    for (;;) {
      if (this.failed) throw this.failed;
      if (this.closed) throw new Error(`internal: ${this.what(s)} read after the source was closed`);
      if (e.state === 'local') {
        e.reads++;
        e.lastUse = ++this.tick;
        return;
      }
      if (e.state === 'remote') {
        this.startExtent(s, i);
        const next = s.extents[i + 1];
        if (next && next.state === 'remote' && !next.fetched) this.startExtent(s, i + 1, true);
      }
      await e.ready;
    }
  }

  private consumed(e: Extent): boolean {
    return e.read >= e.end - e.start;
  }

  private async afterRead(s: Shard, e: Extent): Promise<void> {
    if (e.reads === 0 && this.consumed(e) && e.hashed) await this.evict(s, e, false);
    this.notify();
  }

  private startExtent(s: Shard, i: number, ahead = false): void {
    const e = s.extents[i]!;
    const size = e.end - e.start;
    if (ahead && this.used + size > this.opts.maxDisk!) return; // fetch ahead only into free room
    e.state = 'downloading';
    const again = e.fetched;
    e.fetched = true;
    e.ready = (async () => {
      try {
        if (this.closed || this.failed) throw this.failed ?? new Error('closed');
        await this.makeRoom(size, e);
        this.stats_.downloads++;
        if (again) {
          this.stats_.again++;
          this.opts.onEvent?.({ kind: 'download', file: `${s.file.path}@${e.start}`, size, again });
        } else if (i === 0 || !s.extents[i - 1]!.fetched) {
          this.opts.onEvent?.({ kind: 'download', file: s.file.path, size: s.file.size, again: false });
        }
        // A fresh name per download: an eviction of an earlier copy may still be removing its file.
        const path = join(this.opts.spoolDir, `${s.index}-${e.start}-${++this.tick}`);
        await this.fetchTo(s, e.start, e.end, path);
        e.path = path;
        e.local = await ReadOnlyFile.open(path);
        e.state = 'local';
        this.reserved.delete(e);
        e.lastUse = ahead ? 0 : ++this.tick;
        if (i === s.extents.length - 1 && !again) this.opts.onEvent?.({ kind: 'downloaded', file: s.file.path, size: s.file.size });
        await this.advanceHash(s);
      } catch (err) {
        if (e.state !== 'local') {
          e.state = 'remote';
          if (this.reserved.delete(e)) this.used -= size;
        }
        this.failed ??= err;
        throw err;
      } finally {
        this.notify();
      }
    })();
    e.ready.catch(() => undefined);
  }

  /** Bytes [start, end) of `s` into a new spool file, by parallel range requests. */
  private async fetchTo(s: Shard, start: number, end: number, path: string): Promise<void> {
    const part = this.opts.transfer?.partSize ?? transferTuning.partSize;
    const parallel = this.opts.transfer?.parallel ?? transferTuning.parallel;
    const fh = await createExclusive(path, { replace: true });
    try {
      const starts: number[] = [];
      for (let a = start; a < end; a += part) starts.push(a);
      let next = 0;
      await Promise.all(
        Array.from({ length: Math.min(parallel, starts.length) }, async () => {
          while (next < starts.length) {
            const a = starts[next++]!;
            const b = await fetchRange(this.listing.repo, this.listing.commit, s.file, a, Math.min(a + part, end), { signal: this.opts.transfer?.signal });
            let w = 0;
            while (w < b.length) w += (await fh.write(b, w, b.length - w, a - start + w)).bytesWritten;
            this.fetched(b.length);
          }
        }),
      );
    } catch (e) {
      await fh.close().catch(() => undefined);
      const why = e instanceof Error ? e.message : String(e);
      throw badInput(`downloading ${this.what(s)} (bytes ${start}..${end}) failed (${why}); re-run to try again`, s.file.path, undefined, e);
    }
    await fh.close();
  }

  /** Hashes the shard's extents from the frontier on, as long as they are on disk (serialised per shard). */
  private advanceHash(s: Shard): Promise<void> {
    const p = s.hashing.then(() => this.advanceNow(s));
    s.hashing = p.catch(() => undefined);
    return p;
  }

  private async advanceNow(s: Shard): Promise<void> {
    while (s.frontier < s.extents.length) {
      const e = s.extents[s.frontier]!;
      if (e.state !== 'local' || e.hashed) break;
      await this.hashExtent(s, e);
    }
    if (s.frontier === s.extents.length && !s.verified) this.check(s);
  }

  private async hashExtent(s: Shard, e: Extent): Promise<void> {
    if (s.extents[s.frontier] !== e) return;
    const step = 8 << 20;
    for (let a = 0; a < e.end - e.start; a += step) s.hash!.update(await e.local!.read(a, Math.min(step, e.end - e.start - a)));
    e.hashed = true;
    s.frontier++;
    if (e.reads === 0 && this.consumed(e)) await this.evict(s, e, false);
  }

  private check(s: Shard): void {
    if (s.verified) return;
    const got = s.hash!.digest('hex');
    s.verified = true;
    if (got !== s.file.identity.hex) {
      const err = badInput(`${this.what(s)}: the downloaded bytes do not match the hub's LFS sha256 (${s.file.identity.hex}, got ${got}); nothing was kept — re-run to fetch it again`, s.file.path);
      this.failed ??= err;
      throw err;
    }
  }

  /**
   * Deletes spooled ranges until `size` more bytes fit: ranges already read first (hashed ones
   * before those the hash still needs). A range not yet read is deleted only when nothing else can
   * free room — no read in flight and no download under way that a read is waiting for — since
   * the executor reads ahead and will read it soon; deleting it then would only fetch it again.
   */
  private async makeRoom(size: number, self: Extent): Promise<void> {
    const max = this.opts.maxDisk!;
    for (;;) {
      if (this.used + size <= max) break;
      const candidates: Array<{ s: Shard; e: Extent; rank: number }> = [];
      let busy = false;
      for (const s of this.shards)
        for (const e of s.extents) {
          if (e.state === 'local' && e.reads === 0) candidates.push({ s, e, rank: (this.consumed(e) ? 0 : 2) + (e.hashed ? 0 : 1) });
          if (e.reads > 0 || (e.state === 'downloading' && e !== self && this.reserved.has(e))) busy = true;
        }
      candidates.sort((a, b) => a.rank - b.rank || a.e.lastUse - b.e.lastUse);
      const v = candidates[0];
      if (v && (v.rank <= 1 || !busy)) {
        await this.evict(v.s, v.e, true);
        continue;
      }
      if (this.failed) throw this.failed;
      await new Promise<void>((r) => this.waiting.push(r));
    }
    this.used += size;
    this.reserved.add(self);
    this.stats_.peakDisk = Math.max(this.stats_.peakDisk, this.used);
  }

  private async evict(s: Shard, e: Extent, forRoom: boolean): Promise<void> {
    if (e.state !== 'local') return;
    e.state = 'remote';
    const f = e.local!;
    const path = e.path!;
    e.local = undefined;
    await f.close();
    await rm(path, { force: true });
    this.used -= e.end - e.start;
    if (forRoom || s.extents.every((x) => x.state !== 'local' && this.consumed(x))) this.opts.onEvent?.({ kind: 'evicted', file: forRoom ? `${s.file.path}@${e.start}` : s.file.path, size: e.end - e.start });
  }
}
