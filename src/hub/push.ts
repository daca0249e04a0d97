/**
 * A finished output directory to a hub repository as one commit (`--push-to-hub org/name[@branch]`).
 *
 * Through the JS client: `createRepo` / `createBranch` when asked (`--create-repo`), `listFiles`
 * for what the branch already holds, and `commit` for the upload — its preupload call lets the
 * hub pick LFS or regular storage per file, its LFS batch call skips objects the hub already
 * stores, and the commit is one NDJSON request. What is decided here: only files whose bytes
 * differ from the branch's (sha256 against LFS entries, git blob id against the rest) are in the
 * commit, so a second push of the same output uploads nothing and makes no commit.
 */
import { commit as hubCommit, createBranch, createRepo, listFiles, modelInfo } from '@huggingface/hub';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { badInput, usage } from '../util/errors.js';
import { hubFailure, hubRepo, shown, type HubRepo } from './repo.js';

export interface PushOptions {
  readonly env?: NodeJS.ProcessEnv;
  /** Create the repository (and the branch) when missing. */
  readonly createRepo?: boolean;
  readonly private?: boolean;
  readonly message?: string;
  readonly log?: (msg: string) => void;
  readonly signal?: AbortSignal;
  /** SHA-256 per relative path the output's manifest records: a file that differs is not pushed. */
  readonly expected?: ReadonlyMap<string, string>;
}

export interface PushResult {
  readonly repo: string;
  readonly branch: string;
  /** The commit the branch is at after the push (the new one, or the unchanged head). */
  readonly commit: string;
  readonly commitUrl: string;
  readonly uploaded: readonly string[];
  /** Files the branch already had with the same bytes. */
  readonly unchanged: number;
  readonly bytesUploaded: number;
}

async function walk(dir: string, rel = ''): Promise<Array<{ rel: string; size: number }>> {
  const out: Array<{ rel: string; size: number }> = [];
  for (const e of (await readdir(join(dir, rel), { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...(await walk(dir, r)));
    else if (e.isFile()) out.push({ rel: r, size: (await lstat(join(dir, r))).size });
    else throw usage(`${join(dir, r)} is not a regular file or directory; an output to push holds only files`);
  }
  return out;
}

/** SHA-256 and git blob id of a file, in one read. */
async function identities(p: string, size: number): Promise<{ sha256: string; gitSha1: string }> {
  const a = createHash('sha256');
  const b = createHash('sha1').update(`blob ${size}\0`);
  for await (const c of createReadStream(p, { highWaterMark: 8 << 20 })) {
    a.update(c as Buffer);
    b.update(c as Buffer);
  }
  return { sha256: a.digest('hex'), gitSha1: b.digest('hex') };
}

function isStatus(e: unknown, code: number): boolean {
  return (e as { statusCode?: number })?.statusCode === code;
}

async function ensureTarget(r: HubRepo, opts: PushOptions): Promise<void> {
  const creds = { hubUrl: r.endpoint, accessToken: r.token };
  if (!r.token) throw usage(`--push-to-hub ${shown(r)}: set HF_TOKEN to a token with write access`);
  const exists = await modelInfo({ ...creds, name: r.id }).then(
    () => true,
    (e) => (isStatus(e, 404) || isStatus(e, 401) ? false : Promise.reject(hubFailure(e, r, 'looking up'))),
  );
  if (!exists) {
    if (!opts.createRepo) throw usage(`--push-to-hub ${shown(r)}: no such repository (or no access to it); pass --create-repo to create it`);
    await createRepo({ ...creds, accessToken: r.token, repo: { type: 'model', name: r.id }, private: opts.private }).catch((e) => {
      if (!isStatus(e, 409)) throw hubFailure(e, r, 'creating');
    });
    opts.log?.(`created ${r.endpoint}/${r.id}${opts.private ? ' (private)' : ''}`);
  }
  if (r.revision === 'main') return;
  const branchThere = await modelInfo({ ...creds, name: r.id, revision: r.revision }).then(
    () => true,
    (e) => (isStatus(e, 404) ? false : Promise.reject(hubFailure(e, r, 'looking up'))),
  );
  if (branchThere) return;
  if (!opts.createRepo) throw usage(`--push-to-hub ${shown(r)}: the repository has no branch ${r.revision}; pass --create-repo to create it`);
  await createBranch({ ...creds, repo: { type: 'model', name: r.id }, branch: r.revision }).catch((e) => {
    if (!isStatus(e, 409)) throw hubFailure(e, r, 'creating the branch of');
  });
  opts.log?.(`created branch ${r.revision} of ${r.id}`);
}

async function headOf(r: HubRepo): Promise<string> {
  const info = await modelInfo({ hubUrl: r.endpoint, accessToken: r.token, name: r.id, revision: r.revision, additionalFields: ['sha'] }).catch((e) => {
    throw hubFailure(e, r, 'looking up');
  });
  return String((info as { sha?: unknown }).sha ?? '');
}

/** Pushes every file under `dir` (a finished output) to `target` (`org/name[@branch]`). */
export async function pushToHub(dir: string, target: string, opts: PushOptions = {}): Promise<PushResult> {
  const r = hubRepo(target, opts.env ?? process.env);
  await ensureTarget(r, opts);
  const creds = { hubUrl: r.endpoint, accessToken: r.token };
  const remote = new Map<string, { sha256?: string; gitSha1: string; size: number }>();
  try {
    for await (const f of listFiles({ ...creds, repo: { type: 'model', name: r.id }, revision: r.revision, recursive: true })) {
      if (f.type === 'file') remote.set(f.path, { sha256: f.lfs?.oid, gitSha1: f.oid ?? '', size: f.lfs?.size ?? f.size });
    }
  } catch (e) {
    throw hubFailure(e, r, 'listing the files of');
  }
  const local = await walk(dir);
  const changed: Array<{ rel: string; size: number }> = [];
  for (const f of local) {
    const id = await identities(join(dir, f.rel), f.size);
    const want = opts.expected?.get(f.rel);
    if (want !== undefined && want !== id.sha256) throw badInput(`${join(dir, f.rel)}: its SHA-256 is not the one the output's manifest records; nothing was pushed (re-run the conversion)`, join(dir, f.rel));
    const have = remote.get(f.rel);
    if (have && have.size === f.size && (have.sha256 ? have.sha256 === id.sha256 : have.gitSha1 === id.gitSha1)) continue;
    changed.push(f);
  }
  for (const rel of opts.expected?.keys() ?? []) if (!local.some((f) => f.rel === rel)) throw badInput(`${join(dir, rel)}: listed in the output's manifest but missing; nothing was pushed`, join(dir, rel));
  const commitUrl = (sha: string): string => `${r.endpoint}/${r.id}/commit/${sha}`;
  if (!changed.length) {
    const head = await headOf(r);
    return { repo: r.id, branch: r.revision, commit: head, commitUrl: commitUrl(head), uploaded: [], unchanged: local.length, bytesUploaded: 0 };
  }
  let out;
  try {
    out = await hubCommit({
      ...creds,
      accessToken: r.token,
      repo: { type: 'model', name: r.id },
      branch: r.revision,
      title: opts.message ?? `shardshift: ${changed.length} file${changed.length === 1 ? '' : 's'}`,
      operations: changed.map((f) => ({ operation: 'addOrUpdate' as const, path: f.rel, content: pathToFileURL(join(dir, f.rel)) })),
      // LFS basic/multipart transfer, which the hub still accepts: the client's Xet upload path
      // is left off because nothing here can test it (the loopback double speaks LFS only).
      useXet: false,
      abortSignal: opts.signal,
    });
  } catch (e) {
    throw hubFailure(e, r, 'pushing to');
  }
  const sha = out?.commit.oid ?? (await headOf(r));
  return {
    repo: r.id,
    branch: r.revision,
    commit: sha,
    commitUrl: out?.commit.url || commitUrl(sha),
    uploaded: changed.map((f) => f.rel),
    unchanged: local.length - changed.length,
    bytesUploaded: changed.reduce((n, f) => n + f.size, 0),
  };
}
