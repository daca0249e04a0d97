/**
 * Atomic output: everything is written into a temporary path beside the destination, fsynced,
 * and renamed into place only when complete, so an interrupted run never leaves something that
 * looks done. The destination must not exist (unless overwriting), and may be neither the source,
 * inside it, nor contain it.
 */
import { lstat, mkdir, readdir, rm } from 'node:fs/promises';
import { createExclusive } from '../io/create.js';
import { lockOutput } from '../io/lock.js';
import { basename, dirname, join } from 'node:path';
import { badInput, usage } from '../util/errors.js';
import type { OutputFile } from '../lazy/types.js';
import { Executor, DEFAULT_MAX_MEMORY, type ProgressEvent } from './executor.js';
import { MANIFEST_NAME, PROGRESS_NAME, planHash, type FileRecord, type Progress } from './manifest.js';
import { readTextFile } from '../io/file.js';
import { claimPartitionedOutput, currentPartition } from './parts.js';
import { finalizeParts, writePart } from './part-output.js';
import { canonical, commitOutput, copySideFiles, exists, fileStamp, foreignDir, fsyncPath, notFinishedOutput, sha256File, within, writeJsonAtomic, writeManifest, type ManifestInfo, type ActiveOutput, trackActive, untrackActive } from './output-files.js';

export interface WriteOutputOptions {
  overwrite?: boolean;
  /** Hash whole source data files into the manifest (default: first and last MiB plus size). */
  hashSource?: boolean;
  maxMemory?: number;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run (a library caller's cancel): finished files of a directory output are kept for a resume, as after Ctrl-C. */
  signal?: AbortSignal;
  /** What the finished directory's manifest records about the run and its source. */
  manifest?: ManifestInfo;

  /**
   * Keep an `out` that already holds this very output — finished by shardshift for the same plan
   * from the same, unchanged source, every file still holding its recorded SHA-256 — instead of
   * refusing it. For commands that write two outputs one after the other (`merge-lora --export-hf`):
   * a re-run after a kill between the two commits keeps the first and finishes the second.
   */
  reuseComplete?: boolean;
  /**
   * Runs once every byte is written, before the output is committed: a streamed source checks
   * what it downloaded here, and a failure removes the partial output.
   */
  beforeCommit?: () => Promise<void>;
}

export { activeOutputs, type ActiveOutput } from './output-files.js';

/**
 * What writeOutput did: wrote the output, kept an identical finished one (`reuseComplete`), or
 * (a part of a partitioned run) wrote its part while other parts are still to finish.
 */
export type OutputOutcome = 'written' | 'reused' | 'part-written';

async function readProgress(path: string): Promise<Progress | undefined> {
  try {
    const j = JSON.parse(await readTextFile(path)) as Progress;
    return typeof j.planHash === 'string' && typeof j.files === 'object' ? j : undefined;
  } catch {
    return undefined;
  }
}

/** Outputs this process has committed (for the after-commit kill point). */
let commits = 0;

/** Test hook: SIGKILL this process at a chosen point, to prove interrupted runs resume. */
function killPoint(kind: 'after-mkdir' | 'after-files' | 'mid-file' | 'before-commit' | 'after-commit', n = 0): boolean {
  const v = process.env[
    {
      'after-mkdir': 'SHARDSHIFT_TEST_KILL_AFTER_MKDIR',
      'after-files': 'SHARDSHIFT_TEST_KILL_AFTER_FILES',
      'mid-file': 'SHARDSHIFT_TEST_KILL_MID_FILE',
      'before-commit': 'SHARDSHIFT_TEST_KILL_BEFORE_COMMIT',
      'after-commit': 'SHARDSHIFT_TEST_KILL_AFTER_COMMIT',
    }[kind]
  ];
  return v !== undefined && Number(v) === n;
}

/**
 * Runs a complete plan into `out`.
 *
 * A directory output is written into `<out>.partial`, one file at a time; each finished file is
 * fsynced and recorded (size, SHA-256) in `.shardshift-progress.json` together with the plan's
 * hash. Re-running the same conversion after an interruption (even `kill -9`) skips the files
 * already recorded and rewrites the rest; a different plan into the same `.partial` is refused.
 * When everything is written, side files are copied, `shardshift-manifest.json` is written last,
 * and the directory is renamed into place. A single-file output goes to `<out>.partial` and is
 * renamed when complete. With `reuseComplete`, an `out` that is already this finished output is
 * kept ('reused').
 */
export async function writeOutput(
  src: string,
  out: string,
  kind: 'dir' | 'file',
  files: readonly OutputFile[],
  sideCopies: ReadonlyArray<{ from: string; to: string }>,
  opts: WriteOutputOptions,
): Promise<OutputOutcome> {
  const s = await canonical(src);
  const o = await canonical(out);
  if (within(o, s)) throw usage(`output ${out} is ${o === s ? 'the source itself' : 'inside the source'} (${src}); choose a path outside it`);
  if (within(s, o)) throw usage(`output ${out} contains the source ${src}; choose another path`);
  // An existing `out` is refused, unless it may be this very output, kept (checked under the lock).
  const reuse = (await exists(o)) && !opts.overwrite;
  if (reuse && !(opts.reuseComplete && kind === 'dir')) throw usage(`output ${out} already exists; remove it or pass --overwrite`);
  const partial = `${o}.partial`;
  // A `.partial` that is a link is not ours: following it could write into the source (or
  // anywhere). A single-file partial is unlinked and created fresh by the executor; a directory
  // partial is refused.
  const partialLink = await lstat(partial).then((st) => st.isSymbolicLink(), () => false);
  if (partialLink && kind === 'dir') throw usage(`${partial} is a symbolic link, not a shardshift partial output; remove it and re-run`);
  if (!partialLink && within(await canonical(partial), s)) throw usage(`output ${out}.partial would be inside the source; choose a path outside it`);
  await mkdir(dirname(o), { recursive: true });
  const sourceFiles = opts.manifest ? opts.manifest.sourceFiles.map((r) => join(opts.manifest!.sourceDir, r)) : [];
  const before = await Promise.all(sourceFiles.map(fileStamp));
  const partition = currentPartition();
  if (partition?.kind === 'probe') throw new Error('internal: a planning probe tried to write');
  if (partition) {
    claimPartitionedOutput(out);
    if (kind === 'file') throw usage(`--part splits a directory output into whole files; ${out} is one file — convert it in one run`);
    if (reuse) throw usage(`output ${out} already exists; remove it or pass --overwrite`);
    const w = { source: s, out: o, partial, files, sideCopies, sourceFiles, maxMemory: opts.maxMemory, onProgress: opts.onProgress, manifest: opts.manifest, hashSource: opts.hashSource };
    return partition.kind === 'part' ? writePart(w, partition.part, partition.argv, partition.cwd, before) : finalizeParts(w);
  }
  const lock = await lockOutput(o);
  const me: ActiveOutput = { out: o, partial, kind, lock: `${o}.lock`, filesTotal: files.length, filesDone: 0 };
  try {
    if (reuse) {
      const why = (await foreignDir(o)) ?? (await notFinishedOutput(o, planHash(files, sideCopies.map((c) => c.to)), files, sideCopies, opts.manifest));
      if (why === undefined) return 'reused';
      throw usage(`output ${out} already exists and is not this run's finished output (${why}); remove it or pass --overwrite`);
    }
    // Finished by another run between the check above and taking the lock.
    if (!opts.overwrite && (await exists(o))) throw usage(`output ${out} already exists; remove it or pass --overwrite`);
    trackActive(me);
    await writeLocked(s, o, partial, kind, files, sideCopies, opts, me, async () => {
      // Test hook: a window in which a test changes the source.
      const pause = Number(process.env.SHARDSHIFT_TEST_PAUSE_BEFORE_COMMIT_MS ?? 0);
      if (pause > 0) await new Promise((r) => setTimeout(r, pause));
      // A source rewritten in place while it was read gives an output of neither version.
      const after = await Promise.all(sourceFiles.map(fileStamp));
      const changed = sourceFiles.filter((_, i) => after[i] !== before[i]);
      if (changed.length) {
        await rm(partial, { recursive: true, force: true });
        throw badInput(`${changed[0]} changed while it was being converted (${before[sourceFiles.indexOf(changed[0]!)]} → ${after[sourceFiles.indexOf(changed[0]!)]})${changed.length > 1 ? ` (and ${changed.length - 1} more source files)` : ''}; nothing was written — re-run once the source is stable`, changed[0]);
      }
      if (opts.beforeCommit) {
        try {
          await opts.beforeCommit();
        } catch (e) {
          await rm(partial, { recursive: true, force: true });
          throw e;
        }
      }
    });
    // Test hook: the n-th commit of this process (a command writing two outputs dies between them).
    if (killPoint('after-commit', ++commits)) process.kill(process.pid, 'SIGKILL');
  } finally {
    untrackActive(me);
    await lock.release();
  }
  return 'written';
}

/** Creates (or, after a kill during creation, reuses) the partial directory and records the plan in it. */
async function startPartial(partial: string, progressPath: string, planHash: string, create: boolean): Promise<Progress> {
  if (create) await mkdir(partial);
  if (killPoint('after-mkdir', 1)) process.kill(process.pid, 'SIGKILL');
  const progress: Progress = { planHash, files: {} };
  await writeJsonAtomic(progressPath, progress);
  await fsyncPath(dirname(partial));
  return progress;
}

/**
 * True if the partial directory holds nothing, or only the temporary of its progress record: what a
 * run killed between `mkdir` and the first progress write leaves. Anything else may be someone's data.
 */
async function onlyInitRemnants(partial: string, progressPath: string): Promise<boolean> {
  const st = await lstat(partial);
  if (!st.isDirectory()) return false;
  const names = await readdir(partial);
  return names.every((n) => n === `${basename(progressPath)}.tmp`);
}

async function writeLocked(
  s: string,
  o: string,
  partial: string,
  kind: 'dir' | 'file',
  files: readonly OutputFile[],
  sideCopies: ReadonlyArray<{ from: string; to: string }>,
  opts: WriteOutputOptions,
  me: ActiveOutput,
  beforeCommit: () => Promise<void>,
): Promise<void> {
  const ex = new Executor({ maxMemory: opts.maxMemory ?? DEFAULT_MAX_MEMORY, onProgress: opts.onProgress, signal: opts.signal });
  ex.setTotal(files.reduce((n, f) => n + f.size, 0));

  if (kind === 'file') {
    try {
      await ex.writeFile(partial, files[0]!, { replace: true });
    } catch (e) {
      // A single file cannot be resumed: leave nothing behind.
      await rm(partial, { force: true });
      throw e;
    }
    me.filesDone = 1;
    ex.finishing();
    await beforeCommit();
    if (killPoint('before-commit', 1)) process.kill(process.pid, 'SIGKILL');
    await commitOutput({ path: o, temp: partial, kind });
    return;
  }

  const hash = planHash(files, sideCopies.map((c) => c.to));
  const progressPath = join(partial, PROGRESS_NAME);
  let progress: Progress;
  if (await exists(partial)) {
    const foreign = await foreignDir(partial);
    if (foreign) throw usage(`${partial} is not this user's partial output (${foreign}); remove it to start over`);
    const prev = await readProgress(progressPath);
    if (!prev && (await lstat(join(partial, MANIFEST_NAME)).then(() => true, () => false))) {
      // Finished and killed before its rename: committed only once it checks out in full.
      const why = await notFinishedOutput(partial, hash, files, sideCopies, opts.manifest);
      if (why) throw usage(`${partial} holds a finished conversion that is not this run's (${why}); remove it to start over`);
      await beforeCommit();
      await commitOutput({ path: o, temp: partial, kind });
      return;
    }
    if (!prev && (await onlyInitRemnants(partial, progressPath))) {
      // Killed between creating the directory and recording the plan: nothing of value is in it.
      progress = await startPartial(partial, progressPath, hash, false);
    } else if (!prev) {
      throw usage(`${partial} exists but is not a shardshift partial output; remove it to start over`);
    } else if (prev.planHash !== hash) {
      throw usage(`${partial} holds an interrupted conversion with a different plan (plan ${prev.planHash.slice(0, 12)}, this one ${hash.slice(0, 12)}); remove it to start over, or re-run the original command to resume`);
    } else {
      progress = prev;
    }
  } else {
    progress = await startPartial(partial, progressPath, hash, true);
  }

  let written = 0;
  try {
    await writeFiles();
  } catch (e) {
    // Nothing finished: leave nothing behind. Otherwise keep the finished files for a resume.
    if (Object.keys(progress.files).length === 0) await rm(partial, { recursive: true, force: true });
    else if (e instanceof Error) e.message += ` (finished files are kept in ${partial}; re-run the same command to resume)`;
    throw e;
  }
  async function writeFiles(): Promise<void> {
    for (const [i, f] of files.entries()) {
      const path = join(partial, f.relPath);
      const done = progress.files[f.relPath];
      // A finished file is reused only if it still holds what was recorded: the same size is not
      // enough (a file altered in place at the same size was committed as if it were ours).
      if (done && (await lstat(path).then((st) => st.isFile() && st.size === done.size, () => false)) && (await sha256File(path)).sha256 === done.sha256) {
        ex.skipFile(f);
        me.filesDone++;
        continue;
      }
      if (killPoint('mid-file', i)) {
        // Leave a half-written file behind, as a crash would.
        await mkdir(dirname(path), { recursive: true });
        const fh = await createExclusive(path, { replace: true });
        const first = f.parts[0];
        if (first instanceof Uint8Array) await fh.write(first);
        await fh.close();
        process.kill(process.pid, 'SIGKILL');
      }
      const sha256 = await ex.writeFile(path, f, { replace: true });
      progress.files[f.relPath] = { size: f.size, sha256 };
      await writeJsonAtomic(progressPath, progress);
      me.filesDone++;
      written++;
      if (killPoint('after-files', written)) process.kill(process.pid, 'SIGKILL');
    }
    await copySideFiles(sideCopies, partial);
  }
  ex.finishing();
  const records: Record<string, FileRecord> = {};
  for (const f of files) records[f.relPath] = progress.files[f.relPath]!;
  await writeManifest(partial, s, hash, records, sideCopies, opts.manifest, opts.hashSource);
  await rm(progressPath, { force: true });
  if (killPoint('before-commit', 1)) process.kill(process.pid, 'SIGKILL');
  await beforeCommit();
  await commitOutput({ path: o, temp: partial, kind });
}
