/**
 * Progress, interruption and resumption as a user sees them (issue 21): the TTY display through a
 * real pseudo-terminal (`script`), the rate meter and clock, `--json` events with a final `done`,
 * Ctrl-C's message (what was kept, how to resume; a single file leaves nothing), and the note of
 * a resumed run and of a dry run that would resume.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { cli, runCli } from '../helpers/cli.js';
import { RateMeter, clock } from '../../src/cli/progress.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-progress-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const run = runCli;

test('clock is h:mm:ss; the rate meter says nothing until it knows, then the smoothed rate', () => {
  assert.equal(clock(0), '0:00');
  assert.equal(clock(59.6), '1:00');
  assert.equal(clock(3725), '1:02:05');
  const m = new RateMeter();
  assert.equal(m.sample(0, 0), undefined);
  assert.equal(m.sample(0.1, 10_000_000), undefined, 'no rate from the first 0.1 s (it was ETA 107311s)');
  let r: number | undefined;
  for (let t = 0.2; t <= 10; t += 0.1) r = m.sample(t, 100e6 * t);
  assert.ok(r !== undefined && Math.abs(r - 100e6) / 100e6 < 0.05, `steady 100 MB/s read as ${r}`);
});

test('the TTY display (a pseudo-terminal): opening first, percent, h:mm:ss ETA, no raw floats, the finishing phase', (t) => {
  if (spawnSync('script', ['--version']).status !== 0) return t.skip('no script(1) for a pseudo-terminal');
  const out = join(tmp, 'tty-meg');
  const r = spawnSync('script', ['-qfec', `${process.execPath} ${cli} convert --to megatron ${example} ${out}`, '/dev/null'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stdout);
  const frames = r.stdout.split('\r\u001b[K').map((f) => f.trim()).filter(Boolean);
  assert.match(frames[0]!, /^opening \S+tiny-llama …$/);
  const progress = frames.filter((f) => /^\d+\.\d%/.test(f) && !f.includes('finishing'));
  assert.ok(progress.length > 0, r.stdout);
  for (const f of progress) {
    assert.match(f, /ETA (-:--|\d+:\d\d(:\d\d)?)/, f);
    assert.doesNotMatch(f, /\d\.\d{3,} ?B|ETA \d+s/, f);
  }
  assert.ok(frames.some((f) => /finishing: fsync, manifest, rename into place/.test(f)), 'the finishing phase is shown');
  assert.match(frames[frames.length - 1]!, /^wrote \S+tty-meg: 5 files/);
});

test('--json: status, progress with phase, rate and ETA, and a final done event; stderr is JSON lines only', async () => {
  const r = await run(['convert', '--json', '--to', 'megatron', example, join(tmp, 'json-meg')]);
  assert.equal(r.code, 0, r.stderr);
  const events = r.stderr.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.equal(events[0]!.event, 'status');
  const last = events[events.length - 1]!;
  assert.deepEqual(Object.keys(last).sort(), ['bytesReused', 'bytesWritten', 'event', 'filesReused', 'outcome', 'seconds']);
  assert.equal(last.event, 'done');
  assert.equal(last.outcome, 'written');
  const p = events.filter((e) => e.event === 'progress');
  assert.ok(p.length > 0);
  for (const e of p) for (const k of ['phase', 'file', 'bytesDone', 'bytesTotal', 'bytesReused', 'filesReused', 'rate', 'etaSeconds']) assert.ok(k in e, `progress event has ${k}`);
  assert.equal(p[p.length - 1]!.phase, 'finishing');
});

test('a resumed run says what it kept; a dry run says it would resume', async () => {
  const out = join(tmp, 'resumed');
  const args = ['convert', '--to', 'megatron', '--dcp-files', '4', example, out];
  assert.equal((await run(args, { SHARDSHIFT_TEST_KILL_AFTER_FILES: '2' })).signal, 'SIGKILL');
  const dry = await run([...args, '--dry-run']);
  assert.equal(dry.code, 0, dry.stderr);
  assert.match(dry.stdout, /resumed\.partial holds an interrupted run \(2 finished files\): running this command resumes it if it is the same conversion/);
  const r = await run(args);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /resumed \S+resumed\.partial: kept 2 finished files \([\d.]+ KiB\) of the interrupted run, wrote the rest/);
});

/** Starts a run that pauses before its commit, sends it SIGINT in the pause, returns its stderr. */
async function interrupted(args: string[]): Promise<{ code: number | null; stderr: string }> {
  const child = spawn(process.execPath, [cli, ...args], { env: { ...process.env, SHARDSHIFT_TEST_PAUSE_BEFORE_COMMIT_MS: '4000' } });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
  await new Promise((r) => setTimeout(r, 1500));
  child.kill('SIGINT');
  return { code: await exited, stderr };
}

test('Ctrl-C: says what it kept and how to resume (exit 130, lock released); a single-file output leaves nothing', async () => {
  const out = join(tmp, 'ctrlc');
  const r = await interrupted(['convert', '-q', '--to', 'megatron', example, out]);
  assert.equal(r.code, 130, r.stderr);
  assert.match(r.stderr, /^shardshift: interrupted; kept \S+ctrlc\.partial \(5 of 5 files finished\) — re-run the same command to resume$/m);
  assert.ok(existsSync(`${out}.partial`) && !existsSync(`${out}.lock`) && !existsSync(out));
  const again = await run(['convert', '-q', '--to', 'megatron', example, out]);
  assert.equal(again.code, 0, again.stderr);
  assert.ok(existsSync(out) && !existsSync(`${out}.partial`));
  const file = join(tmp, 'ctrlc.safetensors');
  const s = await interrupted(['convert', '-q', '--to', 'safetensors', join(example, 'model.safetensors'), file]);
  assert.equal(s.code, 130, s.stderr);
  assert.match(s.stderr, /interrupted; \S+ctrlc\.safetensors was not written \(a single file is not resumable\) and nothing is left behind/);
  assert.ok(!existsSync(file) && !existsSync(`${file}.partial`) && !existsSync(`${file}.lock`));
});

test('verify and diff show their progress on a terminal: the stage, percent and the file or tensor (a pseudo-terminal)', (t) => {
  if (spawnSync('script', ['--version']).status !== 0) return t.skip('no script(1) for a pseudo-terminal');
  const meg = join(tmp, 'tty-meg');
  if (!existsSync(meg)) assert.equal(spawnSync(process.execPath, [cli, 'convert', '-q', '--to', 'megatron', example, meg]).status, 0);
  const v = spawnSync('script', ['-qfec', `${process.execPath} ${cli} verify ${meg} --against ${example}`, '/dev/null'], { encoding: 'utf8' });
  assert.equal(v.status, 0, v.stdout);
  const vf = v.stdout.split('\r\u001b[K').map((f) => f.trim());
  assert.ok(vf.some((f) => /^checksums: \d+\.\d% {2}.* iter_0000000\//.test(f)), v.stdout);
  assert.ok(vf.some((f) => /^NaN\/Inf scan: \d+\.\d%/.test(f)), v.stdout);
  assert.ok(vf.some((f) => /^comparing with the source: \d+\.\d%/.test(f)), v.stdout);
  const d = spawnSync('script', ['-qfec', `${process.execPath} ${cli} diff ${example} ${meg}`, '/dev/null'], { encoding: 'utf8' });
  assert.equal(d.status, 0, d.stdout);
  assert.ok(d.stdout.split('\r\u001b[K').some((f) => /^comparing: \d+\.\d%/.test(f.trim())), d.stdout);
  assert.match(d.stdout, /21 tensors compared: 21 identical/);
});
