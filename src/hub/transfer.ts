/**
 * One hub file to a local path: parallel range requests, resumed after an interruption, checked
 * against the hub's identity of the file before it is used.
 *
 * Written by hand rather than through the JS client's `downloadFile`: its blobs neither resume nor
 * verify, and a range read there accepts a server that ignores `Range` (a 200 with the whole
 * file) as if it were the part asked for. Here every part must come back as 206 with the
 * Content-Range asked for and exactly that many bytes.
 *
 * While downloading, bytes go to `<dest>.incomplete` (huggingface_hub's name, so either tool
 * resumes the other's partial) and `<dest>.incomplete.ok` records how many leading bytes are
 * known good (parts finish out of order; only the unbroken prefix counts). A resumed download
 * hashes that prefix from disk, then fetches the rest. The finished file is renamed into place
 * only when its SHA-256 (LFS files) or git blob id (the rest) equals what the hub lists.
 */
import { createHash, type Hash } from 'node:crypto';
import { readFile, rename, rm, stat } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import { createExclusive, openForResume } from '../io/create.js';
import { aborted, badInput } from '../util/errors.js';
import { formatBytes } from '../util/size.js';
import { shown, type HubRepo } from './repo.js';
import type { RemoteFile } from './listing.js';
import type { FileHandle } from 'node:fs/promises';

export interface TransferOptions {
  /** Range requests in flight for one file. */
  readonly parallel?: number;
  readonly partSize?: number;
  /** Called with each batch of bytes fetched from the network (not the resumed ones). */
  readonly onBytes?: (n: number) => void;
  readonly signal?: AbortSignal;
  /** Attempts per part before the download stops (network errors and 5xx answers are retried). */
  readonly attempts?: number;
}

export const transferTuning = { parallel: 4, partSize: 16 << 20, attempts: 3, retryDelayMs: 200 };

export interface TransferResult {
  /** Bytes a previous, interrupted download had already fetched. */
  readonly resumed: number;
  readonly fetched: number;
}

/** The resolve URL of `path` at `commit`. */
export function resolveUrl(repo: HubRepo, commit: string, path: string): string {
  return `${repo.endpoint}/${repo.id}/resolve/${commit}/${path.split('/').map(encodeURIComponent).join('/')}`;
}

/** Thrown by a part that must not be retried (the server's answer is wrong, not flaky). */
class Refused extends Error {}

function hashers(file: RemoteFile): { update(b: Uint8Array): void; hex(): string } {
  const h: Hash = createHash(file.identity.kind === 'sha256' ? 'sha256' : 'sha1');
  if (file.identity.kind === 'git-sha1') h.update(`blob ${file.size}\0`);
  return { update: (b) => h.update(b), hex: () => h.digest('hex') };
}

async function hashPrefix(path: string, length: number, h: { update(b: Uint8Array): void }): Promise<void> {
  if (!length) return;
  for await (const b of createReadStream(path, { start: 0, end: length - 1, highWaterMark: 8 << 20 })) h.update(b as Buffer);
}

async function writeAt(fh: FileHandle, b: Uint8Array, pos: number): Promise<void> {
  let done = 0;
  while (done < b.length) {
    const { bytesWritten } = await fh.write(b, done, b.length - done, pos + done);
    done += bytesWritten;
  }
}

/**
 * Bytes [start, end) of `file` at `commit`, by one range request (retried on network errors and
 * 5xx answers): a 206 with exactly the Content-Range asked for, or a 200 when that is the whole file.
 */
export async function fetchRange(repo: HubRepo, commit: string, file: RemoteFile, start: number, end: number, opts: { signal?: AbortSignal; attempts?: number } = {}): Promise<Uint8Array> {
  const url = resolveUrl(repo, commit, file.path);
  const headers: Record<string, string> = { 'user-agent': 'shardshift', range: `bytes=${start}-${end - 1}` };
  if (repo.token) headers.authorization = `Bearer ${repo.token}`;
  const attempts = opts.attempts ?? transferTuning.attempts;
  for (let attempt = 1; ; attempt++) {
    try {
      if (opts.signal?.aborted) throw aborted(`stopped while downloading ${file.path} of ${shown(repo)}`, opts.signal.reason);
      const res = await fetch(url, { headers, signal: opts.signal });
      if (res.status >= 500) throw new Error(`HTTP ${res.status}`);
      if (res.status !== 206) {
        await res.body?.cancel();
        const whole = res.status === 200 && start === 0 && end === file.size;
        if (!whole) throw new Refused(`the hub answered HTTP ${res.status} to a range request${res.status === 200 ? ' (it ignored the Range header)' : ''}`);
      } else {
        const cr = res.headers.get('content-range') ?? '';
        const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(cr);
        if (!m || Number(m[1]) !== start || Number(m[2]) !== end - 1 || (m[3] !== '*' && Number(m[3]) !== file.size)) {
          await res.body?.cancel();
          throw new Refused(`the hub answered bytes ${cr || '(no Content-Range)'} to a request for ${start}-${end - 1} of ${file.size}`);
        }
      }
      const buf = new Uint8Array(await res.arrayBuffer());
      if (buf.length !== end - start) throw new Error(`got ${buf.length} of the ${end - start} bytes asked for`);
      return buf;
    } catch (e) {
      if (e instanceof Refused || (e as { code?: string }).code === 'ABORTED' || opts.signal?.aborted || attempt >= attempts) throw e;
      await new Promise((r) => setTimeout(r, transferTuning.retryDelayMs * attempt));
    }
  }
}

/**
 * Downloads `file` of `repo` at `commit` to `dest` (which must not exist), resuming a partial
 * left at `<dest>.incomplete`.
 */
export async function downloadVerified(repo: HubRepo, commit: string, file: RemoteFile, dest: string, opts: TransferOptions = {}): Promise<TransferResult> {
  const what = `${file.path} of ${shown(repo)}`;
  const incomplete = `${dest}.incomplete`;
  const okFile = `${incomplete}.ok`;
  const partSize = opts.partSize ?? transferTuning.partSize;
  const parallel = Math.max(1, opts.parallel ?? transferTuning.parallel);
  const attempts = opts.attempts ?? transferTuning.attempts;
  const hash = hashers(file);

  let prefix = 0;
  let fh: FileHandle;
  // One write of the record at a time (parts finish concurrently); each writes the prefix of its moment.
  let recording = Promise.resolve();
  const record = (): Promise<void> =>
    (recording = recording.then(async () => {
      const tmp = await createExclusive(`${okFile}.tmp`, { replace: true });
      try {
        await tmp.writeFile(String(prefix));
      } finally {
        await tmp.close();
      }
      await rename(`${okFile}.tmp`, okFile);
    }));

  const partial = await stat(incomplete).catch(() => undefined);
  if (partial) {
    const recorded = await readFile(okFile, 'utf8').then((s) => Number(s.trim()), () => NaN);
    // A partial with no record is huggingface_hub's (written in order): all of it is good.
    prefix = Math.min(Number.isSafeInteger(recorded) && recorded >= 0 ? recorded : partial.size, partial.size, file.size);
    fh = await openForResume(incomplete);
    await fh.truncate(prefix);
    await hashPrefix(incomplete, prefix, hash);
  } else {
    fh = await createExclusive(incomplete);
  }
  // The record exists from the start: a partial of ours never passes for an in-order one.
  await record();
  const resumed = prefix;
  let fetched = 0;

  // Parts [prefix, size) in order; up to `parallel` in flight, at most 2×parallel ahead of the
  // hashed prefix (finished parts wait in memory for their turn to be hashed).
  const starts: number[] = [];
  for (let a = prefix; a < file.size; a += partSize) starts.push(a);
  const done = new Map<number, Uint8Array>();
  let next = 0;
  let hashed = 0;
  let failure: unknown;
  const waiting: Array<() => void> = [];
  const notify = (): void => {
    for (const w of waiting.splice(0)) w();
  };
  const fetchPart = (start: number): Promise<Uint8Array> => fetchRange(repo, commit, file, start, Math.min(start + partSize, file.size), { signal: opts.signal, attempts });

  const worker = async (): Promise<void> => {
    while (failure === undefined && next < starts.length) {
      if (next >= hashed + 2 * parallel) {
        await new Promise<void>((r) => waiting.push(r));
        continue;
      }
      const i = next++;
      const start = starts[i]!;
      const buf = await fetchPart(start);
      await writeAt(fh, buf, start);
      fetched += buf.length;
      opts.onBytes?.(buf.length);
      done.set(i, buf);
      let advanced = false;
      while (done.has(hashed)) {
        const b = done.get(hashed)!;
        done.delete(hashed);
        hash.update(b);
        prefix = starts[hashed]! + b.length;
        hashed++;
        advanced = true;
      }
      if (advanced) {
        await record();
        notify();
      }
    }
  };

  try {
    await Promise.all(
      Array.from({ length: Math.min(parallel, starts.length) }, () =>
        worker().catch((e) => {
          failure ??= e;
          notify();
        }),
      ),
    );
    if (failure !== undefined) throw failure;
    await fh.sync();
  } catch (e) {
    await fh.close().catch(() => undefined);
    if ((e as { code?: string }).code === 'ABORTED') throw e;
    const why = e instanceof Error ? `${e.message}${e.cause instanceof Error ? `: ${e.cause.message}` : ''}` : String(e);
    throw badInput(`downloading ${what} stopped after ${formatBytes(prefix)} of ${formatBytes(file.size)} (${why}); re-run to resume from there`, file.path, undefined, e);
  }
  await fh.close();
  const got = hash.hex();
  if (got !== file.identity.hex) {
    await rm(incomplete, { force: true });
    await rm(okFile, { force: true });
    throw badInput(`${what}: the downloaded bytes do not match the hub's ${file.identity.kind === 'sha256' ? 'LFS sha256' : 'git blob id'} (${file.identity.hex}, got ${got}); the download was deleted — re-run to fetch it again`, file.path);
  }
  await rename(incomplete, dest);
  await rm(okFile, { force: true });
  return { resumed, fetched };
}
