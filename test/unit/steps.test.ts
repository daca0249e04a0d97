/**
 * The steps interface end to end: list/show, typed dotlist overrides and their errors, default
 * output directories, dry runs, and hub model ids served by a local HTTP server the way the
 * Hugging Face hub serves them (HF_ENDPOINT, HF_TOKEN).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HubDouble } from '../helpers/hub-double.js';
import { repoRoot } from '../helpers/oracle.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
let hub: HubDouble;
let endpoint: string;
let requests: HubDouble['requests'];

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-steps-'));
  // The loopback hub double (test/helpers/hub-double.ts); the model is private, so HF_TOKEN matters.
  hub = await HubDouble.start(join(tmp, 'double'));
  hub.tokens.set('hf_secret', { read: '*', write: [] });
  await hub.addRepo('acme/tiny-llama', example, { private: true });
  endpoint = hub.endpoint;
  requests = hub.requests;
});

after(async () => {
  await hub.stop();
  assert.deepEqual(hub.violations, []);
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[], env: Record<string, string> = {}, cwd = tmp): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], { cwd, env: { ...process.env, CONVERT_OUTPUT_DIR: '', NEMO_RUN_DIR: '', ...env } }, (err, stdout, stderr) =>
      res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

test('steps list and show', async () => {
  const l = await run(['steps', 'list']);
  assert.match(l.stdout, /convert\/hf_to_megatron/);
  assert.match(l.stdout, /convert\/megatron_to_hf/);
  const s = await run(['steps', 'show', 'convert/hf_to_megatron']);
  assert.match(s.stdout, /parallel\.tp\s+int, default 1/);
  assert.match(s.stdout, /hf_model_id\s+string, required/);
  assert.match(s.stdout, /configs \(-c\): default/);
});

test('overrides are typed and validated; nested keys work', async () => {
  let r = await run(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${example}`, 'paralel.tp=2']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /unknown parameter paralel\.tp; valid: hf_model_id, megatron_path, dtype, parallel\.tp/);
  r = await run(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${example}`, 'parallel.tp=two']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /parallel\.tp="two" is not a valid int/);
  r = await run(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${example}`, 'dtype=float64']);
  assert.match(r.stderr, /dtype="float64" is not a valid string \(one of bfloat16, float16, float32\)/);
  r = await run(['steps', 'run', 'convert/hf_to_megatron', '-c', 'default']);
  assert.match(r.stderr, /hf_model_id is required/);
  r = await run(['steps', 'run', 'convert/hf_to_megatron', '-c', 'default', `hf_model_id=${example}`, 'parallel.tp=2', '--dry-run', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.params['parallel.tp'], 2);
  assert.ok(j.plan.notes.some((n: string) => n.includes('vocab 64 → padded 256')));
  assert.ok(!existsSync(join(tmp, 'output')), 'a dry run writes nothing');
});

test('default output: CONVERT_OUTPUT_DIR, then NEMO_RUN_DIR/convert, then ./output/convert', async () => {
  let r = await run(['steps', 'run', 'convert/hf_to_megatron', '-q', `hf_model_id=${example}`], { CONVERT_OUTPUT_DIR: join(tmp, 'conv') });
  assert.equal(r.code, 0, r.stderr);
  assert.ok(existsSync(join(tmp, 'conv', 'tiny-llama-megatron', 'latest_checkpointed_iteration.txt')));
  r = await run(['steps', 'run', 'convert/hf_to_megatron', '-q', `hf_model_id=${example}`], { NEMO_RUN_DIR: join(tmp, 'run') });
  assert.equal(r.code, 0, r.stderr);
  assert.ok(existsSync(join(tmp, 'run', 'convert', 'tiny-llama-megatron', 'iter_0000000')));
  r = await run(['steps', 'run', 'convert/hf_to_megatron', '-q', `hf_model_id=${example}`]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(existsSync(join(tmp, 'output', 'convert', 'tiny-llama-megatron')));
  r = await run(['steps', 'run', 'convert/megatron_to_hf', '-q', `megatron_path=${join(tmp, 'output', 'convert', 'tiny-llama-megatron')}`, `hf_model_id=${example}`]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(tmp, 'output', 'convert', 'tiny-llama-megatron-hf', 'model.safetensors'))));
});

test('default output names carry the run: two runs\' iter_0000100 exports do not collide', async () => {
  const { outputStem } = await import('../../src/steps/registry.js');
  assert.equal(outputStem('./run/iter_0000100'), 'run-iter_0000100');
  assert.equal(outputStem('/ckpt/llama/iter_0000000/'), 'llama-iter_0000000');
  assert.equal(outputStem('results/run1/step_100/policy/weights'), 'run1-step_100');
  assert.equal(outputStem('acme/tiny-llama'), 'tiny-llama');
  assert.equal(outputStem('examples/tiny-llama'), 'tiny-llama');
  const { mkdir, cp } = await import('node:fs/promises');
  const meg = join(tmp, 'two-runs-meg');
  assert.equal((await run(['convert', '-q', '--to', 'megatron', example, meg])).code, 0);
  for (const runName of ['runA', 'runB']) {
    await mkdir(join(tmp, runName), { recursive: true });
    await cp(join(meg, 'iter_0000000'), join(tmp, runName, 'iter_0000100'), { recursive: true });
    const r = await run(['steps', 'run', 'convert/megatron_to_hf', '-q', `megatron_path=${join(tmp, runName, 'iter_0000100')}`, `hf_model_id=${example}`], { CONVERT_OUTPUT_DIR: join(tmp, 'two-runs-out') });
    assert.equal(r.code, 0, r.stderr);
  }
  assert.deepEqual((await readdir(join(tmp, 'two-runs-out'))).sort(), ['runA-iter_0000100-hf', 'runB-iter_0000100-hf']);
});

test('hub model ids download with HF_TOKEN from HF_ENDPOINT', async () => {
  const env = { HF_ENDPOINT: endpoint, HF_TOKEN: 'hf_secret', HF_HUB_CACHE: join(tmp, 'hub') };
  const out = join(tmp, 'from-hub');
  const r = await run(['steps', 'run', 'convert/hf_to_megatron', 'hf_model_id=acme/tiny-llama', `megatron_path=${out}`], env);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /downloaded acme\/tiny-llama\/model\.safetensors/);
  assert.ok(requests.some((q) => q.method === 'GET' && q.url.startsWith('/api/models/acme/tiny-llama/revision/main')));
  const back = join(tmp, 'from-hub-hf');
  assert.equal((await run(['convert', '-q', '--to', 'hf', out, back])).code, 0);
  assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))));
  // A second run uses the cache: no file downloads.
  const before = requests.length;
  const r2 = await run(['steps', 'run', 'convert/hf_to_megatron', '-d', 'hf_model_id=acme/tiny-llama', `megatron_path=${out}-2`], env);
  assert.equal(r2.code, 0, r2.stderr);
  assert.ok(requests.slice(before).every((q) => q.url.includes('/api/models/')), 'only the listing is fetched again');
  // Without the token the hub refuses, and the message says what to do.
  const r3 = await run(['steps', 'run', 'convert/hf_to_megatron', 'hf_model_id=acme/tiny-llama', `megatron_path=${out}-3`], { HF_ENDPOINT: endpoint, HF_TOKEN: '', HF_HUB_CACHE: join(tmp, 'hub2') });
  assert.equal(r3.code, 1);
  assert.match(r3.stderr, /looking up acme\/tiny-llama: the hub refused access \(HTTP 401\); set HF_TOKEN/);
});

test('a local file given where an HF model directory is expected is said to be a file, never looked up on the hub', async () => {
  const { mkdir, copyFile } = await import('node:fs/promises');
  const cwd = join(tmp, 'cwd-file');
  await mkdir(join(cwd, 'src'), { recursive: true });
  await copyFile(join(example, 'model.safetensors'), join(cwd, 'src', 'model.safetensors'));
  const before = requests.length;
  const meg = join(tmp, 'file-ref-meg');
  assert.equal((await run(['convert', '-q', '--to', 'megatron', example, meg])).code, 0);
  const r = await run(['convert', '-q', '--to', 'hf', meg, join(tmp, 'file-ref-hf'), '--hf-model', 'src/model.safetensors'], { HF_ENDPOINT: endpoint }, cwd);
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stderr, 'shardshift: error: src/model.safetensors is a file; give the HF model directory (the one holding config.json)\n');
  assert.equal(requests.length, before, 'no request to the hub');
});

test('the reference docs\' spellings tp / pp / ep address parallel.*; ep > 1 is refused for dense models', async () => {
  const r = await run(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${example}`, 'tp=2', 'pp=2', '-d', '--json']);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.params['parallel.tp'], 2);
  assert.equal(j.params['parallel.pp'], 2);
  const e = await run(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${example}`, 'ep=8', '-d']);
  assert.equal(e.code, 2);
  assert.match(e.stderr, /--ep 8: expert parallelism applies to MoE models; llama is dense/);
  const s = await run(['steps', 'show', 'convert/hf_to_megatron']);
  assert.match(s.stdout, /parallel\.tp .*\(also: tp\)/);
});
