/**
 * A hub model as a conversion source without downloading it first: the commit's file list, the
 * side files (config, tokenizer, index) into the cache, and every safetensors shard's header by
 * two range requests (its 8-byte length, then the header) — no weights. The plan is made from
 * those headers; the executor's reads then pull each shard through a `ShardWindow` (downloaded
 * when first read, the next one fetched ahead, at most `--max-disk` of them on disk).
 */
import { join } from 'node:path';
import { CachedRepo, hubCacheRoot } from '../hub/cache.js';
import { fetchIntoCache, sideFilesOf, weightFiles, type HubOptions } from '../hub/download.js';
import { listRepo, type RepoListing } from '../hub/listing.js';
import { hubRepo, shown } from '../hub/repo.js';
import { fetchRange } from '../hub/transfer.js';
import { ShardWindow, type WindowEvent, type WindowStats } from '../hub/window.js';
import { ReadOnlyFile } from '../io/file.js';
import { MAX_HEADER_SIZE, parseHeader, readHeader, safetensorsSource, type ParsedHeader, type ShardBytes } from '../formats/safetensors.js';
import { readWeightMap } from '../formats/shards.js';
import { listSideFiles } from '../formats/side-files.js';
import type { CheckpointSource } from '../formats/types.js';
import { badInput, usage } from '../util/errors.js';

export interface HubSourceOptions extends HubOptions {
  /** Bytes of source shards on disk at once (they are deleted once read); undefined: into the cache, kept. */
  readonly maxDisk?: number;
  /** Where shards go under maxDisk. */
  readonly spoolDir: string;
  readonly onEvent?: (e: WindowEvent) => void;
}

export interface HubSource {
  readonly listing: RepoListing;
  /** The cache snapshot holding config.json and the other side files. */
  readonly dir: string;
  readonly source: CheckpointSource;
  readonly stats: () => WindowStats;
}

async function remoteHeader(l: RepoListing, f: RepoListing['files'][number]): Promise<{ parsed: ParsedHeader; bytes: Uint8Array }> {
  if (f.size < 8) throw badInput(`${shown(l.repo)}/${f.path}: not a safetensors file (${f.size} bytes)`, f.path);
  const prefix = await fetchRange(l.repo, l.commit, f, 0, 8);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  const len = n > BigInt(MAX_HEADER_SIZE) || Number(n) + 8 > f.size ? 0 : Number(n);
  const header = len ? await fetchRange(l.repo, l.commit, f, 8, 8 + len) : new Uint8Array();
  const parsed = parseHeader(`${shown(l.repo)}/${f.path}`, prefix, header, f.size);
  const bytes = new Uint8Array(8 + header.length);
  bytes.set(prefix);
  bytes.set(header, 8);
  return { parsed, bytes };
}

/** Runs `fn` over `items` with at most `n` at once, in order of the results. */
async function mapLimited<T, R>(items: readonly T[], n: number, fn: (t: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(n, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await fn(items[i]!, i);
      }
    }),
  );
  return out;
}

export async function openHubSource(id: string, opts: HubSourceOptions): Promise<HubSource> {
  const env = opts.env ?? process.env;
  const l = await listRepo(hubRepo(id, env));
  const weights = weightFiles(l);
  const shards = weights.filter((f) => f.path.endsWith('.safetensors'));
  if (!shards.length) throw usage(`${shown(l.repo)}: its weights are pytorch_model*.bin files, which cannot be read by range; download them first (convert without --max-disk takes the model whole)`);
  const index = weights.filter((f) => f.path.endsWith('.safetensors.index.json'));
  if (index.length > 1) throw badInput(`${shown(l.repo)}: several safetensors indexes (${index.map((f) => f.path).join(', ')})`);
  if (!index.length && shards.length > 1) throw badInput(`${shown(l.repo)}: ${shards.length} .safetensors files and no model.safetensors.index.json`);
  const dir = await fetchIntoCache(l, [...sideFilesOf(l), ...index], opts);
  const cache = new CachedRepo(hubCacheRoot(env), l.repo.id);
  const weightMap = index.length ? await readWeightMap(join(dir, index[0]!.path), (v) => v.endsWith('.safetensors'), '.safetensors') : undefined;
  const used = weightMap ? shards.filter((f) => [...weightMap.values()].includes(f.path)) : shards;
  const window = await ShardWindow.open(l, cache, used, { maxDisk: opts.maxDisk, spoolDir: opts.spoolDir, transfer: opts.transfer, onEvent: opts.onEvent });
  try {
    const headers = await mapLimited(used, 8, async (f) => {
      const local = await cache.file(l.commit, f.path, f.size);
      if (!local) return remoteHeader(l, f);
      const rf = await ReadOnlyFile.open(local);
      try {
        return { parsed: await readHeader(rf), bytes: new Uint8Array() };
      } finally {
        await rf.close();
      }
    });
    const parts: ShardBytes[] = used.map((f, i) => {
      const { parsed: h, bytes } = headers[i]!;
      window.setExtents(i, h.entries.map((e) => ({ name: e.name, start: h.dataStart + e.begin, end: h.dataStart + e.end })), bytes);
      return { rel: f.path, source: window.source(i), header: h };
    });
    const side = await listSideFiles(dir, (n) => n.endsWith('.safetensors') || n.endsWith('.safetensors.index.json'));
    const source = safetensorsSource(dir, dir, parts, weightMap, side, () => window.close(), () => window.settle());
    return { listing: l, dir, source, stats: () => window.stats() };
  } catch (e) {
    await window.close();
    throw e;
  }
}
