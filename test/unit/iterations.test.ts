/**
 * Batch conversion of many saves of one run (`convert/megatron_to_hf iterations=…`, issue 18):
 * which iterations each choice takes, one output per checkpoint, idempotent re-runs, a partial
 * output resumed, a bad checkpoint as one failed row while the others convert, and the summary.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile, mkdir, readdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { runCli } from '../helpers/cli.js';
import { outputDigest } from '../helpers/tree.js';
import { makeRunDir } from '../helpers/run-dir.js';
import { parseIterations, selectIterations } from '../../src/plan/iterations.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
let run: string;

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-iters-'));
  run = await makeRunDir(tmp, [100, 200, 300], 200);
  // Not checkpoints: an empty save and an unrelated folder.
  await mkdir(join(run, 'iter_0000400'));
  await mkdir(join(run, 'logs'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('iterations=: all, latest (the tracker\'s), every:N, a list; bad specs and missing iterations named', async () => {
  const pick = async (s: string): Promise<number[]> => (await selectIterations(run, parseIterations(s))).map((i) => i.iteration);
  assert.deepEqual(await pick('all'), [100, 200, 300], 'iter_0000400 holds no checkpoint');
  assert.deepEqual(await pick('latest'), [200], 'the tracker names the latest finished save');
  assert.deepEqual(await pick('every:200'), [200]);
  assert.deepEqual(await pick('every:100'), [100, 200, 300]);
  assert.deepEqual(await pick('300,100'), [100, 300]);
  assert.deepEqual(await pick('iter_0000300'), [300]);
  assert.throws(() => parseIterations('every:0'), /every:N needs N ≥ 1/);
  assert.throws(() => parseIterations('some'), /expected all, latest, every:N/);
  await assert.rejects(pick('100,500'), /has no iter_0000500 \(it has iter_0000100, iter_0000200, iter_0000300\)/);
  await assert.rejects(pick('every:7'), /none of .* is a multiple of 7/);
  await assert.rejects(selectIterations(join(tmp, 'm100'), { kind: 'all' }), /holds none/);
});

const step = (extra: string[]): string[] => ['steps', 'run', 'convert/megatron_to_hf', '-c', 'default', `megatron_path=${run}`, `hf_model_id=${example}`, ...extra];

test('iterations=all: one output per checkpoint, each what a single conversion gives; a second run skips all; a removed output is redone', async () => {
  const hf = join(tmp, 'hf');
  const r = await runCli(step(['iterations=all', `hf_path=${hf}`]));
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /3 checkpoints\ncheckpoint +result +written +time +output\n/);
  assert.match(r.stdout, /iter_0000100 +converted +\d/);
  assert.match(r.stdout, /3 converted, 0 skipped \(already finished\), 0 failed/);
  assert.deepEqual((await readdir(hf)).sort(), ['iter_0000100', 'iter_0000200', 'iter_0000300']);
  const one = join(tmp, 'one-200');
  assert.equal((await runCli(['steps', 'run', 'convert/megatron_to_hf', '-c', 'default', `megatron_path=${run}/iter_0000200`, `hf_model_id=${example}`, `hf_path=${one}`, '-q'])).code, 0);
  assert.deepEqual(await outputDigest(join(hf, 'iter_0000200')), await outputDigest(one));

  const again = await runCli(step(['iterations=all', `hf_path=${hf}`]));
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, /0 converted, 3 skipped \(already finished\), 0 failed/);

  await rm(join(hf, 'iter_0000300'), { recursive: true });
  const third = await runCli(step(['iterations=all', `hf_path=${hf}`]));
  assert.match(third.stdout, /iter_0000300 +converted/);
  assert.match(third.stdout, /1 converted, 2 skipped \(already finished\), 0 failed/);

  const json = await runCli(step(['iterations=100,300', `hf_path=${hf}`, '--json']));
  assert.equal(json.code, 0, json.stderr);
  const rows = (JSON.parse(json.stdout) as { batch: Array<{ checkpoint: string; outcome: string }> }).batch;
  assert.deepEqual(rows.map((x) => [x.checkpoint, x.outcome]), [['iter_0000100', 'reused'], ['iter_0000300', 'reused']]);
});

test('an interrupted checkpoint is resumed; a bad checkpoint is one failed row (exit 1) and the others still convert', async () => {
  const hf = join(tmp, 'hf-kill');
  // Killed after the first file of the first checkpoint: its partial is resumed next time.
  const killed = await runCli(step(['iterations=100,200', `hf_path=${hf}`, '-q']), { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' });
  assert.equal(killed.signal, 'SIGKILL');
  const bad = join(tmp, 'run');
  await writeFile(join(bad, 'iter_0000300', '.metadata'), 'not a DCP metadata pickle');
  const r = await runCli(step(['iterations=all', `hf_path=${hf}`]));
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stdout, /iter_0000300 +FAILED/);
  assert.match(r.stdout, /2 converted, 0 skipped \(already finished\), 1 failed/);
  assert.match(r.stderr, /shardshift: error: iter_0000300: .*\.metadata/);
  assert.ok(existsSync(join(hf, 'iter_0000100', 'shardshift-manifest.json')) && existsSync(join(hf, 'iter_0000200', 'shardshift-manifest.json')));
  assert.ok(!existsSync(join(hf, 'iter_0000300')));
});
