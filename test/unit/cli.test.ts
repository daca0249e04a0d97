/** The CLI end to end: inspect (text and JSON), convert (dry run, JSON, single-file output), usage errors. */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, readdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { VERSION } from '../../src/util/version.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
const golden = join(repoRoot, 'test', 'fixtures', 'golden');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-cli-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

test('inspect prints format, counts, dtype histogram, side files and a tensor table', async () => {
  const r = await run(['inspect', example]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /format:\s+safetensors/);
  assert.match(r.stdout, /tensors:\s+21/);
  assert.match(r.stdout, /total bytes: 45376/);
  assert.match(r.stdout, /BF16 ×21/);
  assert.match(r.stdout, /side files:\s+config\.json, generation_config\.json/);
  assert.match(r.stdout, /model\.layers\.0\.self_attn\.q_proj\.weight\s+BF16\s+\[32, 32\]\s+2048\s+model\.safetensors @\d+/);
});

test('inspect --json gives one document with the same facts', async () => {
  const r = await run(['inspect', '--json', join(golden, 'assorted.pt')]);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.format, 'torch');
  assert.equal(j.tensorCount, j.tensors.length);
  assert.ok(j.dtypes.BF16.tensors >= 1);
  const step = j.objects.find((o: { name: string }) => o.name === 'meta.step');
  assert.equal(step.value, 5);
  const t = j.tensors.find((x: { name: string }) => x.name === 'model.strided.transposed');
  assert.deepEqual(t.shape, [4, 6]);
});

test('inspect of a DCP directory lists chunks and non-tensor entries', async () => {
  const r = await run(['inspect', '--json', join(golden, 'dcp_multi')]);
  const j = JSON.parse(r.stdout);
  assert.equal(j.format, 'dcp');
  assert.deepEqual(j.dataFiles, ['__0_0.distcp', '__1_0.distcp']);
  assert.match(j.tensors.find((t: { name: string }) => t.name === 'rows').where, /2 chunks/);
  assert.deepEqual(j.objects.map((o: { name: string }) => o.name), ['step']);
});

test('convert --dry-run --json prints the plan and writes nothing', async () => {
  const out = join(tmp, 'dry');
  const r = await run(['convert', '--to', 'dcp', '--dry-run', '--json', '--dcp-files', '2', example, out]);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.dryRun, true);
  assert.deepEqual(j.plan.files.map((f: { path: string }) => f.path), ['__0_0.distcp', '__0_1.distcp', '.metadata']);
  assert.deepEqual(j.plan.sideFiles, ['config.json', 'generation_config.json']);
  assert.ok(!existsSync(out));
});

test('convert to a single .safetensors file, reporting entries it cannot carry', async () => {
  const out = join(tmp, 'one.safetensors');
  const r = await run(['convert', '--to', 'safetensors', join(golden, 'dcp_single'), out]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /warning: step not carried: safetensors holds only tensors/);
  assert.match(r.stdout, /wrote .*one\.safetensors: 1 file/);
  assert.ok(existsSync(out));
  assert.deepEqual((await readdir(tmp)).filter((n) => n.includes('partial')), []);
});

test('an fp32 cast within a 1 MiB budget', async () => {
  // 1 MiB budget (the smallest chunk) against tensors of 4 KiB–… and an fp32 cast that doubles them.
  const out = join(tmp, 'cast');
  const r = await run(['convert', '--to', 'safetensors', '--dtype', 'float32', '--max-memory', '1MiB', example, out]);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse((await run(['inspect', '--json', out])).stdout);
  assert.equal(j.totalBytes, 45376 * 2);
  assert.deepEqual(Object.keys(j.dtypes), ['F32']);
});

test('usage errors exit 2 with a message', async () => {
  let r = await run(['convert', example, join(tmp, 'x')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--to <format>/);
  r = await run(['convert', '--to', 'gguf', example, join(tmp, 'x')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /Allowed choices are safetensors, torch, dcp|argument 'gguf' is invalid/);
  r = await run(['convert', '--to', 'torch', '--max-memory', 'lots', example, join(tmp, 'x')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--max-memory: cannot read "lots" as a size/);
  r = await run(['inspect', join(tmp, 'nope')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /no such file or directory/);
});

test('--help shows worked examples; --version matches package.json', async () => {
  const h = await run(['convert', '--help']);
  assert.equal(h.code, 0);
  assert.match(h.stdout, /Examples:\n\s+\$ shardshift convert --to safetensors/);
  const v = await run(['--version']);
  assert.equal(v.stdout.trim().split(' ')[0], VERSION);
  assert.equal(v.stdout.trim(), `${VERSION} (Node.js ${process.version}, ${process.platform}-${process.arch})`);
  const pkg = JSON.parse((await import('node:fs')).readFileSync(join(repoRoot, 'package.json'), 'utf8'));
  assert.equal(pkg.version, VERSION);
});

test('convert --quantize: only for exports, only for a family with a quantized hub layout', async () => {
  const r = await run(['convert', '--to', 'megatron', '--quantize', 'mxfp4', example, join(tmp, 'q.meg')]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--quantize mxfp4 applies to exports \(--to hf\), not --to megatron/);
  const meg = join(tmp, 'q.llama-meg');
  assert.equal((await run(['convert', '--to', 'megatron', '-q', example, meg])).code, 0);
  const r2 = await run(['convert', '--to', 'hf', '--quantize', 'mxfp4', '--dry-run', meg, join(tmp, 'q.hf')]);
  assert.equal(r2.code, 2, r2.stderr);
  assert.match(r2.stderr, /--quantize mxfp4: .* has no mxfp4 hub layout/);
  assert.ok(!existsSync(join(tmp, 'q.hf')));
});


test('an output whose extension names another format is refused, not made a directory of that name', async () => {
  for (const [to, name, what] of [
    ['safetensors', 'x.pt', /\.pt names a torch file, but --to safetensors writes this output as a directory; give a directory name \(or a \.safetensors name for one file\)/],
    ['torch', 'x.safetensors', /\.safetensors names a safetensors file, but --to torch writes this output as a directory; give a directory name \(or a \.bin, \.pt or \.pth name for one file\)/],
    ['megatron', 'y.safetensors', /\.safetensors names a safetensors file, but --to megatron writes a directory; give a directory name$/m],
    ['dcp', 'z.distcp', /--to dcp writes a directory/],
    ['hf', 'w.bin', /--to hf writes a directory/],
  ] as const) {
    const out = join(tmp, `ext-${to}-${name}`);
    const r = await run(['convert', '--to', to, '-q', example, out]);
    assert.equal(r.code, 2, `${to} ${name}: ${r.stderr}`);
    assert.match(r.stderr, what);
    assert.ok(!existsSync(out), `${to} ${name}: nothing made`);
  }
});

test('a checkpoint shardshift wrote converts again: its manifest is not a side file (the next output verifies, inspect does not list it)', async () => {
  const a = join(tmp, 'chain-a');
  const b = join(tmp, 'chain-b');
  const c = join(tmp, 'chain-c');
  assert.equal((await run(['convert', '--to', 'megatron', '-q', example, a])).code, 0);
  assert.equal((await run(['convert', '--to', 'hf', '-q', a, b])).code, 0);
  assert.equal((await run(['convert', '--to', 'safetensors', '-q', b, c])).code, 0);
  for (const d of [b, c]) {
    const v = await run(['verify', d]);
    assert.equal(v.code, 0, `${d}: ${v.stdout}${v.stderr}`);
  }
  const i = await run(['inspect', b]);
  assert.match(i.stdout, /side files:\s+config\.json, generation_config\.json\n/);
  const m = await run(['convert', '--to', 'megatron', '-q', b, join(tmp, 'chain-d')]);
  assert.equal(m.code, 0, m.stderr);
  assert.ok(!(await readdir(join(tmp, 'chain-d', 'iter_0000000', 'hf'))).includes('shardshift-manifest.json'));
});

test('a usage error is the error, the usage line of its command and where the help is — not the whole help', async () => {
  for (const [args, usage] of [
    [['convert', '--bogus', 'a', 'b'], "Usage: shardshift convert [options] <src> <out>\nSee 'shardshift convert --help'."],
    [['convert', 'a', 'b'], "Usage: shardshift convert [options] <src> <out>\nSee 'shardshift convert --help'."],
    [['steps', 'run'], "Usage: shardshift steps run [options] <step> [overrides...]\nSee 'shardshift steps run --help'."],
    [['frob'], "Usage: shardshift [options] [command]\nSee 'shardshift --help'."],
  ] as const) {
    const r = await run([...args]);
    assert.equal(r.code, 2, r.stderr);
    const lines = r.stderr.trimEnd().split('\n');
    assert.equal(lines.length, 3, r.stderr);
    assert.match(lines[0]!, /^shardshift: error: /);
    assert.equal(lines.slice(1).join('\n'), usage);
  }
});

test('shell completion: `completion bash|zsh|fish` prints a script for that shell; the engine behind it completes commands, options and their choices', async () => {
  const { spawnSync } = await import('node:child_process');
  for (const sh of ['bash', 'zsh', 'fish']) {
    const r = await run(['completion', sh]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`${sh} completion for shardshift|shardshift`, 'i'));
    assert.match(r.stdout, /shardshift complete --/);
  }
  const bash = await run(['completion', 'bash']);
  assert.match(bash.stdout, /^complete -F __shardshift_complete shardshift$/m);
  assert.equal(spawnSync('bash', ['-n'], { input: bash.stdout }).status, 0, 'the bash script parses');
  const words = async (...w: string[]): Promise<string[]> => (await run(['complete', '--', ...w])).stdout.split('\n').filter((l) => l && !l.startsWith(':')).map((l) => l.split('\t')[0]!);
  assert.deepEqual(await words('conv'), ['convert']);
  assert.deepEqual(await words('convert', '--to', ''), ['safetensors', 'torch', 'dcp', 'megatron', 'hf', 'nxd']);
  assert.ok((await words('convert', '--ckpt')).includes('--ckpt-format'));
  assert.ok((await words('steps', '')).includes('run'));
});
