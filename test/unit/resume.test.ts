/**
 * Atomic, resumable output: a conversion killed with SIGKILL at several points leaves only
 * `<out>.partial`; re-running the same command resumes (skipping finished files) and the result
 * is byte-identical to an uninterrupted run; a different plan into the same partial is refused;
 * the finished directory carries a manifest whose checksums match its files.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { outputDigest as tree } from '../helpers/tree.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-resume-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], { env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number; signal?: string }) | null;
      res({ code: e ? (e.code ?? null) : 0, signal: e?.signal ?? null, stdout, stderr });
    });
  });
}

// Megatron output: 4 .distcp files + .metadata + common.pt + metadata.json + tracker + side files.
const ARGS = (out: string): string[] => ['convert', '--to', 'megatron', '--dcp-files', '4', '-q', example, out];

test('killed with SIGKILL after 1 and 3 files and in the middle of a file, a re-run resumes to a byte-identical result', async () => {
  const ref = join(tmp, 'ref');
  assert.equal((await run(ARGS(ref))).code, 0);
  const want = await tree(ref);
  const manifest = JSON.parse(await readFile(join(ref, 'shardshift-manifest.json'), 'utf8'));
  for (const [rel, rec] of Object.entries(manifest.files as Record<string, { sha256: string }>)) assert.equal(rec.sha256, want[rel], `manifest checksum of ${rel}`);
  assert.equal(manifest.tool, 'shardshift');
  assert.match(manifest.planHash, /^[0-9a-f]{64}$/);
  assert.equal(manifest.source.files[0].path.endsWith('model.safetensors'), true);

  for (const [env, label] of [
    [{ SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' }, 'after 1 file'],
    [{ SHARDSHIFT_TEST_KILL_AFTER_FILES: '3' }, 'after 3 files'],
    [{ SHARDSHIFT_TEST_KILL_MID_FILE: '0' }, 'in the middle of the first file'],
    [{ SHARDSHIFT_TEST_KILL_MID_FILE: '2' }, 'in the middle of the third file'],
  ] as const) {
    const out = join(tmp, `killed-${label.replace(/\W+/g, '-')}`);
    const killed = await run(ARGS(out), env);
    assert.equal(killed.signal, 'SIGKILL', `${label}: the run was killed`);
    assert.ok(!existsSync(out), `${label}: nothing that looks done`);
    assert.ok(existsSync(`${out}.partial`), `${label}: the partial output is there`);
    const resumed = await run(ARGS(out));
    assert.equal(resumed.code, 0, resumed.stderr);
    assert.ok(!existsSync(`${out}.partial`));
    assert.deepEqual(await tree(out), want, `${label}: resumed output is byte-identical`);
  }
});

test('a different plan into the same partial directory is refused', async () => {
  const out = join(tmp, 'other-plan');
  const killed = await run(ARGS(out), { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' });
  assert.equal(killed.signal, 'SIGKILL');
  const r = await run(['convert', '--to', 'megatron', '--dcp-files', '4', '--tp', '2', '-q', example, out]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /other-plan\.partial holds an interrupted conversion with a different plan .* remove it to start over, or re-run the original command to resume/);
});

test('a partial directory that holds anything but shardshift remnants is refused, never reused or removed', async () => {
  const out = join(tmp, 'foreign');
  await mkdir(`${out}.partial`);
  await writeFile(join(`${out}.partial`, 'notes.txt'), 'mine');
  const r = await run(ARGS(out));
  assert.equal(r.code, 2);
  assert.match(r.stderr, /foreign\.partial exists but is not a shardshift partial output; remove it to start over/);
  assert.equal(await readFile(join(`${out}.partial`, 'notes.txt'), 'utf8'), 'mine');
  // An empty one (what a kill right after its mkdir leaves) is taken over.
  const empty = join(tmp, 'empty');
  await mkdir(`${empty}.partial`);
  assert.equal((await run(ARGS(empty))).code, 0);
  assert.ok(!existsSync(`${empty}.partial`));
});

test('a finished file altered at the same size while interrupted is rewritten on resume, not reused (issue 16, defect 6)', async () => {
  const ref = join(tmp, 'ref-alter');
  assert.equal((await run(ARGS(ref))).code, 0);
  const want = await tree(ref);
  const out = join(tmp, 'altered');
  const killed = await run(ARGS(out), { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' });
  assert.equal(killed.signal, 'SIGKILL');
  const progress = JSON.parse(await readFile(join(`${out}.partial`, '.shardshift-progress.json'), 'utf8')) as { files: Record<string, { size: number }> };
  const [rel] = Object.keys(progress.files);
  const p = join(`${out}.partial`, rel!);
  const bytes = await readFile(p);
  bytes[bytes.length - 1] = bytes.at(-1)! ^ 0xff; // same size, different content
  await writeFile(p, bytes);
  const resumed = await run(ARGS(out));
  assert.equal(resumed.code, 0, resumed.stderr);
  assert.deepEqual(await tree(out), want, 'the altered file was rewritten');
  const v = await run(['verify', out]);
  assert.equal(v.code, 0, v.stderr + v.stdout);
});

test('killed after the manifest is written but before the rename, a re-run commits the finished output (issue 16, defect 7)', async () => {
  const ref = join(tmp, 'ref-commit');
  assert.equal((await run(ARGS(ref))).code, 0);
  const want = await tree(ref);
  const out = join(tmp, 'stranded');
  const killed = await run(ARGS(out), { SHARDSHIFT_TEST_KILL_BEFORE_COMMIT: '1' });
  assert.equal(killed.signal, 'SIGKILL');
  assert.ok(!existsSync(out) && existsSync(`${out}.partial`), 'a complete result waits in .partial');
  const resumed = await run(ARGS(out));
  assert.equal(resumed.code, 0, resumed.stderr);
  assert.ok(!existsSync(`${out}.partial`));
  assert.deepEqual(await tree(out), want);
  assert.equal((await run(['verify', out])).code, 0);
});

test('<out>.lock: a run into an output another live run holds is refused; a lock left by a dead run is taken over (issue 16, defect 8)', async () => {
  const out = join(tmp, 'locked');
  await writeFile(`${out}.lock`, JSON.stringify({ pid: process.pid, host: hostname(), started: 'now' }));
  const r = await run(ARGS(out));
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, new RegExp(`locked is being written by another run \\(process ${process.pid} on `));
  assert.ok(!existsSync(out) && !existsSync(`${out}.partial`));
  // A dead holder (a finished child's pid) on this host: stale.
  const dead = await new Promise<number>((res) => {
    const c = execFile(process.execPath, ['-e', '0'], () => res(c.pid!));
  });
  await writeFile(`${out}.lock`, JSON.stringify({ pid: dead, host: hostname(), started: 'then' }));
  const ok = await run(ARGS(out));
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok(!existsSync(`${out}.lock`), 'the lock is released');
});

test('two runs started together into one output: one writes it, the other is refused while the first holds the lock', async () => {
  const out = join(tmp, 'race');
  const [a, b] = await Promise.all([run(ARGS(out)), run(ARGS(out))]);
  const codes = [a.code, b.code].sort();
  // Either the second started after the first finished (then it finds the output and is refused
  // too), or it found the lock: never two writers.
  assert.deepEqual(codes, [0, 2], `${a.stderr}\n${b.stderr}`);
  assert.match(a.code === 2 ? a.stderr : b.stderr, /being written by another run|already exists/);
  assert.equal((await run(['verify', out])).code, 0);
});

test('a source rewritten in place during the run fails clearly and commits nothing (issue 16, defect 9)', async () => {
  const src = join(tmp, 'changing');
  await cp(example, src, { recursive: true });
  const out = join(tmp, 'changing-out');
  const running = run(ARGS(out).map((a) => (a === example ? src : a)), { SHARDSHIFT_TEST_PAUSE_BEFORE_COMMIT_MS: '3000' });
  // Change the source in the pause before the commit: every file (and the manifest) is written,
  // so the run has read all of its source. (Waiting only for the lock raced the run's reads on a
  // loaded machine: the rewrite's truncation was read as a truncated file, another clear error.)
  for (let i = 0; i < 400 && !existsSync(join(`${out}.partial`, 'shardshift-manifest.json')); i++) await new Promise((r) => setTimeout(r, 25));
  assert.ok(existsSync(`${out}.lock`), 'the run is still in its pause before the commit');
  const f = join(src, 'model.safetensors');
  const bytes = await readFile(f);
  bytes[bytes.length - 1] = bytes.at(-1)! ^ 1;
  await writeFile(f, bytes); // same size, in place
  const r = await running;
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /model\.safetensors changed while it was being converted \(size \d+, mtime \d+, inode \d+ → size \d+, mtime \d+, inode \d+\); nothing was written/);
  assert.ok(!existsSync(out) && !existsSync(`${out}.partial`) && !existsSync(`${out}.lock`));
});
