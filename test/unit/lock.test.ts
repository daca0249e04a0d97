/**
 * `<out>.lock` (io/lock.ts): written whole under a temp name and linked into place, so a run
 * killed at any moment leaves no lock or a complete one (an empty lock, left by a kill between
 * O_EXCL create and write, used to block every later run: seen as a flake of faults.test.ts).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { spawnSync } from 'node:child_process';
import { tmpdir, hostname } from 'node:os';
import { join } from 'node:path';
import { lockOutput } from '../../src/io/lock.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-lock-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** A pid that is certainly gone: a child that has exited. */
function deadPid(): number {
  return Number(spawnSync(process.execPath, ['-e', 'console.log(process.pid)'], { encoding: 'utf8' }).stdout.trim());
}

test('a lock holds its holder, complete; no temp is left; release removes it', async () => {
  const out = join(tmp, 'a');
  const l = await lockOutput(out);
  const h = JSON.parse(await readFile(`${out}.lock`, 'utf8')) as { pid: number; host: string };
  assert.equal(h.pid, process.pid);
  assert.equal(h.host, hostname());
  assert.deepEqual((await readdir(tmp)).filter((n) => n.startsWith('a.')), ['a.lock']);
  await assert.rejects(lockOutput(out), /is being written by another run \(process \d+ on /);
  await l.release();
  assert.deepEqual((await readdir(tmp)).filter((n) => n.startsWith('a.')), []);
});

test('a killed run\'s lock and its leftover temp are taken over and cleaned', async () => {
  const out = join(tmp, 'b');
  const dead = deadPid();
  await writeFile(`${out}.lock`, JSON.stringify({ pid: dead, host: hostname(), started: 'then' }));
  await writeFile(`${out}.lock.${dead}-0123abcd.tmp`, JSON.stringify({ pid: dead, host: hostname(), started: 'then' }));
  const l = await lockOutput(out);
  assert.deepEqual((await readdir(tmp)).filter((n) => n.startsWith('b.')), ['b.lock']);
  await l.release();
});

test('a planted symlink or a foreign file at <out>.lock is refused, never followed or overwritten', async () => {
  const out = join(tmp, 'c');
  const target = join(tmp, 'precious');
  await writeFile(target, 'keep me');
  await symlink(target, `${out}.lock`);
  await assert.rejects(lockOutput(out), /an unreadable lock file \(not written by shardshift\)/);
  assert.equal(await readFile(target, 'utf8'), 'keep me');
  await rm(`${out}.lock`);
  await writeFile(`${out}.lock`, '');
  await assert.rejects(lockOutput(out), /an unreadable lock file/);
});
