/**
 * Issue 16, defect 1: a link planted where shardshift writes never redirects a write. Before the
 * fix, a symlink at `<out>.partial` pointing at the source truncated and destroyed the source
 * checkpoint; a hard link did the same; a linked `.partial` directory sent a directory output
 * into the link's target.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, link, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, symlink, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { cli } from '../helpers/cli.js';

const golden = join(repoRoot, 'test', 'fixtures', 'golden');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-links-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((res) => execFile(process.execPath, [cli, ...args], (err, _o, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr })));
}
const sha = async (p: string): Promise<string> => createHash('sha256').update(await readFile(p)).digest('hex');

test('a symlink at <out>.partial pointing at the source: the source is untouched, the link is replaced by the real output', async () => {
  const src = join(tmp, 'a.safetensors');
  await cp(join(golden, 'all_dtypes.safetensors'), src);
  const before = await sha(src);
  const out = join(tmp, 'a-out.pt');
  await symlink(src, `${out}.partial`);
  const r = await run(['convert', '--to', 'torch', src, out]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await sha(src), before, 'source unchanged');
  assert.ok((await lstat(out)).isFile(), 'the output is a regular file, not the planted link');
  assert.ok(!existsSync(`${out}.partial`));
});

test('a symlink at <out>.partial pointing elsewhere: that file is not overwritten', async () => {
  const src = join(golden, 'all_dtypes.safetensors');
  const victim = join(tmp, 'victim.txt');
  await writeFile(victim, 'precious');
  const out = join(tmp, 'b-out.pt');
  await symlink(victim, `${out}.partial`);
  const r = await run(['convert', '--to', 'torch', src, out]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await readFile(victim, 'utf8'), 'precious');
  assert.ok((await lstat(out)).isFile());
});

test('a hard link to the source at <out>.partial: the source keeps its bytes', async () => {
  const src = join(tmp, 'c.safetensors');
  await cp(join(golden, 'all_dtypes.safetensors'), src);
  const before = await sha(src);
  const out = join(tmp, 'c-out.pt');
  await link(src, `${out}.partial`);
  const r = await run(['convert', '--to', 'torch', src, out]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await sha(src), before);
});

test('a directory output whose .partial is a symlink (into the source) is refused, nothing written there', async () => {
  const src = join(tmp, 'd-src');
  await cp(join(golden, 'sharded'), src, { recursive: true });
  const listing = (await readdir(src)).sort();
  const out = join(tmp, 'd-out');
  await symlink(src, `${out}.partial`);
  const r = await run(['convert', '--to', 'safetensors', src, out, '--shard-size', '1KB']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /d-out\.partial is a symbolic link, not a shardshift partial output/);
  assert.deepEqual((await readdir(src)).sort(), listing, 'nothing added to the source');
  assert.equal(await readlink(`${out}.partial`), src, 'the link is left for the user to look at');
  assert.ok(!existsSync(out));
});

test('a symlink planted inside a resumable .partial directory is replaced, not written through', async () => {
  // A run killed after its first file leaves `.partial/` with a progress file; a link planted at
  // the next file's path must be replaced on resume, not followed.
  const src = join(golden, 'sharded');
  const out = join(tmp, 'e-out');
  const killed = await new Promise<number | null>((res) =>
    execFile(process.execPath, [cli, 'convert', '--to', 'safetensors', src, out, '--shard-size', '1KB'], { env: { ...process.env, SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' } }, (err) => res(err ? ((err as { signal?: string }).signal === 'SIGKILL' ? null : 1) : 0)),
  );
  assert.equal(killed, null, 'the first run was killed');
  const partial = `${out}.partial`;
  const names = (await readdir(partial)).filter((n) => n.endsWith('.safetensors'));
  assert.equal(names.length, 1, `one finished file: ${names.join(', ')}`);
  const next = names[0]!.replace(/^model-00001-/, 'model-00002-');
  const victim = join(tmp, 'victim2.txt');
  await writeFile(victim, 'precious');
  await symlink(victim, join(partial, next));
  const r = await run(['convert', '--to', 'safetensors', src, out, '--shard-size', '1KB']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await readFile(victim, 'utf8'), 'precious');
  assert.ok((await lstat(join(out, next))).isFile(), `${next} is a regular file`);
});

test('a hub-cache snapshot (every file a symlink into ../blobs): weights and side files all travel (issue 16, defect 5)', async () => {
  const repo = join(tmp, 'hub', 'models--x--y');
  const blobs = join(repo, 'blobs');
  const snap = join(repo, 'snapshots', 'abc123');
  await mkdir(blobs, { recursive: true });
  await mkdir(snap, { recursive: true });
  const files = await readdir(join(golden, 'sharded'));
  for (const [i, f] of files.entries()) {
    await cp(join(golden, 'sharded', f), join(blobs, `blob${i}`));
    await symlink(join('..', '..', 'blobs', `blob${i}`), join(snap, f));
  }
  await writeFile(join(blobs, 'gen'), '{"do_sample": false}\n');
  await symlink(join('..', '..', 'blobs', 'gen'), join(snap, 'generation_config.json'));
  const out = join(tmp, 'hub-out');
  const r = await run(['convert', '--to', 'safetensors', snap, out]);
  assert.equal(r.code, 0, r.stderr);
  const got = await readdir(out);
  assert.ok(got.includes('generation_config.json'), `side file copied: ${got.join(', ')}`);
  assert.equal(await readFile(join(out, 'generation_config.json'), 'utf8'), '{"do_sample": false}\n');
  assert.ok((await lstat(join(out, 'generation_config.json'))).isFile(), 'copied as a file, not a link');
});
