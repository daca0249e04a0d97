/** verify and diff through the CLI: manifests, config checks, source mappings, ulp reports. */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-verify-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

test('verify passes on fresh outputs, HF → Megatron and back, against their sources', async () => {
  const meg = join(tmp, 'meg');
  const hf = join(tmp, 'hf');
  assert.equal((await run(['convert', '-q', '--to', 'megatron', example, meg])).code, 0);
  assert.equal((await run(['convert', '-q', '--to', 'hf', meg, hf])).code, 0);
  let r = await run(['verify', meg, '--against', example]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /ok {4}equal to the source's mapping: 9 tensors bit-identical/);
  r = await run(['verify', hf, '--against', meg]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /ok {4}equal to the source's mapping: 21 tensors bit-identical/);
  assert.match(r.stdout, /ok {4}tensors match the config: every expected HF tensor present/);
});

test('verify fails with exit 3 when a file no longer matches its manifest', async () => {
  const out = join(tmp, 'dcp');
  assert.equal((await run(['convert', '-q', '--to', 'dcp', example, out])).code, 0);
  const fh = await open(join(out, '__0_0.distcp'), 'r+');
  await fh.write(Buffer.from([0xff, 0xfe]), 0, 2, 5000);
  await fh.close();
  const r = await run(['verify', out, '--against', example]);
  assert.equal(r.code, 3);
  assert.match(r.stdout, /FAIL {2}manifest checksums: __0_0\.distcp fails its SHA-256/);
  assert.match(r.stdout, /verification of .* FAILED/);
});

test('diff reports ulp differences of a cast, and maps Megatron onto HF names', async () => {
  const f32 = join(tmp, 'f32');
  assert.equal((await run(['convert', '-q', '--to', 'safetensors', '--dtype', 'float32', example, f32])).code, 0);
  let r = await run(['diff', example, f32]);
  assert.equal(r.code, 0, r.stdout); // bf16 → f32 is exact: cast back, every element equal
  assert.match(r.stdout, /21 tensors compared: 21 identical/);
  const f8 = join(tmp, 'f8');
  assert.equal((await run(['convert', '-q', '--to', 'safetensors', '--dtype', 'float8_e4m3fn', example, f8])).code, 0);
  r = await run(['diff', example, f8, '--json']);
  assert.equal(r.code, 1);
  const j = JSON.parse(r.stdout);
  const some = j.tensors.find((d: { equal: boolean }) => !d.equal);
  assert.ok(some && some.maxUlp >= 1 && some.differing > 0, 'fp8 loses bf16 precision: differences reported in ulp');
  const meg = join(tmp, 'meg-diff');
  assert.equal((await run(['convert', '-q', '--to', 'megatron', example, meg])).code, 0);
  r = await run(['diff', example, meg]);
  assert.equal(r.code, 0, r.stdout);
  assert.match(r.stdout, /21 tensors compared: 21 identical, 0 different; 0 unmatched/);
});

test('verify of a checkpoint it cannot read exits 1 with one message (bad input), not 3 (a failed check) — as the README says', async () => {
  const { writeFile } = await import('node:fs/promises');
  const bad = join(tmp, 'unreadable.safetensors');
  await writeFile(bad, Buffer.from([200, 0, 0, 0, 0, 0, 0, 0, 123]));
  const r = await run(['verify', bad]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /^shardshift: error: \S*unreadable\.safetensors: /);
});
