/**
 * The two halves of a partitioned output (see `parts.ts`): a part run writes its share of the
 * plan's files into the shared `<out>.partial` under its own lock and progress record; the
 * finalize checks every part's record and files (sizes and SHA-256s, re-read), writes the files
 * that are plan bytes alone, the side files and the manifest, and renames into place — the same
 * bytes as a single-process run of the same command.
 *
 * What is on the shared directory while parts run:
 * - `.shardshift-parts.json`: the plan hash, the part count, and the command (argv and working
 *   directory) that `shardshift finalize` re-runs to plan again. Created once, atomically (a link
 *   of a complete temp file), by whichever part comes first; every later part must match it.
 * - `.shardshift-part-<i>.json`: part i's state (running, done, failed), host and pid, its files'
 *   sizes and SHA-256s, bytes done, and the source files' stamps when it started.
 * - `.shardshift-part-<i>.lock`: held while part i runs (the lock of `io/lock.ts`).
 */
import { lstat, mkdir, readdir, rm, link, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { createExclusive } from '../io/create.js';
import { readTextFile } from '../io/file.js';
import { lockOutput } from '../io/lock.js';
import type { OutputFile } from '../lazy/types.js';
import { badInput, usage } from '../util/errors.js';
import { Executor, DEFAULT_MAX_MEMORY } from './executor.js';
import { MANIFEST_NAME, PROGRESS_NAME, planHash, type FileRecord } from './manifest.js';
import { commitOutput, copySideFiles, exists, fileStamp, foreignDir, sha256File, trackActive, untrackActive, writeJsonAtomic, writeManifest, type ActiveOutput, type ManifestInfo } from './output-files.js';
import { assignParts, recordPartResult, type PartSpec } from './parts.js';
import type { ProgressEvent } from './executor.js';

export const PARTS_NAME = '.shardshift-parts.json';
export const partRecordName = (i: number): string => `.shardshift-part-${i}.json`;
const partLockBase = (partial: string, i: number): string => join(partial, `.shardshift-part-${i}`);

/** The shared record of a partitioned run. */
export interface PartsRecord {
  readonly tool: 'shardshift';
  readonly planHash: string;
  readonly parts: number;
  /** The command without `--part`, and where it ran: what `shardshift finalize` re-runs. */
  readonly argv: readonly string[];
  readonly cwd: string;
  readonly created: string;
}

export type PartState = 'running' | 'done' | 'failed';

/** One part's record. */
export interface PartRecord {
  readonly planHash: string;
  readonly part: number;
  readonly parts: number;
  state: PartState;
  readonly host: string;
  readonly pid: number;
  /** The Slurm job that ran it, when under Slurm (`<array job>_<task>`). */
  readonly slurmJob?: string;
  readonly started: string;
  updated: string;
  error?: string;
  readonly filesTotal: number;
  readonly bytesTotal: number;
  bytesDone: number;
  /** Stamps (size, mtime, inode) of the source files when the part started. */
  readonly sourceStamps: readonly string[];
  readonly files: Record<string, FileRecord>;
}

/** What both halves are given by `writeOutput` (after its path checks). */
export interface PartitionedWrite {
  readonly source: string;
  readonly out: string;
  readonly partial: string;
  readonly files: readonly OutputFile[];
  readonly sideCopies: ReadonlyArray<{ from: string; to: string }>;
  readonly sourceFiles: readonly string[];
  readonly maxMemory?: number;
  readonly onProgress?: (e: ProgressEvent) => void;
  readonly manifest?: ManifestInfo;
  readonly hashSource?: boolean;
}

async function readJson<T>(path: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readTextFile(path)) as T;
  } catch {
    return undefined;
  }
}

export async function readPartsRecord(partial: string): Promise<PartsRecord | undefined> {
  const r = await readJson<PartsRecord>(join(partial, PARTS_NAME));
  return r && r.tool === 'shardshift' && typeof r.planHash === 'string' && Number.isInteger(r.parts) && Array.isArray(r.argv) ? r : undefined;
}

export async function readPartRecord(partial: string, i: number): Promise<PartRecord | undefined> {
  const r = await readJson<PartRecord>(join(partial, partRecordName(i)));
  return r && typeof r.planHash === 'string' && r.part === i && typeof r.files === 'object' && r.files !== null ? r : undefined;
}

const ours = (n: string): boolean => n === PARTS_NAME || /^\.shardshift-part(s)?[-.]/.test(n);

/**
 * Joins (or starts) the partitioned run in `partial`: creates the directory and the shared
 * record, or checks that the one there is for this plan and part count.
 */
async function joinRun(partial: string, rec: PartsRecord): Promise<void> {
  const made = await mkdir(partial).then(
    () => true,
    (e: NodeJS.ErrnoException) => {
      if (e.code === 'EEXIST') return false;
      throw e;
    },
  );
  if (!made) {
    const foreign = await foreignDir(partial);
    if (foreign) throw usage(`${partial} is not this user's partial output (${foreign}); remove it to start over`);
    if (!(await lstat(partial)).isDirectory()) throw usage(`${partial} exists and is not a directory; remove it to start over`);
    if (await exists(join(partial, PROGRESS_NAME))) throw usage(`${partial} holds an interrupted single-process run, not parts of one; re-run it without --part to resume it, or remove ${partial} to start over`);
    if (await exists(join(partial, MANIFEST_NAME))) throw usage(`${partial} holds a finished single-process conversion; re-run it without --part to complete it, or remove ${partial}`);
  }
  for (let attempt = 0; ; attempt++) {
    const have = await readPartsRecord(partial);
    if (have) {
      if (have.planHash !== rec.planHash || have.parts !== rec.parts) {
        throw usage(
          `${partial} holds parts of a different plan (plan ${have.planHash.slice(0, 12)} in ${have.parts} parts, from \`shardshift ${have.argv.join(' ')}\`); this run is plan ${rec.planHash.slice(0, 12)} in ${rec.parts} parts — run that command's parts, or remove ${partial} to start over`,
        );
      }
      return;
    }
    if (await exists(join(partial, PARTS_NAME))) {
      // Being created by another part (a link makes it appear complete, so this is a damaged one).
      if (attempt < 3) {
        await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      throw usage(`${join(partial, PARTS_NAME)} is unreadable; remove ${partial} to start over`);
    }
    const strangers = (await readdir(partial)).filter((n) => !ours(n));
    if (strangers.length) throw usage(`${partial} exists but is not a shardshift partial output (it holds ${strangers[0]}); remove it to start over`);
    // Atomic creation: a complete temp file linked to the name (link fails if another part won).
    const tmp = join(partial, `.shardshift-parts.${hostname()}.${process.pid}.tmp`);
    const fh = await createExclusive(tmp, { replace: true });
    try {
      await fh.writeFile(JSON.stringify(rec, null, 2) + '\n');
      await fh.sync();
    } finally {
      await fh.close();
    }
    await link(tmp, join(partial, PARTS_NAME)).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'EEXIST') throw e;
    });
    await unlink(tmp).catch(() => undefined);
  }
}

function slurmJob(): string | undefined {
  const e = process.env;
  if (e.SLURM_ARRAY_JOB_ID && e.SLURM_ARRAY_TASK_ID) return `${e.SLURM_ARRAY_JOB_ID}_${e.SLURM_ARRAY_TASK_ID}`;
  return e.SLURM_JOB_ID;
}

/** Writes part `part` of the plan; finalizes when it finds every other part done. */
export async function writePart(w: PartitionedWrite, part: PartSpec, argv: readonly string[], cwd: string, sourceStamps: readonly string[]): Promise<'part-written' | 'written'> {
  const hash = planHash(w.files, w.sideCopies.map((c) => c.to));
  await joinRun(w.partial, { tool: 'shardshift', planHash: hash, parts: part.count, argv: [...argv], cwd, created: new Date().toISOString() });
  const assignment = assignParts(w.files, part.count);
  const mine = w.files.filter((f) => assignment.get(f.relPath) === part.index);
  const recordPath = join(w.partial, partRecordName(part.index));
  const lock = await lockOutput(partLockBase(w.partial, part.index));
  let reused = 0;
  let written = 0;
  const me: ActiveOutput = { out: w.out, partial: w.partial, kind: 'dir', lock: `${partLockBase(w.partial, part.index)}.lock`, filesTotal: mine.length, filesDone: 0, part: { index: part.index, count: part.count } };
  trackActive(me);
  try {
    const prev = await readPartRecord(w.partial, part.index);
    const now = new Date().toISOString();
    const rec: PartRecord = {
      planHash: hash,
      part: part.index,
      parts: part.count,
      state: 'running',
      host: hostname(),
      pid: process.pid,
      slurmJob: slurmJob(),
      started: now,
      updated: now,
      filesTotal: mine.length,
      bytesTotal: mine.reduce((n, f) => n + f.size, 0),
      bytesDone: 0,
      sourceStamps: [...sourceStamps],
      files: prev && prev.planHash === hash ? { ...prev.files } : {},
    };
    await writeJsonAtomic(recordPath, rec);
    let lastSave = Date.now();
    const ex = new Executor({
      maxMemory: w.maxMemory ?? DEFAULT_MAX_MEMORY,
      onProgress: (e) => {
        w.onProgress?.(e);
        // `shardshift status` reads bytes done from here: saved every few seconds, not per chunk.
        rec.bytesDone = e.bytesDone;
        if (Date.now() - lastSave > 3000) {
          lastSave = Date.now();
          rec.updated = new Date().toISOString();
          void writeJsonAtomic(recordPath, rec).catch(() => undefined);
        }
      },
    });
    ex.setTotal(rec.bytesTotal);
    try {
      for (const f of mine) {
        const path = join(w.partial, f.relPath);
        const done = rec.files[f.relPath];
        if (done && (await lstat(path).then((st) => st.isFile() && st.size === done.size, () => false)) && (await sha256File(path)).sha256 === done.sha256) {
          ex.skipFile(f);
          reused++;
          me.filesDone++;
          continue;
        }
        delete rec.files[f.relPath];
        const sha256 = await ex.writeFile(path, f, { replace: true });
        rec.files[f.relPath] = { size: f.size, sha256 };
        me.filesDone++;
        rec.updated = new Date().toISOString();
        await writeJsonAtomic(recordPath, rec);
        // Test hook: die like `scancel --signal=KILL` after this many files of the part.
        if (Number(process.env.SHARDSHIFT_TEST_KILL_AFTER_FILES ?? -1) === ++written) process.kill(process.pid, 'SIGKILL');
        // Test hook: part i stops after its first file until a signal ends it (`scancel` mid-run).
        if (written === 1 && process.env.SHARDSHIFT_TEST_HANG_PART === String(part.index)) await new Promise(() => setInterval(() => undefined, 1 << 30));
      }
      const after = await Promise.all(w.sourceFiles.map(fileStamp));
      const changed = w.sourceFiles.findIndex((_, i) => after[i] !== sourceStamps[i]);
      if (changed >= 0) throw badInput(`${w.sourceFiles[changed]} changed while part ${part.index}/${part.count} was converting it (${sourceStamps[changed]} → ${after[changed]}); re-run this part once the source is stable`, w.sourceFiles[changed]);
    } catch (e) {
      rec.state = 'failed';
      rec.error = e instanceof Error ? e.message : String(e);
      rec.updated = new Date().toISOString();
      await writeJsonAtomic(recordPath, rec).catch(() => undefined);
      if (e instanceof Error) e.message += ` (part ${part.index}/${part.count}: finished files are kept in ${w.partial}; re-run the same part to resume)`;
      throw e;
    }
    rec.state = 'done';
    rec.bytesDone = rec.bytesTotal;
    rec.updated = new Date().toISOString();
    await writeJsonAtomic(recordPath, rec);
  } finally {
    untrackActive(me);
    await lock.release();
  }
  // The last part to finish completes the output; with parts finishing at once, one finalizes
  // (under `<out>.lock`) and the others see its lock and leave it to it.
  const states = await partStates(w.partial, part.count, hash);
  const partsDone = states.filter((s) => s.kind === 'done').length;
  const base = { part, out: w.out, files: mine.length, bytes: mine.reduce((n, f) => n + f.size, 0), filesReused: reused, partsDone };
  if (partsDone < part.count) {
    recordPartResult({ ...base, finalized: false });
    return 'part-written';
  }
  let outLock;
  try {
    outLock = await lockOutput(w.out);
  } catch (e) {
    recordPartResult({ ...base, finalized: false, note: e instanceof Error ? e.message : String(e) });
    return 'part-written';
  }
  try {
    if (await exists(w.out)) {
      recordPartResult({ ...base, finalized: false, note: `${w.out} was finalized by another part` });
      return 'part-written';
    }
    await finalizeLocked(w, hash, part.count);
  } finally {
    await outLock.release();
  }
  recordPartResult({ ...base, finalized: true });
  return 'written';
}

/**
 * Whether a part's lock is held: present, and not left by a dead process of this host (a holder
 * on another host cannot be checked from here, so it counts as held).
 */
async function lockHeld(path: string): Promise<boolean> {
  const h = await readJson<{ pid?: number; host?: string }>(path);
  if (!h) return exists(path);
  if (h.host !== hostname() || typeof h.pid !== 'number') return true;
  try {
    process.kill(h.pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Each part's state as the shared directory shows it. */
export type PartStatus =
  | { readonly kind: 'missing'; readonly part: number }
  | { readonly kind: 'done' | 'running' | 'failed' | 'interrupted'; readonly part: number; readonly record: PartRecord };

/**
 * The state of every part: 'running' while its lock is held, 'interrupted' when its record says
 * running but nobody holds its lock (killed: re-run it), 'missing' when it never started.
 */
export async function partStates(partial: string, count: number, hash?: string): Promise<PartStatus[]> {
  const out: PartStatus[] = [];
  for (let i = 0; i < count; i++) {
    const record = await readPartRecord(partial, i);
    if (!record || (hash !== undefined && record.planHash !== hash)) {
      out.push({ kind: 'missing', part: i });
      continue;
    }
    if (record.state === 'running') {
      out.push({ kind: (await lockHeld(`${partLockBase(partial, i)}.lock`)) ? 'running' : 'interrupted', part: i, record });
    } else {
      out.push({ kind: record.state, part: i, record });
    }
  }
  return out;
}

/** `shardshift finalize`: checks every part and completes the output. */
export async function finalizeParts(w: PartitionedWrite): Promise<'written'> {
  const hash = planHash(w.files, w.sideCopies.map((c) => c.to));
  const lock = await lockOutput(w.out);
  try {
    const rec = await readPartsRecord(w.partial);
    if (!rec) throw usage(`${w.out} is not a partitioned run: ${w.partial} has no ${PARTS_NAME}`);
    if (rec.planHash !== hash) throw usage(`the plan changed since the parts of ${w.out} ran (plan ${rec.planHash.slice(0, 12)}, now ${hash.slice(0, 12)}): the source or shardshift changed; remove ${w.partial} and run the parts again`);
    await finalizeLocked(w, hash, rec.parts);
  } finally {
    await lock.release();
  }
  return 'written';
}

/** The command that (re-)runs part `i`, for the messages. */
export function partCommand(rec: PartsRecord, i: number): string {
  return `shardshift ${rec.argv.join(' ')} --part ${i}/${rec.parts}`;
}

async function finalizeLocked(w: PartitionedWrite, hash: string, count: number): Promise<void> {
  const rec = (await readPartsRecord(w.partial))!;
  const states = await partStates(w.partial, count, hash);
  const notDone = states.filter((s) => s.kind !== 'done');
  if (notDone.length) {
    const why = notDone.map((s) => {
      const name = `part ${s.part}/${count}`;
      if (s.kind === 'missing') return `${name} has not run`;
      if (s.kind === 'failed') return `${name} failed (${s.record.error ?? 'no message'})`;
      if (s.kind === 'running') return `${name} is still running (pid ${s.record.pid} on ${s.record.host})`;
      return `${name} was interrupted (${Object.keys(s.record.files).length} of ${s.record.filesTotal} files done)`;
    });
    throw usage(`cannot finalize ${w.out}: ${why.join('; ')}. Run the missing parts (e.g. \`${partCommand(rec, notDone[0]!.part)}\`), then finalize again`);
  }
  // Every part's files: the ones the plan assigns it, each with the size and SHA-256 recorded.
  const assignment = assignParts(w.files, count);
  const records: Record<string, FileRecord> = {};
  const now = await Promise.all(w.sourceFiles.map(fileStamp));
  for (const s of states) {
    if (s.kind !== 'done') continue;
    const changed = w.sourceFiles.findIndex((_, i) => s.record.sourceStamps[i] !== now[i]);
    if (changed >= 0) throw badInput(`${w.sourceFiles[changed]} changed after part ${s.part}/${count} read it (${s.record.sourceStamps[changed]} → ${now[changed]}); remove ${w.partial} and run the parts again`, w.sourceFiles[changed]);
  }
  for (const f of w.files) {
    const owner = assignment.get(f.relPath)!;
    if (owner === 'final') continue;
    const s = states[owner]!;
    const r = s.kind === 'done' ? s.record.files[f.relPath] : undefined;
    if (!r) throw usage(`cannot finalize ${w.out}: part ${owner}/${count} did not record ${f.relPath}; re-run it (\`${partCommand(rec, owner)}\`)`);
    const path = join(w.partial, f.relPath);
    const onDisk = await lstat(path).then((st) => (st.isFile() ? st.size : -1), () => -1);
    if (onDisk !== f.size || (await sha256File(path)).sha256 !== r.sha256) {
      throw badInput(`cannot finalize ${w.out}: ${path} (part ${owner}/${count}) no longer holds what the part wrote (${onDisk < 0 ? 'missing' : `size ${onDisk}, or its SHA-256 differs`}); re-run that part (\`${partCommand(rec, owner)}\`)`, path);
    }
    records[f.relPath] = r;
  }
  const ex = new Executor({ maxMemory: w.maxMemory ?? DEFAULT_MAX_MEMORY, onProgress: w.onProgress });
  const finals = w.files.filter((f) => assignment.get(f.relPath) === 'final');
  ex.setTotal(finals.reduce((n, f) => n + f.size, 0));
  for (const f of finals) records[f.relPath] = { size: f.size, sha256: await ex.writeFile(join(w.partial, f.relPath), f, { replace: true }) };
  await copySideFiles(w.sideCopies, w.partial);
  ex.finishing();
  // The manifest lists the files in plan order, as a single-process run's does.
  const ordered: Record<string, FileRecord> = {};
  for (const f of w.files) ordered[f.relPath] = records[f.relPath]!;
  await writeManifest(w.partial, w.source, hash, ordered, w.sideCopies, w.manifest, w.hashSource);
  // The partitioned run's own records go before the rename: the output is what a single run writes.
  for (const n of await readdir(w.partial)) if (ours(n)) await rm(join(w.partial, n), { force: true });
  await commitOutput({ path: w.out, temp: w.partial, kind: 'dir' });
}
