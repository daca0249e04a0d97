/**
 * The file-system steps every output flow shares (the single-process one in `output.ts`, the
 * partitioned one in `part-output.ts`): path checks, atomic JSON records, whole-file hashes, the
 * fsync-and-rename commit, side-file copies and the trust check on a directory found on disk.
 */
import { lstat, mkdir, open, realpath, rename, rm, stat } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import { createHash } from 'node:crypto';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { copyExclusive, createExclusive } from '../io/create.js';
import { readTextFile } from '../io/file.js';
import type { OutputFile } from '../lazy/types.js';
import { VERSION } from '../util/version.js';
import { MANIFEST_NAME, identifyFile, identifySource, type FileRecord, type Manifest } from './manifest.js';

export async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

/** The absolute, symlink-resolved form of a path that may not exist yet. */
export async function canonical(p: string): Promise<string> {
  const abs = resolve(p);
  try {
    return await realpath(abs);
  } catch {
    return join(await canonical(dirname(abs)), basename(abs));
  }
}

export function within(child: string, parent: string): boolean {
  return child === parent || child.startsWith(parent.endsWith(sep) ? parent : parent + sep);
}

export interface OutputTarget {
  /** Final path. */
  readonly path: string;
  /** Where it was written before the rename. */
  readonly temp: string;
  readonly kind: 'dir' | 'file';
}

export async function fsyncPath(p: string): Promise<void> {
  const fh = await open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsyncs the temp output and renames it into place (replacing an existing output when asked). */
export async function commitOutput(t: OutputTarget): Promise<void> {
  if (t.kind === 'dir') await fsyncPath(t.temp);
  if (await exists(t.path)) {
    const old = `${t.temp}.old`;
    await rename(t.path, old);
    await rename(t.temp, t.path);
    await rm(old, { recursive: true, force: true });
  } else {
    await rename(t.temp, t.path);
  }
  await fsyncPath(dirname(t.path));
}

/**
 * Copies side files (config.json, tokenizer ...) into the output, fsyncing each. A copy already in
 * a resumed `.partial` is made again: a kill in the middle of a copy leaves a truncated file, and
 * its source may have changed since.
 */
export async function copySideFiles(copies: ReadonlyArray<{ from: string; to: string }>, toDir: string): Promise<void> {
  const seen = new Set<string>();
  for (const c of copies) {
    if (seen.has(c.to)) continue; // the first source named for a path wins
    seen.add(c.to);
    const dst = join(toDir, c.to);
    await mkdir(dirname(dst), { recursive: true });
    await copyExclusive(c.from, dst);
    await fsyncPath(dst);
  }
}

/** Writes JSON atomically: a temp file, fsynced, renamed over the target. */
export async function writeJsonAtomic(path: string, value: unknown): Promise<void> {
  const tmp = `${path}.tmp`;
  const fh = await createExclusive(tmp, { replace: true });
  try {
    await fh.writeFile(JSON.stringify(value, null, 2) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
}

export async function sha256File(path: string): Promise<FileRecord> {
  const h = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 22 })) {
    h.update(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return { size, sha256: h.digest('hex') };
}

/** Size, mtime (ns) and inode of a file: what changes when it is rewritten or replaced. */
export async function fileStamp(p: string): Promise<string> {
  return stat(p, { bigint: true }).then(
    (st) => `size ${st.size}, mtime ${st.mtimeNs}, inode ${st.ino}`,
    () => 'missing',
  );
}

/**
 * A `.partial` (or `out`) another user could have planted or can still write into is never
 * reused: it must be ours, and not writable by everyone. (A group-writable one is accepted: a
 * umask of 002 is common on shared clusters, and the group is trusted with the output anyway.)
 */
export async function foreignDir(p: string): Promise<string | undefined> {
  const st = await lstat(p);
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) return `${p} belongs to another user (uid ${st.uid})`;
  if (st.mode & 0o002) return `${p} is writable by every user`;
  return undefined;
}

/** What a finished directory's manifest records about the run and its source. */
export interface ManifestInfo {
  readonly command: string;
  readonly sourceFormat: string;
  readonly targetFormat: string;
  /** Directory the source's data files are relative to, and the files. */
  readonly sourceDir: string;
  readonly sourceFiles: readonly string[];
  /** Hash whole source files (default: first and last MiB plus size). */
  readonly fullSourceHash?: boolean;
}

/**
 * Why `dir` is not a finished output of this plan from this unchanged source, or undefined if it
 * is. Used for a finished `.partial` stranded before its rename and for an `out` kept by
 * `reuseComplete`. It is, only if: its manifest was written by shardshift for this plan hash; the
 * manifest lists exactly the files this plan writes (at their planned sizes) and its side files —
 * never a file dropped from both, never a path of its own; the source files it records still have
 * the recorded identity; each side file still has the content of the file it is copied from; and
 * every file is present with its recorded SHA-256.
 */
export async function notFinishedOutput(
  dir: string,
  hash: string,
  files: readonly OutputFile[],
  sideCopies: ReadonlyArray<{ from: string; to: string }>,
  m: ManifestInfo | undefined,
): Promise<string | undefined> {
  let man: Manifest;
  try {
    man = JSON.parse(await readTextFile(join(dir, MANIFEST_NAME))) as Manifest;
  } catch {
    return `no readable ${MANIFEST_NAME}`;
  }
  if (man === null || man.tool !== 'shardshift' || typeof man.files !== 'object' || man.files === null || !Array.isArray(man.source?.files)) return `${MANIFEST_NAME} is not shardshift's`;
  if (man.planHash !== hash) return 'it was made by a different plan';
  const planned = new Map<string, number | undefined>(files.map((f) => [f.relPath, f.size]));
  for (const c of sideCopies) if (!planned.has(c.to)) planned.set(c.to, undefined);
  const listed = Object.keys(man.files);
  if (listed.length !== planned.size || listed.some((k) => !planned.has(k))) return `its manifest lists other files than this run writes`;
  for (const [rel, size] of planned) {
    const rec = man.files[rel]!;
    if (typeof rec?.sha256 !== 'string' || typeof rec.size !== 'number' || (size !== undefined && rec.size !== size)) return `${rel} is not the size this run writes`;
  }
  if (m) {
    const recorded = man.source.files;
    if (recorded.length !== m.sourceFiles.length) return 'it was made from other source files';
    for (const [i, rel] of m.sourceFiles.entries()) {
      const r = recorded[i]!;
      const now = await identifyFile(join(m.sourceDir, rel), r.hashKind === 'sha256').catch(() => undefined);
      if (!now || now.size !== r.size || now.mtimeMs !== r.mtimeMs || now.hash !== r.hash) return `${join(m.sourceDir, rel)} changed since it was made`;
    }
  }
  for (const c of sideCopies) {
    const now = await sha256File(c.from).catch(() => undefined);
    if (now?.sha256 !== man.files[c.to]!.sha256) return `its ${c.to} is not a copy of ${c.from}`;
  }
  for (const [rel, rec] of Object.entries(man.files)) {
    const p = join(dir, rel);
    if (!(await lstat(p).then((st) => st.isFile() && st.size === rec.size, () => false)) || (await sha256File(p)).sha256 !== rec.sha256) return `${rel} in it no longer matches its recorded SHA-256`;
  }
  return undefined;
}

/**
 * Writes `shardshift-manifest.json` into the finished directory: the run, its source's identity,
 * the plan hash and every file's size and SHA-256 (side files hashed here, as copied).
 */
export async function writeManifest(
  dir: string,
  source: string,
  hash: string,
  records: Record<string, FileRecord>,
  sideCopies: ReadonlyArray<{ from: string; to: string }>,
  m: ManifestInfo | undefined,
  hashSource: boolean | undefined,
): Promise<void> {
  const all: Record<string, FileRecord> = { ...records };
  for (const c of sideCopies) all[c.to] = await sha256File(join(dir, c.to));
  const manifest: Manifest = {
    tool: 'shardshift',
    version: VERSION,
    created: new Date().toISOString(),
    command: m?.command ?? 'convert',
    source: {
      path: source,
      format: m?.sourceFormat ?? 'unknown',
      files: m ? await identifySource(m.sourceDir, m.sourceFiles, hashSource ?? m.fullSourceHash ?? false) : [],
    },
    target: { format: m?.targetFormat ?? 'unknown' },
    planHash: hash,
    files: all,
  };
  await writeJsonAtomic(join(dir, MANIFEST_NAME), manifest);
}

/** An output being written by this process: what an interrupt (Ctrl-C) reports and cleans up. */
export interface ActiveOutput {
  readonly out: string;
  readonly partial: string;
  readonly kind: 'dir' | 'file';
  readonly lock: string;
  readonly filesTotal: number;
  /** Files finished (written, or kept from an interrupted run) so far. */
  filesDone: number;
  /** Set when this process writes one part of a partitioned run (`--part i/n`). */
  readonly part?: { readonly index: number; readonly count: number };
}

const active = new Set<ActiveOutput>();

/** The outputs this process is writing right now (for the CLI's interrupt message). */
export function activeOutputs(): readonly ActiveOutput[] {
  return [...active];
}

export function trackActive(a: ActiveOutput): void {
  active.add(a);
}

export function untrackActive(a: ActiveOutput): void {
  active.delete(a);
}
