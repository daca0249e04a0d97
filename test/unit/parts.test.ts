/**
 * Partitioned runs (`--part i/n`, `finalize`, `status`; issue 18): parts written in any order,
 * by separate processes, give the bytes of a single-process run of the same command; a killed
 * part resumes; finalize refuses while a part is missing, interrupted or tampered with, and names
 * it; bad input is one message, exit 2, nothing written.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, readdir, rm, writeFile, stat } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { runCli } from '../helpers/cli.js';
import { outputDigest } from '../helpers/tree.js';
import { assignParts, parsePart } from '../../src/exec/parts.js';
import type { OutputFile } from '../../src/lazy/types.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-parts-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** A reshard into many small shards: enough files to deal out. */
const reshard = (out: string): string[] => ['convert', '--to', 'safetensors', '--shard-size', '12KB', '-q', example, out];

async function manifestFiles(dir: string): Promise<unknown> {
  return (JSON.parse(await readFile(join(dir, 'shardshift-manifest.json'), 'utf8')) as { files: unknown }).files;
}

test('4 parts run out of order give the bytes and manifest records of a single-process run; the last part finalizes', async () => {
  const single = join(tmp, 'single');
  assert.equal((await runCli(reshard(single))).code, 0);
  const out = join(tmp, 'parted');
  for (const i of [3, 1, 0]) {
    const r = await runCli([...reshard(out), '--part', `${i}/4`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`part ${i}/4 of .*parted: \\d+ files?, .* parts done`));
    assert.ok(!existsSync(out), 'nothing that looks done before every part has run');
  }
  const st = await runCli(['status', out, '--json']);
  assert.equal(st.code, 0, st.stderr);
  const parts = (JSON.parse(st.stdout) as { parts: Array<{ part: number; state: string; bytesTotal?: number }> }).parts;
  assert.deepEqual(parts.map((p) => p.state), ['done', 'done', 'not-run', 'done']);
  const last = await runCli([...reshard(out), '--part', '2/4']);
  assert.equal(last.code, 0, last.stderr);
  assert.match(last.stdout, /it was the last part: checked all 4 parts and finalized/);
  assert.deepEqual(await outputDigest(out), await outputDigest(single));
  assert.deepEqual(await manifestFiles(out), await manifestFiles(single));
  assert.ok(!(await readdir(out)).some((n) => n.startsWith('.shardshift')), 'no part records or locks in the finished output');
  assert.ok(!existsSync(`${out}.partial`));
  // The dependency job of a --batch run finds it done: not an error.
  const fin = await runCli(['finalize', out]);
  assert.equal(fin.code, 0, fin.stderr);
  assert.match(fin.stdout, /already finalized/);
});

test('the split is by bytes, deterministic, and leaves the plan-bytes-only files (indexes) to the finalize', () => {
  const f = (relPath: string, size: number, data = true): OutputFile => ({ relPath, size, parts: data ? [{ kind: 'tensor' } as never] : [new Uint8Array(size)] });
  const files = [f('a', 100), f('b', 90), f('c', 50), f('d', 40), f('e', 30), f('index.json', 2, false)];
  const a = assignParts(files, 2);
  assert.deepEqual(a, assignParts([...files].reverse(), 2), 'the same plan splits the same way whatever its order');
  assert.equal(a.get('index.json'), 'final');
  const load = [0, 0];
  for (const x of files) if (a.get(x.relPath) !== 'final') load[a.get(x.relPath) as number]! += x.size;
  assert.ok(Math.abs(load[0]! - load[1]!) <= 100, `balanced: ${load}`);
  assert.deepEqual(parsePart('3/4'), { index: 3, count: 4 });
  for (const bad of ['4/4', '5/4', '0/0', '-1/4', '1', 'a/b']) assert.throws(() => parsePart(bad), /--part/);
});

test('a part killed mid-run: status says interrupted, finalize refuses naming it, re-running the part resumes and the result is identical', async () => {
  const single = join(tmp, 'single2');
  const base = ['convert', '--to', 'megatron', '--ckpt-format', 'torch', '--tp', '2', '--pp', '2', '-q', example];
  assert.equal((await runCli([...base, single])).code, 0);
  const out = join(tmp, 'killed');
  assert.equal((await runCli([...base, out, '--part', '0/2'])).code, 0);
  const killed = await runCli([...base, out, '--part', '1/2'], { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' });
  assert.equal(killed.signal, 'SIGKILL');
  const st = await runCli(['status', out]);
  assert.match(st.stdout, /part 1\/2 {2}interrupted/);
  const fin = await runCli(['finalize', out]);
  assert.equal(fin.code, 2);
  assert.match(fin.stderr, /part 1\/2 was interrupted \(1 of 2 files done\).*--part 1\/2/);
  assert.ok(!existsSync(out));
  const again = await runCli([...base, out, '--part', '1/2']);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, /1 kept from an interrupted run.*finalized/);
  assert.deepEqual(await outputDigest(out), await outputDigest(single));
});

test('finalize checks each part\'s files: one altered after its part finished is named', async () => {
  const out = join(tmp, 'tampered');
  for (const i of [0, 1]) assert.equal((await runCli([...reshard(out), '--part', `${i}/3`])).code, 0);
  const rec = JSON.parse(await readFile(join(`${out}.partial`, '.shardshift-part-1.json'), 'utf8')) as { files: Record<string, unknown> };
  const victim = Object.keys(rec.files)[0]!;
  const p = join(`${out}.partial`, victim);
  const bytes = await readFile(p);
  bytes[bytes.length - 1]! ^= 1;
  await writeFile(p, bytes);
  const r = await runCli([...reshard(out), '--part', '2/3']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, new RegExp(`${victim.replace('.', '\\.')} \\(part 1/3\\) no longer holds what the part wrote`));
  assert.ok(!existsSync(out), 'not finalized');
});

test('bad input: one message, exit 2, nothing written', async () => {
  const out = join(tmp, 'bad');
  const r1 = await runCli([...reshard(out), '--part', '5/4']);
  assert.equal(r1.code, 2);
  assert.match(r1.stderr, /--part 5\/4: there is no part 5 of 4/);
  assert.ok(!existsSync(`${out}.partial`));
  // Parts of a different plan into the same partial.
  assert.equal((await runCli([...reshard(out), '--part', '0/2'])).code, 0);
  const other = await runCli(['convert', '--to', 'safetensors', '--shard-size', '20KB', '-q', example, out, '--part', '1/2']);
  assert.equal(other.code, 2);
  assert.match(other.stderr, /holds parts of a different plan .* in 2 parts/);
  const count = await runCli([...reshard(out), '--part', '1/3']);
  assert.equal(count.code, 2);
  assert.match(count.stderr, /different plan/);
  // A single-process run into it is refused too.
  const whole = await runCli(reshard(out));
  assert.equal(whole.code, 2);
  // finalize on a directory that is not a partitioned run.
  const nothing = await runCli(['finalize', join(tmp, 'never')]);
  assert.equal(nothing.code, 2);
  assert.match(nothing.stderr, /is not a partitioned run/);
  // One file cannot be split.
  const file = await runCli(['convert', '--to', 'safetensors', '-q', join(example, 'model.safetensors'), join(tmp, 'one.safetensors'), '--part', '0/2']);
  assert.equal(file.code, 2);
  assert.match(file.stderr, /one file/);
  assert.ok(!existsSync(join(tmp, 'one.safetensors.partial')));
  assert.equal((await stat(`${out}.partial`)).isDirectory(), true);
});
