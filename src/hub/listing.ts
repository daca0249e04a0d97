/**
 * What a hub revision holds: its commit and every file with the identity the hub gives it — the
 * LFS sha256 for large files, the git blob id (sha1 of `blob <size>\0<bytes>`) for the rest — so
 * that each download can be checked against it before use. Listing goes through the Hugging Face
 * JS client (`modelInfo` for the commit, `listFiles` for the tree, which follows the API's
 * pagination).
 */
import { listFiles, modelInfo } from '@huggingface/hub';
import { hubFailure, type HubRepo } from './repo.js';

export interface RemoteFile {
  readonly path: string;
  readonly size: number;
  /** The hub's identity of the bytes: `sha256` of an LFS file, else its git blob id. */
  readonly identity: { readonly kind: 'sha256' | 'git-sha1'; readonly hex: string };
}

export interface RepoListing {
  readonly repo: HubRepo;
  /** The commit the revision resolved to; every download names it, so a push in between changes nothing. */
  readonly commit: string;
  readonly files: readonly RemoteFile[];
}

/** Paths the hub may list that a local directory must never take: absolute, `..`, backslashes. */
function safePath(p: string): boolean {
  return !!p && !p.startsWith('/') && !p.includes('\\') && !p.split('/').some((s) => s === '..' || s === '.' || s === '');
}

export async function listRepo(repo: HubRepo): Promise<RepoListing> {
  const creds = { hubUrl: repo.endpoint, accessToken: repo.token };
  let commit: string;
  try {
    const info = await modelInfo({ ...creds, name: repo.id, revision: repo.revision, additionalFields: ['sha'] });
    const sha = (info as { sha?: unknown }).sha;
    if (typeof sha !== 'string' || !/^[0-9a-f]{40}$/.test(sha)) throw new Error(`the hub gave no commit for revision ${repo.revision}`);
    commit = sha;
  } catch (e) {
    throw hubFailure(e, repo, 'looking up');
  }
  const files: RemoteFile[] = [];
  try {
    for await (const f of listFiles({ ...creds, repo: { type: 'model', name: repo.id }, revision: commit, recursive: true })) {
      if (f.type !== 'file' || !safePath(f.path)) continue;
      const hex = f.lfs?.oid ?? f.oid;
      // A file the hub gives no identity for could not be checked after download: refused by name.
      if (!hex) throw new Error(`the hub lists ${f.path} without a sha256 or git blob id`);
      const identity = { kind: f.lfs ? ('sha256' as const) : ('git-sha1' as const), hex };
      files.push({ path: f.path, size: f.lfs?.size ?? f.size, identity });
    }
  } catch (e) {
    throw hubFailure(e, repo, 'listing the files of');
  }
  return { repo, commit, files };
}
