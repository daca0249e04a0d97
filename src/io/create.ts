/**
 * Creating output files: always a fresh inode, never through a link. A path shardshift writes
 * (an output, its `.partial`, progress and manifest files, hub downloads) may have been planted
 * by someone else sharing the scratch directory — a symlink to the source checkpoint, or a hard
 * link to it. Opening such a path with truncation would follow the link and destroy whatever it
 * points at. So a leftover is unlinked first (which removes the link itself, never its target)
 * and the file is created with O_CREAT | O_EXCL | O_NOFOLLOW: if anything reappears at the path
 * in between, the open fails instead of writing through it.
 */
import { constants } from 'node:fs';
import { copyFile as fsCopyFile, lstat, open, unlink, type FileHandle } from 'node:fs/promises';
import { usage } from '../util/errors.js';

const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW } = constants;

export interface CreateOptions {
  /** Remove a leftover at the path first (an interrupted run's file, or a planted link). */
  readonly replace?: boolean;
  /** Extra open flags (O_DIRECT). */
  readonly flags?: number;
}

/** Creates `path` exclusively for writing (mode 0644), never through a link. */
export async function createExclusive(path: string, opts: CreateOptions = {}): Promise<FileHandle> {
  if (opts.replace) await unlinkIfPresent(path);
  try {
    return await open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | (opts.flags ?? 0), 0o644);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' || code === 'ELOOP') throw usage(`${path} already exists${(await isLink(path)) ? ' as a symbolic link' : ''}; shardshift creates its files fresh and never writes through an existing path — remove it and re-run`);
    throw e;
  }
}

/** Copies `from` into a freshly created `to` (never through a link at `to`). */
export async function copyExclusive(from: string, to: string): Promise<void> {
  await unlinkIfPresent(to);
  // COPYFILE_EXCL: fails if `to` exists (a link planted after the unlink included).
  await fsCopyFile(from, to, constants.COPYFILE_EXCL);
}

/** Removes `p` itself (a link, never its target); nothing there is fine. */
async function unlinkIfPresent(p: string): Promise<void> {
  await unlink(p).catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? undefined : Promise.reject(e)));
}

async function isLink(p: string): Promise<boolean> {
  return lstat(p).then(
    (st) => st.isSymbolicLink(),
    () => false,
  );
}

/**
 * Opens an existing file of ours to continue writing it (an interrupted download's partial): a
 * regular file with one link only, opened without following a link at `path` and without
 * creating anything. A planted symlink or a hard link to another file is refused.
 */
export async function openForResume(path: string): Promise<FileHandle> {
  const fh = await open(path, constants.O_WRONLY | O_NOFOLLOW);
  const st = await fh.stat();
  if (!st.isFile() || st.nlink !== 1) {
    await fh.close();
    throw usage(`${path} is ${st.isFile() ? 'hard-linked elsewhere' : 'not a regular file'}; shardshift never writes through such a path — remove it and re-run`);
  }
  return fh;
}
