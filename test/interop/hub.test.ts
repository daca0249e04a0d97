/**
 * huggingface_hub's own client (2.x, in the oracle venv) against the loopback hub double that the
 * unit tests use (test/helpers/hub-double.ts), so the double is checked against the real client
 * and shardshift's cache and uploads against what Python users have:
 *
 * - a cache made by `snapshot_download` is read in place: a streamed conversion fetches no weight
 *   bytes, and HF_HUB_OFFLINE=1 works from it;
 * - what `shardshift push` uploaded, `HfApi.list_repo_files` lists and `hf_hub_download` fetches
 *   with the same SHA-256s.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HubDouble } from '../helpers/hub-double.js';
import { runCli } from '../helpers/cli.js';
import { runOracle } from '../helpers/oracle.js';
import { writeSyntheticMoe } from '../helpers/synthetic.js';

let tmp: string;
let hub: HubDouble;
let model: string;

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-hub-py-'));
  hub = await HubDouble.start(join(tmp, 'double'));
  hub.tokens.set('hf_writer', { read: '*', write: '*' });
  const one = join(tmp, 'one');
  await writeSyntheticMoe(one, 'mixtral', { layers: 2, hidden: 64, heads: 4, kvHeads: 2, headDim: 16, experts: 4, topK: 2, expertFfn: 64, vocab: 128 });
  model = join(tmp, 'model');
  assert.equal((await runCli(['convert', '-q', '--to', 'safetensors', '--shard-size', '200KB', one, model])).code, 0);
  await rm(join(model, 'shardshift-manifest.json'));
  await hub.addRepo('acme/moe', model);
});

after(async () => {
  await hub.stop();
  await rm(tmp, { recursive: true, force: true });
});

test("a hub cache made by huggingface_hub's snapshot_download is read in place; HF_HUB_OFFLINE works from it", async () => {
  const cache = join(tmp, 'hf-cache');
  const snap = JSON.parse(await runOracle('hub_oracle.py', ['snapshot', hub.endpoint, 'acme/moe', cache])) as { path: string; files: string[] };
  assert.ok(snap.files.some((f) => f.endsWith('.safetensors')));
  const weightBytes = (): number => [...hub.bytesServed].filter(([k]) => k.endsWith('.safetensors')).reduce((n, [, v]) => n + v, 0);
  const before = weightBytes();
  const env = { HF_ENDPOINT: hub.endpoint, HF_HUB_CACHE: cache, HF_TOKEN: '' };
  const r = await runCli(['convert', '--json', '--to', 'megatron', 'acme/moe', join(tmp, 'from-cache'), '--max-disk', '1MB'], env);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.hub.inPlace, snap.files.filter((f) => f.endsWith('.safetensors')).length);
  assert.equal(j.hub.bytesFetched, 0);
  assert.equal(weightBytes(), before, 'no weight bytes fetched: the cache was read in place');
  const local = await runCli(['convert', '-q', '--to', 'megatron', model, join(tmp, 'local')]);
  assert.equal(local.code, 0);
  for (const f of await readdir(join(tmp, 'local', 'iter_0000000'))) {
    if (!f.endsWith('.distcp')) continue;
    assert.ok((await readFile(join(tmp, 'local', 'iter_0000000', f))).equals(await readFile(join(tmp, 'from-cache', 'iter_0000000', f))), f);
  }
  const off = await runCli(['convert', '-q', '--to', 'megatron', 'acme/moe', join(tmp, 'offline')], { ...env, HF_HUB_OFFLINE: '1', HF_ENDPOINT: 'http://127.0.0.1:9' });
  assert.equal(off.code, 0, off.stderr);
  assert.deepEqual(hub.violations, []);
});

test("what shardshift pushes, huggingface_hub lists and downloads with the same SHA-256s", async () => {
  const out = join(tmp, 'push-hf');
  const meg = join(tmp, 'local');
  const r = await runCli(['convert', '-q', '--to', 'hf', meg, out, '--hf-model', model, '--push-to-hub', 'acme/pushed@iter-7', '--create-repo'], { HF_ENDPOINT: hub.endpoint, HF_TOKEN: 'hf_writer' });
  assert.equal(r.code, 0, r.stderr);
  const got = JSON.parse(await runOracle('hub_oracle.py', ['pushed', hub.endpoint, 'acme/pushed', 'iter-7', join(tmp, 'py-dl'), 'hf_writer'])) as Record<string, string>;
  const files = (await readdir(out, { recursive: true, withFileTypes: true })).filter((e) => e.isFile()).map((e) => join(e.parentPath ?? (e as unknown as { path: string }).path, e.name).slice(out.length + 1));
  assert.deepEqual(Object.keys(got).sort(), files.sort());
  for (const f of files) assert.equal(got[f], createHash('sha256').update(await readFile(join(out, f))).digest('hex'), f);
  assert.deepEqual(hub.violations, []);
});
