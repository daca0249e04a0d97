/**
 * The Hugging Face hub cache, laid out as `huggingface_hub` lays it out, so that files a user
 * already downloaded with Python tools are read in place and files shardshift downloads are
 * reused by them:
 *
 *     $HF_HUB_CACHE/models--org--name/
 *       refs/<branch or tag>          the commit it pointed to when last fetched
 *       blobs/<sha256 or git blob id> the bytes (`<id>.incomplete` while downloading)
 *       snapshots/<commit>/<path>     relative symlinks into blobs/
 *
 * The root is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
 * `~/.cache/huggingface/hub` (huggingface_hub's constants.py; `HUGGINGFACE_HUB_CACHE` is its older
 * name). Reading follows the snapshot links — that is the layout; every file shardshift writes here
 * is created exclusively (a blob, a ref) or as a new link, never through an existing one.
 */
import { mkdir, readlink, rename, stat, symlink } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { createExclusive } from '../io/create.js';
import { readTextFile } from '../io/file.js';

export function hubCacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  if (env.HUGGINGFACE_HUB_CACHE) return env.HUGGINGFACE_HUB_CACHE;
  if (env.HF_HOME) return join(env.HF_HOME, 'hub');
  return join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'huggingface', 'hub');
}

/** One model's folder in the cache. */
export class CachedRepo {
  readonly dir: string;
  constructor(
    readonly root: string,
    readonly id: string,
  ) {
    this.dir = join(root, `models--${id.split('/').join('--')}`);
  }

  snapshot(commit: string): string {
    return join(this.dir, 'snapshots', commit);
  }

  blob(identityHex: string): string {
    return join(this.dir, 'blobs', identityHex);
  }

  /** The commit a branch or tag pointed to when it was last fetched (a commit id is itself). */
  async commitOf(revision: string): Promise<string | undefined> {
    if (/^[0-9a-f]{40}$/.test(revision)) return revision;
    const ref = await readTextFile(join(this.dir, 'refs', revision), 4096).catch(() => undefined);
    const sha = ref?.trim();
    return sha && /^[0-9a-f]{40}$/.test(sha) ? sha : undefined;
  }

  /** `path` of `commit` if the cache holds it (its link resolves to a regular file of `size` bytes). */
  async file(commit: string, path: string, size?: number): Promise<string | undefined> {
    const p = join(this.snapshot(commit), path);
    const st = await stat(p).catch(() => undefined);
    return st?.isFile() && (size === undefined || st.size === size) ? p : undefined;
  }

  /** Links `snapshots/<commit>/<path>` to `blobs/<hex>` (relatively, as huggingface_hub does). */
  async link(commit: string, path: string, identityHex: string): Promise<string> {
    const p = join(this.snapshot(commit), path);
    await mkdir(dirname(p), { recursive: true });
    const target = relative(dirname(p), this.blob(identityHex));
    const existing = await readlink(p).catch(() => undefined);
    if (existing === target) return p;
    if (existing !== undefined) throw new Error(`${p} links to ${existing}, not to the blob ${identityHex}`);
    await symlink(target, p);
    return p;
  }

  /** Records that `revision` (a branch or tag) is at `commit`. */
  async writeRef(revision: string, commit: string): Promise<void> {
    if (revision === commit) return;
    const p = join(this.dir, 'refs', revision);
    if ((await this.commitOf(revision)) === commit) return;
    await mkdir(dirname(p), { recursive: true });
    const tmp = `${p}.${process.pid}.tmp`;
    const fh = await createExclusive(tmp, { replace: true });
    try {
      await fh.writeFile(commit);
    } finally {
      await fh.close();
    }
    await rename(tmp, p);
  }
}
