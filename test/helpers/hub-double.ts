/**
 * A local double of the Hugging Face hub on loopback, for tests and the bench: the subset of the
 * hub's HTTP API that shardshift's client (through @huggingface/hub and its own range downloads)
 * and huggingface_hub's snapshot_download use — and nothing else. A request outside that subset
 * answers 500 and is recorded in `violations`, which every test checks is empty.
 *
 * Served: model info by revision (`/api/models/{id}/revision/{rev}`), the tree listing with
 * pagination (`Link: …; rel="next"`), `resolve` (regular files directly with their git blob id as
 * ETag; LFS files by a 302 to an absolute "CDN" URL, with X-Linked-Etag / X-Linked-Size /
 * X-Repo-Commit as the hub sends them), Range on both, and the upload path: repo and branch
 * creation, preupload, the LFS batch API (basic transfer; objects it holds need no upload), the
 * LFS PUT and the NDJSON commit. Access: public repos to anyone, private and gated ones to listed
 * tokens, writes to writer tokens. Faults for tests: drop the connection mid-file, serve a
 * corrupted blob, refuse Range.
 */
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { copyFile, mkdir, readdir, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { join, relative } from 'node:path';
import type { AddressInfo } from 'node:net';

interface Entry {
  readonly path: string;
  readonly size: number;
  readonly gitSha1: string;
  /** Set for files stored in LFS. */
  readonly sha256?: string;
  /** Content-addressed file in the double's store. */
  readonly blob: string;
}

interface Repo {
  readonly id: string;
  private: boolean;
  gated: boolean;
  readonly branches: Map<string, string>;
  readonly commits: Map<string, Map<string, Entry>>;
}

export interface Token {
  /** Repos the token reads beyond public ones ('*' all). */
  readonly read: '*' | readonly string[];
  readonly write: '*' | readonly string[];
}

export interface RequestRecord {
  readonly method: string;
  readonly url: string;
  readonly status: number;
  readonly range?: string;
}

const LFS_NAME = /\.(safetensors|bin|pt|pth|distcp|h5|msgpack|onnx|gguf|ckpt|npz|model)$/;

function gitSha1(b: Uint8Array): string {
  return createHash('sha1').update(`blob ${b.length}\0`).update(b).digest('hex');
}

export class HubDouble {
  readonly requests: RequestRecord[] = [];
  readonly violations: string[] = [];
  /** Body bytes served per resolved file path (`org/name/path`). */
  readonly bytesServed = new Map<string, number>();
  readonly tokens = new Map<string, Token>();
  /** Items per tree page (small, so that pagination is exercised). */
  pageSize = 4;
  private readonly repos = new Map<string, Repo>();
  private readonly drops: Array<{ path: string; after: number; times: number; minStart: number }> = [];
  private readonly corrupted = new Set<string>();
  private ignoreRange = false;
  private server?: Server;
  endpoint = '';

  private constructor(readonly store: string) {}

  static async start(store: string): Promise<HubDouble> {
    const d = new HubDouble(store);
    await mkdir(join(store, 'blobs'), { recursive: true });
    d.server = createServer((req, res) => {
      d.handle(req, res).catch((e) => {
        d.violations.push(`${req.method} ${req.url}: handler failed: ${(e as Error).message}`);
        if (!res.headersSent) res.writeHead(500).end();
        else res.destroy();
      });
    });
    await new Promise<void>((r) => d.server!.listen(0, '127.0.0.1', r));
    d.endpoint = `http://127.0.0.1:${(d.server!.address() as AddressInfo).port}`;
    return d;
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((r) => this.server?.close(() => r()) ?? r());
  }

  /** Publishes every file under `dir` as the first commit of `id` on main. */
  async addRepo(id: string, dir: string, opts: { private?: boolean; gated?: boolean; branch?: string } = {}): Promise<string> {
    const files = new Map<string, Entry>();
    const walk = async (d: string): Promise<void> => {
      for (const e of await readdir(d, { withFileTypes: true })) {
        const p = join(d, e.name);
        if (e.isDirectory()) await walk(p);
        else if (e.isFile()) {
          const rel = relative(dir, p).split('\\').join('/');
          files.set(rel, await this.storeFile(rel, p));
        }
      }
    };
    await walk(dir);
    const repo = this.repos.get(id) ?? { id, private: !!opts.private, gated: !!opts.gated, branches: new Map(), commits: new Map() };
    this.repos.set(id, repo);
    return this.addCommit(repo, opts.branch ?? 'main', files);
  }

  /** The files of `id` at `rev` (tests compare pushed content). */
  files(id: string, rev = 'main'): ReadonlyMap<string, Entry> | undefined {
    const r = this.repos.get(id);
    const sha = r?.branches.get(rev) ?? rev;
    return r?.commits.get(sha);
  }

  commitsOf(id: string): number {
    return this.repos.get(id)?.commits.size ?? 0;
  }

  /** The next `times` downloads of `path` (`org/name/file`) starting at or past `minStart` stop after `after` body bytes. */
  dropAfter(path: string, after: number, times = 1, minStart = 0): void {
    this.drops.push({ path, after, times, minStart });
  }

  /** Serves `path`'s bytes with one byte flipped (its listing keeps the true sha256). */
  corrupt(path: string): void {
    this.corrupted.add(path);
  }

  clearFaults(): void {
    this.drops.length = 0;
    this.corrupted.clear();
    this.ignoreRange = false;
  }

  setIgnoreRange(on: boolean): void {
    this.ignoreRange = on;
  }

  /** `storeBlob` for a file on disk, streamed (bench models exceed what one Buffer holds). */
  private async storeFile(path: string, file: string): Promise<Entry> {
    const a = createHash('sha256');
    const st = await stat(file);
    const g = createHash('sha1').update(`blob ${st.size}\0`);
    let head: Buffer | undefined;
    for await (const c of createReadStream(file, { highWaterMark: 8 << 20 })) {
      a.update(c as Buffer);
      g.update(c as Buffer);
      head ??= (c as Buffer).subarray(0, 512);
    }
    const sha256 = a.digest('hex');
    const blob = join(this.store, 'blobs', sha256);
    if (!(await stat(blob).catch(() => undefined))) {
      await copyFile(file, `${blob}.tmp`);
      await rename(`${blob}.tmp`, blob);
    }
    const lfs = LFS_NAME.test(path) || st.size > 10 << 20 || (head ?? Buffer.alloc(0)).includes(0);
    return { path, size: st.size, gitSha1: g.digest('hex'), ...(lfs ? { sha256 } : {}), blob };
  }

  private async storeBlob(path: string, b: Uint8Array): Promise<Entry> {
    const sha256 = createHash('sha256').update(b).digest('hex');
    const blob = join(this.store, 'blobs', sha256);
    if (!(await stat(blob).catch(() => undefined))) {
      await writeFile(`${blob}.tmp`, b);
      await rename(`${blob}.tmp`, blob);
    }
    const lfs = LFS_NAME.test(path) || b.length > 10 << 20 || b.subarray(0, 512).includes(0);
    return { path, size: b.length, gitSha1: gitSha1(b), ...(lfs ? { sha256 } : {}), blob };
  }

  private addCommit(repo: Repo, branch: string, files: Map<string, Entry>): string {
    const parent = repo.branches.get(branch) ?? '';
    const sha = createHash('sha1')
      .update(JSON.stringify([parent, branch, [...files.values()].map((f) => [f.path, f.gitSha1]).sort()]))
      .update(String(repo.commits.size))
      .digest('hex');
    repo.commits.set(sha, files);
    repo.branches.set(branch, sha);
    return sha;
  }

  private token(req: IncomingMessage): Token | undefined {
    const a = req.headers.authorization;
    const m = a ? /^Bearer (.+)$/.exec(a) : null;
    return m ? this.tokens.get(m[1]!) : undefined;
  }

  private canRead(req: IncomingMessage, repo: Repo): boolean {
    if (!repo.private && !repo.gated) return true;
    const t = this.token(req);
    return !!t && (t.read === '*' || t.read.includes(repo.id));
  }

  private canWrite(req: IncomingMessage, id: string): boolean {
    const t = this.token(req);
    return !!t && (t.write === '*' || t.write.includes(id));
  }

  private json(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    res.writeHead(status, { 'content-type': 'application/json', ...headers }).end(JSON.stringify(body));
  }

  /** The repo a read request names, or an error answered as the hub answers it. */
  private readable(req: IncomingMessage, res: ServerResponse, id: string): Repo | undefined {
    const repo = this.repos.get(id);
    if (!repo || (repo.private && !this.canRead(req, repo))) {
      this.json(res, this.token(req) ? 404 : 401, { error: 'Repository not found' }, { 'x-error-code': 'RepositoryNotFound' });
      return undefined;
    }
    if (!this.canRead(req, repo)) {
      this.json(res, 403, { error: `Access to model ${id} is restricted and you are not in the authorized list. Visit ${this.endpoint}/${id} to ask for access.` }, { 'x-error-code': 'GatedRepo' });
      return undefined;
    }
    return repo;
  }

  private commitOf(res: ServerResponse, repo: Repo, rev: string): string | undefined {
    const r = rev === 'HEAD' ? 'main' : rev;
    const sha = repo.branches.get(r) ?? (repo.commits.has(r) ? r : undefined);
    if (!sha) this.json(res, 404, { error: `Invalid rev id: ${rev}` }, { 'x-error-code': 'RevisionNotFound' });
    return sha;
  }

  private async body(req: IncomingMessage): Promise<Buffer> {
    const parts: Buffer[] = [];
    for await (const c of req) parts.push(c as Buffer);
    return Buffer.concat(parts);
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', this.endpoint);
    const path = url.pathname.split('/').map(decodeURIComponent);
    const method = req.method ?? 'GET';
    res.on('finish', () => this.requests.push({ method, url: req.url ?? '', status: res.statusCode, range: req.headers.range }));
    res.on('close', () => {
      if (!res.writableFinished) this.requests.push({ method, url: req.url ?? '', status: -1, range: req.headers.range });
    });
    const p = url.pathname;
    let m: RegExpExecArray | null;
    if (method === 'GET' && (m = /^\/api\/models\/([^/]+\/[^/]+)\/revision\/([^/]+)$/.exec(p))) {
      const repo = this.readable(req, res, decodeURIComponent(m[1]!));
      const sha = repo && this.commitOf(res, repo, decodeURIComponent(m[2]!));
      if (!repo || !sha) return;
      const files = repo.commits.get(sha)!;
      this.json(res, 200, { _id: repo.id, id: repo.id, modelId: repo.id, sha, private: repo.private, gated: repo.gated ? 'manual' : false, disabled: false, downloads: 0, likes: 0, lastModified: '2026-12-01T00:00:00.000Z', tags: [], siblings: [...files.keys()].sort().map((rfilename) => ({ rfilename })) });
      return;
    }
    if (method === 'GET' && (m = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)(\/.*)?$/.exec(p))) {
      const repo = this.readable(req, res, decodeURIComponent(m[1]!));
      const sha = repo && this.commitOf(res, repo, decodeURIComponent(m[2]!));
      if (!repo || !sha) return;
      const under = m[3] ? decodeURIComponent(m[3].slice(1)) : '';
      const recursive = url.searchParams.get('recursive') === 'true';
      const entries: Array<Record<string, unknown>> = [];
      const dirs = new Set<string>();
      for (const f of [...repo.commits.get(sha)!.values()].sort((a, b) => a.path.localeCompare(b.path))) {
        if (under && !f.path.startsWith(`${under}/`)) continue;
        const rest = under ? f.path.slice(under.length + 1) : f.path;
        if (!recursive && rest.includes('/')) {
          const d = (under ? `${under}/` : '') + rest.split('/')[0]!;
          if (!dirs.has(d)) entries.push({ type: 'directory', oid: '0'.repeat(40), size: 0, path: d });
          dirs.add(d);
          continue;
        }
        entries.push({ type: 'file', oid: f.gitSha1, size: f.sha256 ? 134 : f.size, path: f.path, ...(f.sha256 ? { lfs: { oid: f.sha256, size: f.size, pointerSize: 134 } } : {}) });
      }
      const cursor = Number(url.searchParams.get('cursor') ?? '0');
      const page = entries.slice(cursor, cursor + this.pageSize);
      const headers: Record<string, string> = {};
      if (cursor + this.pageSize < entries.length) {
        const next = new URL(url);
        next.searchParams.set('cursor', String(cursor + this.pageSize));
        headers.link = `<${next.href}>; rel="next"`;
      }
      this.json(res, 200, page, headers);
      return;
    }
    if ((method === 'GET' || method === 'HEAD') && (m = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(p))) {
      const id = decodeURIComponent(m[1]!);
      const repo = this.readable(req, res, id);
      const sha = repo && this.commitOf(res, repo, decodeURIComponent(m[2]!));
      if (!repo || !sha) return;
      const rel = path.slice(5).join('/');
      const f = repo.commits.get(sha)!.get(rel);
      if (!f) {
        this.json(res, 404, { error: 'Entry not found' }, { 'x-error-code': 'EntryNotFound' });
        return;
      }
      const common = { 'x-repo-commit': sha, etag: `"${f.sha256 ?? f.gitSha1}"`, 'accept-ranges': 'bytes' };
      if (f.sha256) {
        res.writeHead(302, { ...common, location: `${this.endpoint}/cdn/${f.sha256}?path=${encodeURIComponent(`${id}/${rel}`)}&commit=${sha}`, 'x-linked-etag': `"${f.sha256}"`, 'x-linked-size': String(f.size), 'content-length': '0' }).end();
        return;
      }
      await this.serveBytes(req, res, f, `${id}/${rel}`, common);
      return;
    }
    if ((method === 'GET' || method === 'HEAD') && (m = /^\/cdn\/([0-9a-f]{64})$/.exec(p))) {
      const blob = join(this.store, 'blobs', m[1]!);
      const st = await stat(blob).catch(() => undefined);
      if (!st) {
        res.writeHead(404).end();
        return;
      }
      // huggingface_hub 2.x follows the redirect of its metadata HEAD and reads the hub headers
      // from the final answer, so the "CDN" repeats them (the real one sits behind the hub's proxy).
      const hubHeaders = { 'x-repo-commit': url.searchParams.get('commit') ?? '', 'x-linked-etag': `"${m[1]}"`, 'x-linked-size': String(st.size) };
      await this.serveBytes(req, res, { path: '', size: st.size, gitSha1: '', sha256: m[1]!, blob }, url.searchParams.get('path') ?? m[1]!, { etag: `"${m[1]}"`, 'accept-ranges': 'bytes', ...hubHeaders });
      return;
    }
    if (method === 'POST' && p === '/api/repos/create') {
      const b = JSON.parse((await this.body(req)).toString()) as { name: string; organization?: string; private?: boolean; visibility?: string; type?: string };
      const id = `${b.organization}/${b.name}`;
      if (!this.canWrite(req, id)) return this.json(res, 403, { error: `You don't have the rights to create a model under the namespace "${b.organization}"` });
      if (this.repos.has(id)) return this.json(res, 409, { error: 'You already created this model repo', url: `${this.endpoint}/${id}` });
      const repo: Repo = { id, private: b.private === true || b.visibility === 'private', gated: false, branches: new Map(), commits: new Map() };
      this.repos.set(id, repo);
      this.addCommit(repo, 'main', new Map());
      return this.json(res, 200, { url: `${this.endpoint}/${id}`, name: id, id });
    }
    if (method === 'POST' && (m = /^\/api\/models\/([^/]+\/[^/]+)\/branch\/([^/]+)$/.exec(p))) {
      const id = decodeURIComponent(m[1]!);
      const repo = this.repos.get(id);
      if (!repo || !this.canWrite(req, id)) return this.json(res, 403, { error: 'forbidden' });
      const branch = decodeURIComponent(m[2]!);
      if (repo.branches.has(branch)) return this.json(res, 409, { error: `Reference already exists: refs/heads/${branch}` });
      const b = JSON.parse((await this.body(req)).toString() || '{}') as { startingPoint?: string };
      const from = b.startingPoint ? (repo.branches.get(b.startingPoint) ?? b.startingPoint) : repo.branches.get('main')!;
      repo.branches.set(branch, from);
      return this.json(res, 200, {});
    }
    if (method === 'POST' && (m = /^\/api\/models\/([^/]+\/[^/]+)\/preupload\/([^/]+)$/.exec(p))) {
      const id = decodeURIComponent(m[1]!);
      if (!this.repos.has(id) || !this.canWrite(req, id)) return this.json(res, 403, { error: 'forbidden' });
      const b = JSON.parse((await this.body(req)).toString()) as { files: Array<{ path: string; size: number; sample: string }> };
      return this.json(res, 200, {
        files: b.files.map((f) => ({ path: f.path, uploadMode: LFS_NAME.test(f.path) || f.size > 10 << 20 || Buffer.from(f.sample, 'base64').includes(0) ? 'lfs' : 'regular', shouldIgnore: false })),
      });
    }
    if (method === 'POST' && (m = /^\/([^/]+\/[^/]+)\.git\/info\/lfs\/objects\/batch$/.exec(p))) {
      const id = decodeURIComponent(m[1]!);
      if (!this.repos.has(id) || !this.canWrite(req, id)) return this.json(res, 403, { message: 'forbidden' });
      const b = JSON.parse((await this.body(req)).toString()) as { operation: string; transfers: string[]; objects: Array<{ oid: string; size: number }> };
      if (b.operation !== 'upload' || !b.transfers.includes('basic')) {
        this.violations.push(`LFS batch: operation ${b.operation}, transfers ${b.transfers.join(',')}`);
        return this.json(res, 500, { message: 'outside the double' });
      }
      const objects = await Promise.all(
        b.objects.map(async (o) => {
          const have = await stat(join(this.store, 'blobs', o.oid)).then((s) => s.size === o.size, () => false);
          return have ? { oid: o.oid, size: o.size } : { oid: o.oid, size: o.size, authenticated: true, actions: { upload: { href: `${this.endpoint}/lfs-upload/${o.oid}?size=${o.size}` } } };
        }),
      );
      res.writeHead(200, { 'content-type': 'application/vnd.git-lfs+json' }).end(JSON.stringify({ transfer: 'basic', objects }));
      return;
    }
    if (method === 'PUT' && (m = /^\/lfs-upload\/([0-9a-f]{64})$/.exec(p))) {
      const b = await this.body(req);
      const sha = createHash('sha256').update(b).digest('hex');
      if (sha !== m[1] || String(b.length) !== url.searchParams.get('size')) return this.json(res, 400, { message: `uploaded bytes hash to ${sha}` });
      const blob = join(this.store, 'blobs', sha);
      await writeFile(`${blob}.tmp`, b);
      await rename(`${blob}.tmp`, blob);
      res.writeHead(200).end();
      return;
    }
    if (method === 'POST' && (m = /^\/api\/models\/([^/]+\/[^/]+)\/commit\/([^/]+)$/.exec(p))) {
      const id = decodeURIComponent(m[1]!);
      const repo = this.repos.get(id);
      if (!repo || !this.canWrite(req, id)) return this.json(res, 403, { error: 'forbidden' });
      const branch = decodeURIComponent(m[2]!);
      const head = repo.branches.get(branch);
      if (!head) return this.json(res, 404, { error: `Invalid rev id: ${branch}` }, { 'x-error-code': 'RevisionNotFound' });
      const files = new Map(repo.commits.get(head)!);
      for (const line of (await this.body(req)).toString().split('\n').filter(Boolean)) {
        const { key, value } = JSON.parse(line) as { key: string; value: Record<string, string | number> };
        if (key === 'header') continue;
        if (key === 'file') files.set(String(value.path), await this.storeBlob(String(value.path), Buffer.from(String(value.content), value.encoding === 'base64' ? 'base64' : 'utf8')));
        else if (key === 'lfsFile') {
          const blob = join(this.store, 'blobs', String(value.oid));
          const b = await readFile(blob).catch(() => undefined);
          if (!b || b.length !== Number(value.size)) return this.json(res, 422, { error: `LFS object ${value.oid} was not uploaded` });
          files.set(String(value.path), { path: String(value.path), size: b.length, gitSha1: gitSha1(b), sha256: String(value.oid), blob });
        } else if (key === 'deletedFile') files.delete(String(value.path));
        else {
          this.violations.push(`commit: operation ${key}`);
          return this.json(res, 500, { error: 'outside the double' });
        }
      }
      const sha = this.addCommit(repo, branch, files);
      return this.json(res, 200, { success: true, commitOid: sha, commitUrl: `${this.endpoint}/${id}/commit/${sha}`, hookOutput: '' });
    }
    this.violations.push(`${method} ${req.url}`);
    res.writeHead(500, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'this request is outside the hub double' }));
  }

  private async serveBytes(req: IncomingMessage, res: ServerResponse, f: Entry, key: string, headers: Record<string, string>): Promise<void> {
    let start = 0;
    let end = f.size;
    let status = 200;
    const range = req.headers.range;
    if (range && !this.ignoreRange) {
      const r = /^bytes=(\d+)-(\d*)$/.exec(range);
      if (!r || Number(r[1]) >= Math.max(f.size, 1)) {
        res.writeHead(416, { 'content-range': `bytes */${f.size}` }).end();
        return;
      }
      start = Number(r[1]);
      end = r[2] ? Math.min(Number(r[2]) + 1, f.size) : f.size;
      status = 206;
    }
    res.writeHead(status, { ...headers, 'content-length': String(end - start), ...(status === 206 ? { 'content-range': `bytes ${start}-${end - 1}/${f.size}` } : {}) });
    if (req.method === 'HEAD') {
      res.end();
      return;
    }
    const drop = this.drops.find((d) => d.path === key && d.times > 0 && start >= d.minStart);
    if (drop) drop.times--;
    const fh = await open(f.blob, 'r');
    try {
      let at = start;
      const buf = Buffer.alloc(1 << 20);
      while (at < end) {
        const n = Math.min(buf.length, end - at);
        await fh.read(buf, 0, n, at);
        const chunk = Buffer.from(buf.subarray(0, n));
        const bad = Math.floor(f.size / 2);
        if (this.corrupted.has(key) && at <= bad && at + n > bad) chunk[bad - at] = chunk[bad - at]! ^ 0xff;
        if (drop && at - start + n > drop.after) {
          const keep = Math.max(0, drop.after - (at - start));
          res.write(chunk.subarray(0, keep));
          this.bytesServed.set(key, (this.bytesServed.get(key) ?? 0) + keep);
          await new Promise((r) => setTimeout(r, 20));
          res.destroy();
          return;
        }
        if (!res.write(chunk)) {
          await new Promise<void>((r) => {
            const done = (): void => {
              res.off('drain', done);
              res.off('close', done);
              r();
            };
            res.once('drain', done);
            res.once('close', done);
          });
          if (res.destroyed) return;
        }
        this.bytesServed.set(key, (this.bytesServed.get(key) ?? 0) + n);
        at += n;
      }
      res.end();
    } finally {
      await fh.close();
    }
  }
}
