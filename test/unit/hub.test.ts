/**
 * The hub as source and sink, against the loopback hub double (test/helpers/hub-double.ts: the
 * subset of the hub API the client uses; every test checks no request fell outside it). No
 * Python here; test/interop/hub.test.ts has huggingface_hub's own client on the same double.
 *
 * - a sharded model streams HF → Megatron with --max-disk below the model's size: the output
 *   equals the local conversion byte for byte, and the spool on disk (sampled by the test) stays
 *   under the limit; without --max-disk the shards land in the HF cache layout and are reused;
 * - downloads resume by range after an interruption, retry a dropped connection, and refuse a
 *   corrupted blob or a server that ignores Range;
 * - push: one commit, a second push uploads nothing, a branch per iteration;
 * - bad input: no weights, a missing revision, no access, a gated repo, a malformed token,
 *   --max-disk under the largest shard — one message, nothing that looks complete.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile, copyFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { HubDouble } from '../helpers/hub-double.js';
import { runCli } from '../helpers/cli.js';
import { writeSyntheticMoe } from '../helpers/synthetic.js';
import { downloadVerified } from '../../src/hub/transfer.js';
import { listRepo } from '../../src/hub/listing.js';
import { hubRepo } from '../../src/hub/repo.js';

let tmp: string;
let hub: HubDouble;
let model: string;
let env: Record<string, string>;
const MANIFEST = 'shardshift-manifest.json';

async function walk(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await walk(p)));
    else out.push(p);
  }
  return out.sort();
}

/** Every file of `a` equals `b`'s (the manifests, which name their source, aside). */
async function sameTree(a: string, b: string): Promise<number> {
  const fa = (await walk(a)).map((p) => relative(a, p)).filter((p) => !p.endsWith(MANIFEST));
  const fb = (await walk(b)).map((p) => relative(b, p)).filter((p) => !p.endsWith(MANIFEST));
  assert.deepEqual(fa, fb);
  for (const f of fa) assert.ok((await readFile(join(a, f))).equals(await readFile(join(b, f))), `${f} differs`);
  return fa.length;
}

async function dirBytes(d: string): Promise<number> {
  let n = 0;
  for (const p of await walk(d).catch(() => [] as string[])) n += await stat(p).then((s) => s.size, () => 0);
  return n;
}

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-hub-'));
  hub = await HubDouble.start(join(tmp, 'double'));
  hub.tokens.set('hf_reader', { read: '*', write: [] });
  hub.tokens.set('hf_writer', { read: '*', write: '*' });
  hub.tokens.set('hf_nobody', { read: [], write: [] });
  // A Mixtral-shaped model of ~24 MB in 4 MB shards (many small expert tensors per shard).
  const one = join(tmp, 'one-file');
  await writeSyntheticMoe(one, 'mixtral', { layers: 6, hidden: 192, heads: 4, kvHeads: 2, headDim: 48, experts: 8, topK: 2, expertFfn: 192, vocab: 512 });
  await writeFile(join(one, 'tokenizer_config.json'), '{"model_max_length": 512}\n');
  model = join(tmp, 'model');
  const r = await runCli(['convert', '-q', '--to', 'safetensors', '--shard-size', '4MB', one, model]);
  assert.equal(r.code, 0, r.stderr);
  await rm(join(model, MANIFEST));
  for (const f of ['config.json', 'tokenizer_config.json']) if (!existsSync(join(model, f))) await copyFile(join(one, f), join(model, f));
  assert.ok((await readdir(model)).filter((f) => f.endsWith('.safetensors')).length >= 5, 'several shards');
  await hub.addRepo('acme/moe', model);
  await hub.addRepo('acme/private-moe', model, { private: true });
  await hub.addRepo('acme/gated-moe', model, { gated: true });
  const cfgOnly = join(tmp, 'cfg-only');
  await mkdir(cfgOnly);
  await copyFile(join(model, 'config.json'), join(cfgOnly, 'config.json'));
  await hub.addRepo('acme/no-weights', cfgOnly);
  env = { HF_ENDPOINT: hub.endpoint, HF_HUB_CACHE: join(tmp, 'cache'), HF_TOKEN: '' };
});

after(async () => {
  await hub.stop();
  await rm(tmp, { recursive: true, force: true });
});

test('a hub model streams HF → Megatron with --max-disk below its size: byte-identical to the local conversion, the spool never over the limit', async () => {
  const local = join(tmp, 'local-meg');
  assert.equal((await runCli(['convert', '-q', '--to', 'megatron', '--tp', '2', model, local])).code, 0);
  const shardSizes = await Promise.all((await readdir(model)).filter((f) => f.endsWith('.safetensors')).map((f) => stat(join(model, f)).then((s) => s.size)));
  const total = shardSizes.reduce((a, b) => a + b, 0);
  const largest = Math.max(...shardSizes);
  // Above the executor's read-ahead at --max-memory 48MiB (what it reads ahead must be on disk).
  const limit = 8_000_000;
  assert.ok(limit < total / 3 && limit >= largest, `the limit (${limit}) is well under the model (${total})`);
  const out = join(tmp, 'streamed-meg');
  const spool = `${out}.source-spool`;
  let peak = 0;
  const sampler = setInterval(() => {
    void dirBytes(spool).then((n) => (peak = Math.max(peak, n)));
  }, 5);
  const served = (): number => [...hub.bytesServed].filter(([k]) => k.endsWith('.safetensors')).reduce((n, [, v]) => n + v, 0);
  const before = served();
  const r = await runCli(['convert', '--json', '--to', 'megatron', '--tp', '2', 'acme/moe', out, '--max-disk', String(limit), '--max-memory', '48MiB'], env);
  clearInterval(sampler);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  console.log(JSON.stringify(j.hub));
  assert.ok(j.hub.peakDisk <= limit, `peak ${j.hub.peakDisk} ≤ ${limit}`);
  assert.ok(peak <= limit, `sampled spool peak ${peak} ≤ ${limit}`);
  assert.ok(peak > 0, 'the sampler saw the spool');
  assert.equal(j.hub.again, 0, 'no tensor was downloaded twice');
  // Headers by range plus each byte once (and what the hash could not keep, fetched to verify).
  assert.ok(served() - before <= total + j.hub.bytesFetchedToVerify, `served ${served() - before} for a ${total}-byte model`);
  assert.ok(j.hub.bytesFetchedToVerify < total, `${j.hub.bytesFetchedToVerify} bytes fetched again to verify`);
  assert.ok(r.stderr.split('\n').some((l) => l.includes('"event":"source"') && l.includes('"kind":"evicted"')), 'tensors were deleted as they were read');
  assert.ok(!existsSync(spool), 'the spool is gone');
  assert.ok(await sameTree(local, out) > 3);
  // Bounded mode leaves no shard in the HF cache (only the side files and the index).
  const cached = await walk(join(tmp, 'cache')).catch(() => [] as string[]);
  assert.ok(!cached.some((p) => p.endsWith('.safetensors')), 'no shard in the cache');
  assert.ok(cached.some((p) => p.endsWith('config.json')));
  assert.deepEqual(hub.violations, []);
});

test('without --max-disk the shards go to the HF cache layout (blobs + snapshot links) and a second run reads them in place', async () => {
  const cache = join(tmp, 'cache-keep');
  const e = { ...env, HF_HUB_CACHE: cache };
  const out = join(tmp, 'kept-meg');
  const r = await runCli(['convert', '-q', '--to', 'megatron', 'acme/moe', out], e);
  assert.equal(r.code, 0, r.stderr);
  const repoDir = join(cache, 'models--acme--moe');
  const commit = (await readFile(join(repoDir, 'refs', 'main'), 'utf8')).trim();
  assert.match(commit, /^[0-9a-f]{40}$/);
  const snap = join(repoDir, 'snapshots', commit);
  const shards = (await readdir(snap)).filter((f) => f.endsWith('.safetensors'));
  assert.equal(shards.length, (await readdir(model)).filter((f) => f.endsWith('.safetensors')).length);
  for (const s of shards) {
    assert.ok((await lstat(join(snap, s))).isSymbolicLink());
    const target = await readlink(join(snap, s));
    assert.match(target, /^\.\.\/\.\.\/blobs\/[0-9a-f]{64}$/);
    assert.equal(target.slice(-64), sha256(await readFile(join(model, s))), 'the blob is named by its sha256');
  }
  const before = hub.bytesServed.get(`acme/moe/${shards[0]}`) ?? 0;
  const again = await runCli(['convert', '--json', '--to', 'megatron', 'acme/moe', `${out}-2`], e);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(JSON.parse(again.stdout).hub.inPlace, shards.length);
  assert.equal(JSON.parse(again.stdout).hub.bytesFetched, 0);
  assert.equal(hub.bytesServed.get(`acme/moe/${shards[0]}`) ?? 0, before, 'no shard fetched again');
  await sameTree(out, `${out}-2`);
  // HF_HUB_OFFLINE: the cache alone.
  const exp = await runCli(['convert', '-q', '--to', 'hf', join(tmp, 'kept-meg'), join(tmp, 'offline-hf'), '--hf-model', 'acme/moe'], { ...e, HF_HUB_OFFLINE: '1', HF_ENDPOINT: 'http://127.0.0.1:9' });
  assert.equal(exp.code, 0, exp.stderr);
  assert.deepEqual(hub.violations, []);
});

test('--hf-model org/name on an export fetches config, generation config and tokenizer files only, never weights', async () => {
  const cache = join(tmp, 'cache-cfg');
  const before = [...hub.bytesServed].filter(([k]) => k.startsWith('acme/moe/') && k.endsWith('.safetensors')).reduce((n, [, v]) => n + v, 0);
  const r = await runCli(['convert', '-q', '--to', 'hf', join(tmp, 'kept-meg'), join(tmp, 'cfg-hf'), '--hf-model', 'acme/moe'], { ...env, HF_HUB_CACHE: cache });
  assert.equal(r.code, 0, r.stderr);
  const after = [...hub.bytesServed].filter(([k]) => k.startsWith('acme/moe/') && k.endsWith('.safetensors')).reduce((n, [, v]) => n + v, 0);
  assert.equal(after, before, 'no weight bytes fetched');
  const cached = (await walk(cache)).map((p) => p.split('/').pop());
  assert.ok(cached.includes('config.json') && cached.includes('tokenizer_config.json'));
  assert.ok(!cached.some((f) => f!.endsWith('.safetensors') || f!.endsWith('.index.json')));
  assert.ok(existsSync(join(tmp, 'cfg-hf', 'tokenizer_config.json')));
});

test('an interrupted download resumes by range; a dropped connection is retried; a corrupted blob and a server ignoring Range are refused', async () => {
  const repo = hubRepo('acme/moe', { HF_ENDPOINT: hub.endpoint });
  const l = await listRepo(repo);
  const f = l.files.find((x) => x.path.endsWith('.safetensors'))!;
  const dir = join(tmp, 'dl');
  await mkdir(dir);
  const opts = { partSize: 64 << 10, parallel: 3, attempts: 2 };
  // Every attempt at one part drops: the run stops, keeping what it verified.
  hub.dropAfter(`acme/moe/${f.path}`, 1000, 100, 3 * (64 << 10));
  const dest = join(dir, 'shard');
  await assert.rejects(downloadVerified(repo, l.commit, f, dest, opts), /stopped after .* of .*re-run to resume from there/);
  hub.clearFaults();
  assert.ok(!existsSync(dest), 'nothing that looks complete');
  const kept = Number(await readFile(`${dest}.incomplete.ok`, 'utf8'));
  assert.ok(existsSync(`${dest}.incomplete`));
  const r = await downloadVerified(repo, l.commit, f, dest, opts);
  assert.equal(r.resumed, kept);
  assert.equal(r.resumed + r.fetched, f.size);
  assert.ok(hub.requests.some((q) => q.range === `bytes=${kept}-${Math.min(kept + (64 << 10), f.size) - 1}`), 'resumed at the verified prefix');
  assert.equal(sha256(await readFile(dest)), f.identity.hex);
  assert.ok(!existsSync(`${dest}.incomplete`) && !existsSync(`${dest}.incomplete.ok`));
  // huggingface_hub's partial (no record): all of it counts.
  const py = join(dir, 'py');
  await writeFile(`${py}.incomplete`, (await readFile(dest)).subarray(0, 100_000));
  const rp = await downloadVerified(repo, l.commit, f, py, opts);
  assert.equal(rp.resumed, 100_000);
  assert.ok((await readFile(py)).equals(await readFile(dest)));
  // One dropped connection: retried within the run.
  hub.dropAfter(`acme/moe/${f.path}`, 5000, 1);
  const rr = await downloadVerified(repo, l.commit, f, join(dir, 'retried'), opts);
  assert.equal(rr.fetched, f.size);
  // A corrupted blob: refused by its sha256, deleted.
  hub.corrupt(`acme/moe/${f.path}`);
  await assert.rejects(downloadVerified(repo, l.commit, f, join(dir, 'bad'), opts), /do not match the hub's LFS sha256 .* the download was deleted/);
  assert.ok(!existsSync(join(dir, 'bad')) && !existsSync(join(dir, 'bad.incomplete')));
  hub.clearFaults();
  // A server that ignores Range is not taken at its word.
  hub.setIgnoreRange(true);
  await assert.rejects(downloadVerified(repo, l.commit, f, join(dir, 'norange'), opts), /ignored the Range header/);
  hub.setIgnoreRange(false);
  assert.deepEqual(hub.violations, []);
});

test('a corrupted shard stops a streamed conversion with one message naming it; nothing that looks complete is left', async () => {
  const l = await listRepo(hubRepo('acme/moe', { HF_ENDPOINT: hub.endpoint }));
  const shard = l.files.filter((x) => x.path.endsWith('.safetensors'))[1]!;
  hub.corrupt(`acme/moe/${shard.path}`);
  const out = join(tmp, 'corrupt-meg');
  const r = await runCli(['convert', '-q', '--to', 'megatron', 'acme/moe', out, '--max-disk', '4MB'], env);
  hub.clearFaults();
  assert.equal(r.code, 1);
  assert.match(r.stderr, new RegExp(`${shard.path.replace(/\./g, '\\.')} of acme/moe: the downloaded bytes do not match the hub's LFS sha256`));
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.ok(!existsSync(out) && !existsSync(`${out}.partial`), 'no output');
  assert.ok(!existsSync(`${out}.source-spool`), 'no spool');
});

test('bad input: no weights, a missing revision, no access, a gated repo, a malformed token, --max-disk under the largest shard', async () => {
  const out = join(tmp, 'bad-out');
  const cases: Array<[string[], Record<string, string>, number, RegExp]> = [
    [['acme/no-weights', out], {}, 1, /acme\/no-weights: the repository lists no safetensors or pytorch_model\*\.bin weights/],
    [['acme/moe@v9', out], {}, 1, /looking up acme\/moe@v9: no revision v9/],
    [['acme/private-moe', out], {}, 1, /looking up acme\/private-moe: the hub refused access \(HTTP 401\); set HF_TOKEN/],
    [['acme/private-moe', out], { HF_TOKEN: 'hf_nobody' }, 1, /acme\/private-moe: not found on .*|HTTP 404/],
    [['acme/gated-moe', out], {}, 1, /acme\/gated-moe: the repository is gated \(HTTP 403\); accept its terms/],
    [['acme/moe', out], { HF_TOKEN: 'secret' }, 2, /HF_TOKEN does not look like a hub access token/],
    [['acme/moe', out, '--max-disk', '100KB'], {}, 2, /--max-disk 97.7 KiB is smaller than the largest tensor, \S+ in model-0000\d-of-0000\d\.safetensors \(.*\): give at least --max-disk \d+/],
    [[model, out, '--max-disk', '1GB'], {}, 2, /--max-disk applies to a hub model streamed into --to megatron/],
    [['acme/moe', out], { HF_ENDPOINT: 'http://127.0.0.1:9' }, 1, /cannot reach the hub at http:\/\/127\.0\.0\.1:9/],
  ];
  for (const [args, extra, code, re] of cases) {
    const r = await runCli(['convert', '-q', '--to', 'megatron', ...args], { ...env, HF_HUB_CACHE: join(tmp, 'cache-bad'), ...extra });
    assert.equal(r.code, code, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, re);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    assert.ok(!existsSync(out) && !existsSync(`${out}.partial`) && !existsSync(`${out}.source-spool`), 'nothing written');
  }
  // The token is authorised for the private repo: it streams.
  const ok = await runCli(['convert', '-q', '--to', 'megatron', 'acme/private-moe', join(tmp, 'private-meg'), '--max-disk', '4MB'], { ...env, HF_TOKEN: 'hf_reader' });
  assert.equal(ok.code, 0, ok.stderr);
  assert.deepEqual(hub.violations, []);
});

test('push: one commit with the manifest; a second push uploads nothing; a branch per iteration; no write access is said', async () => {
  const hf = join(tmp, 'push-hf');
  const w = { ...env, HF_TOKEN: 'hf_writer' };
  let r = await runCli(['convert', '--to', 'hf', '-q', join(tmp, 'kept-meg'), hf, '--hf-model', model, '--push-to-hub', 'acme/pushed@iter-1', '--create-repo', '--private'], w);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, new RegExp(`pushed \\d+ files .* to acme/pushed@iter-1: ${hub.endpoint}/acme/pushed/commit/[0-9a-f]{40}`));
  const pushed = hub.files('acme/pushed', 'iter-1')!;
  const local = (await walk(hf)).map((p) => relative(hf, p));
  assert.deepEqual([...pushed.keys()].sort(), local.sort());
  assert.ok(local.includes(MANIFEST));
  for (const f of local) assert.equal(sha256(await readFile(pushed.get(f)!.blob)), sha256(await readFile(join(hf, f))), f);
  assert.ok(pushed.get('model.safetensors')?.sha256 ?? [...pushed.values()].some((e) => e.sha256), 'weights went through LFS');
  const commits = hub.commitsOf('acme/pushed');
  const uploads = hub.requests.filter((q) => q.url.startsWith('/lfs-upload/')).length;
  r = await runCli(['push', '--json', hf, 'acme/pushed@iter-1'], w);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.deepEqual(j.uploaded, []);
  assert.equal(j.unchanged, local.length);
  assert.match(j.commitUrl, /\/acme\/pushed\/commit\/[0-9a-f]{40}$/);
  assert.equal(hub.commitsOf('acme/pushed'), commits, 'no new commit');
  assert.equal(hub.requests.filter((q) => q.url.startsWith('/lfs-upload/')).length, uploads, 'nothing uploaded');
  // Another branch: the LFS objects are there already (the batch call says so), only the commit.
  r = await runCli(['push', hf, 'acme/pushed@iter-2', '--create-repo'], w);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(hub.requests.filter((q) => q.url.startsWith('/lfs-upload/')).length, uploads, 'no LFS object uploaded twice');
  assert.equal(hub.files('acme/pushed', 'iter-2')!.size, local.length);
  // Refusals: no token, a reader token, a missing branch without --create-repo, a tampered output.
  r = await runCli(['push', hf, 'acme/pushed'], env);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /set HF_TOKEN to a token with write access/);
  r = await runCli(['push', hf, 'acme/pushed@iter-9'], w);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /has no branch iter-9; pass --create-repo/);
  r = await runCli(['push', hf, 'acme/elsewhere', '--create-repo'], { ...env, HF_TOKEN: 'hf_reader' });
  assert.equal(r.code, 1);
  assert.match(r.stderr, /creating acme\/elsewhere: the hub refused access \(HTTP 403\)/);
  await writeFile(join(hf, 'config.json'), '{}');
  r = await runCli(['push', hf, 'acme/pushed@iter-1'], w);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /config\.json: its SHA-256 is not the one the output's manifest records; nothing was pushed/);
  assert.deepEqual(hub.violations, []);
});

test('steps: hf_to_megatron streams a hub id with max_disk and pushes the output; megatron_to_hf iterations= push each checkpoint to its own branch', async () => {
  const w = { ...env, HF_TOKEN: 'hf_writer', HF_HUB_CACHE: join(tmp, 'cache-steps') };
  const out = join(tmp, 'steps-meg');
  let r = await runCli(['steps', 'run', 'convert/hf_to_megatron', '--json', 'hf_model_id=acme/moe', `megatron_path=${out}`, 'max_disk=8MB', 'max_memory=48MiB', 'push_to_hub=acme/steps-meg', 'create_repo=true'], w);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.match(j.push.commitUrl, /\/acme\/steps-meg\/commit\/[0-9a-f]{40}$/);
  assert.ok(!existsSync(`${out}.source-spool`));
  assert.equal(await sameTree(join(tmp, 'kept-meg'), out) > 0, true, 'the streamed step equals the cached conversion');
  assert.deepEqual([...hub.files('acme/steps-meg')!.keys()].sort(), (await walk(out)).map((p) => relative(out, p)).sort());
  const hfOut = join(tmp, 'steps-hf');
  r = await runCli(['steps', 'run', 'convert/megatron_to_hf', `megatron_path=${join(tmp, 'kept-meg')}`, 'iterations=all', `hf_path=${hfOut}`, `hf_model_id=${model}`, 'push_to_hub=acme/steps-hf@run1', 'create_repo=true'], w);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /iter_0000000: pushed \d+ files .* to acme\/steps-hf@run1-iter_0000000: /);
  assert.ok(hub.files('acme/steps-hf', 'run1-iter_0000000')!.has('config.json') && [...hub.files('acme/steps-hf', 'run1-iter_0000000')!.values()].some((e) => e.path.endsWith('.safetensors') && e.sha256));
  // Re-run: the finished output is kept and the branch already holds it: nothing uploaded.
  r = await runCli(['steps', 'run', 'convert/megatron_to_hf', `megatron_path=${join(tmp, 'kept-meg')}`, 'iterations=all', `hf_path=${hfOut}`, `hf_model_id=${model}`, 'push_to_hub=acme/steps-hf@run1', 'create_repo=true'], w);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /already holds these \d+ files; nothing uploaded/);
  r = await runCli(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${model}`, `megatron_path=${join(tmp, 'x')}`, 'max_disk=8MB'], w);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /max_disk applies to a hub model id streamed from the hub; .* is on local disk/);
  assert.deepEqual(hub.violations, []);
});
