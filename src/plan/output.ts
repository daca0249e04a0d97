/**
 * Atomic output: everything is written into a temporary path beside the destination, fsynced,
 * and renamed into place only when complete, so an interrupted run never leaves something that
 * looks done. The destination must not exist (unless overwriting), and may be neither the source,
 * inside it, nor contain it.
 */
import { mkdir, open, realpath, rename, rm, stat, copyFile } from 'node:fs/promises';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { randomBytes } from 'node:crypto';
import { usage } from '../errors.js';
import type { OutputFile } from '../formats/types.js';
import { Executor, DEFAULT_MAX_MEMORY, type ProgressEvent } from './executor.js';

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

/** The absolute, symlink-resolved form of a path that may not exist yet. */
async function canonical(p: string): Promise<string> {
  const abs = resolve(p);
  try {
    return await realpath(abs);
  } catch {
    return join(await canonical(dirname(abs)), basename(abs));
  }
}

function within(child: string, parent: string): boolean {
  return child === parent || child.startsWith(parent.endsWith(sep) ? parent : parent + sep);
}

export interface OutputTarget {
  /** Final path. */
  readonly path: string;
  /** Where to write before the rename. */
  readonly temp: string;
  readonly kind: 'dir' | 'file';
}

/** Checks the rules and picks a temporary path beside `out`. */
export async function prepareOutput(src: string, out: string, opts: { overwrite: boolean; kind: 'dir' | 'file' }): Promise<OutputTarget> {
  const s = await canonical(src);
  const o = await canonical(out);
  if (within(o, s)) throw usage(`output ${out} is ${o === s ? 'the source itself' : 'inside the source'} (${src}); choose a path outside it`);
  if (within(s, o)) throw usage(`output ${out} contains the source ${src}; choose another path`);
  if (await exists(o)) {
    if (!opts.overwrite) throw usage(`output ${out} already exists; remove it or pass --overwrite`);
  }
  const parent = dirname(o);
  if (!(await exists(parent))) await mkdir(parent, { recursive: true });
  const temp = join(parent, `.${basename(o)}.partial-${randomBytes(4).toString('hex')}`);
  if (opts.kind === 'dir') await mkdir(temp);
  return { path: o, temp, kind: opts.kind };
}

async function fsyncPath(p: string): Promise<void> {
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

/** Removes a temp output after a failure. */
export async function abandonOutput(t: OutputTarget): Promise<void> {
  await rm(t.temp, { recursive: true, force: true });
}

/** Copies side files (config.json, tokenizer ...) into the output, fsyncing each. */
export async function copySideFiles(copies: ReadonlyArray<{ from: string; to: string }>, toDir: string): Promise<void> {
  for (const c of copies) {
    const dst = join(toDir, c.to);
    if (await exists(dst)) continue;
    await mkdir(dirname(dst), { recursive: true });
    await copyFile(c.from, dst);
    await fsyncPath(dst);
  }
}

export interface WriteOutputOptions {
  overwrite?: boolean;
  maxMemory?: number;
  onProgress?: (e: ProgressEvent) => void;
}

/**
 * Runs a complete plan into `out`: checks the destination, streams every file through the
 * bounded-memory executor into a temporary path, copies side files, fsyncs, renames into place.
 */
export async function writeOutput(
  src: string,
  out: string,
  kind: 'dir' | 'file',
  files: readonly OutputFile[],
  sideCopies: ReadonlyArray<{ from: string; to: string }>,
  opts: WriteOutputOptions,
): Promise<void> {
  const target = await prepareOutput(src, out, { overwrite: opts.overwrite ?? false, kind });
  try {
    const ex = new Executor({ maxMemory: opts.maxMemory ?? DEFAULT_MAX_MEMORY, onProgress: opts.onProgress });
    if (kind === 'file') {
      await ex.writeFile(target.temp, files[0]!);
    } else {
      await ex.writeAll(target.temp, files);
      await copySideFiles(sideCopies, target.temp);
    }
    await commitOutput(target);
  } catch (e) {
    await abandonOutput(target);
    throw e;
  }
}
