/**
 * Issue 16, defect 10: filesystem errors are one readable message naming the path and what to
 * do, never Node's bare "ENOSPC: no space left on device, write", and a failed single-file output
 * leaves no `<out>.partial`. A full disk is a real one: a small tmpfs mounted by the test (it
 * needs the privilege to mount; without it the test says so and is skipped).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
let small: string;
let mounted = false;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-disk-'));
  small = join(tmp, 'small');
  await mkdir(small);
  mounted = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=32k', 'tmpfs', small]).status === 0;
});
after(async () => {
  if (mounted) spawnSync('umount', [small]);
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((res) => execFile(process.execPath, [cli, ...args], (err, _o, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr })));
}

test('ENOSPC on a single-file output: one line naming the file and what to do, nothing left behind', async (t) => {
  if (!mounted) return t.skip('cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)');
  const out = join(small, 'model.pt');
  const r = await run(['convert', '--to', 'torch', join(example, 'model.safetensors'), out]);
  assert.equal(r.code, 1, r.stderr);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0]!, /^shardshift: error: .*small\/model\.pt\.partial: no space left on the device; free space or choose another output path, then re-run \(ENOSPC in write\)$/);
  assert.deepEqual(await readdir(small), [], 'no .partial, no lock');
});

test('ENOSPC in a directory output: the message names the file; nothing that looks done', async (t) => {
  if (!mounted) return t.skip('cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)');
  const out = join(small, 'meg');
  const r = await run(['convert', '--to', 'megatron', example, out, '-q']);
  assert.equal(r.code, 1, r.stderr);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0]!, /small\/meg\.partial\/.*: no space left on the device/);
  assert.ok(!(await readdir(small)).includes('meg'), 'no output that looks done');
  assert.ok(!(await readdir(small)).includes('meg.lock'), 'the lock is released');
});

test('a model directory the user may not read: one line naming it (permission denied), not a misleading "config.json missing"', async (t) => {
  if (spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'true']).status !== 0) return t.skip('setpriv cannot switch to an unprivileged user here');
  const { chmod } = await import('node:fs/promises');
  await chmod(tmp, 0o755);
  const locked = join(tmp, 'locked-model');
  await mkdir(locked, { mode: 0o700 });
  const r = await new Promise<{ code: number; stderr: string }>((res) =>
    execFile('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, cli, 'convert', '--to', 'megatron', locked, join(tmp, 'never')], (err, _o, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr })),
  );
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /^shardshift: error: \S*locked-model: permission denied/);
});
