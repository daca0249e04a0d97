/**
 * The cluster path on a real Slurm (issue 18): `npm test` installs slurm-wlm and munge when
 * missing, starts a private controller and node (scripts/slurm.mjs) and stops it at the end;
 * these tests submit to it with sbatch/srun exactly as a user on a login node would.
 *
 * - a 4-part `--batch` run: byte-identical to the single-process run, the finalize job starts
 *   only after every part ended;
 * - `scancel` of one part mid-run: finalize refuses naming it, the finalize job is cancelled by
 *   Slurm, and resubmitting that part alone (`--part i/n --batch`) completes identically;
 * - `-r` (attached): the parts as one srun, the combined progress printed;
 * - the reference docs' `steps run convert/megatron_to_hf -c default --batch slurm_convert_model …`
 *   verbatim;
 * - `iterations=all` over a run with three saves: one array task per checkpoint, a summary job,
 *   and a second invocation that skips all three; the same attached (`-r`), one srun task each.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { runCli } from '../helpers/cli.js';
import { outputDigest } from '../helpers/tree.js';
import { makeRunDir } from '../helpers/run-dir.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
const live = process.env.SHARDSHIFT_TEST_SLURM === '1' && !!process.env.SLURM_CONF;
const skip = live ? false : 'needs the private Slurm that `npm test` starts (scripts/slurm.mjs); run the suite with npm test';
let tmp: string;
let env: string;

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-slurm-'));
  env = join(tmp, 'env.toml');
  // A conversion profile as Nemotron generates it (one 8-GPU node, 2 h), plus what a part asks for here.
  await writeFile(env, '[slurm_convert_model]\nexecutor = "slurm"\npartition = "cpu"\nnodes = 1\nntasks_per_node = 8\ngpus_per_node = 8\ntime = "02:00:00"\ncpus_per_part = 1\nmem_per_part = "512M"\n');
});
after(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

function sh(cmd: string, args: readonly string[]): Promise<string> {
  return new Promise((res, rej) => execFile(cmd, args, { encoding: 'utf8' }, (err, stdout, stderr) => (err ? rej(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`)) : res(stdout))));
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, seconds = 120): Promise<T> {
  const end = Date.now() + seconds * 1000;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${seconds} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** Every record `scontrol show job` has for a job id (an array job: one per task). */
async function jobs(id: string): Promise<Array<Record<string, string>>> {
  const out = await sh('scontrol', ['show', 'job', '-o', id]);
  return out
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((l) => Object.fromEntries(l.split(/\s+/).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)])));
}

const ended = (j: Record<string, string>): boolean => !['PENDING', 'RUNNING', 'CONFIGURING', 'COMPLETING'].includes(j.JobState ?? '');

async function waitJobsEnded(id: string): Promise<Array<Record<string, string>>> {
  return waitFor(`job ${id} to end`, async () => {
    const js = await jobs(id);
    return js.length && js.every(ended) ? js : undefined;
  });
}

function ids(stdout: string): { parts: string; final: string } {
  const m = /(?:parts|array) job (\d+) .*?(?:finalize|summary) job (\d+)/.exec(stdout);
  assert.ok(m, `job ids in: ${stdout}`);
  return { parts: m[1]!, final: m[2]! };
}

/** HF → Megatron in 8 .distcp files: enough files to deal into 4 parts of 2. */
const toMegatron = (out: string): string[] => ['convert', '--to', 'megatron', '--dcp-files', '8', example, out];

test('a 4-part --batch run is byte-identical to the single-process run; its finalize job starts only after every part ended', { skip }, async () => {
  const single = join(tmp, 'single');
  assert.equal((await runCli([...toMegatron(single), '-q'])).code, 0);
  const out = join(tmp, 'batch4');
  const r = await runCli([...toMegatron(out), '--batch', 'slurm_convert_model', '--env', env, '--parts', '4']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /submitted .*batch4 in 4 parts: parts job \d+ \(array 0-3\), finalize job \d+/);
  assert.match(r.stderr, /asks for GPUs \(gpus_per_node 8\): shardshift needs none/);
  const { parts, final } = ids(r.stdout);
  const ps = await waitJobsEnded(parts);
  const [fin] = await waitJobsEnded(final);
  assert.equal(ps.length, 4);
  for (const p of ps) assert.equal(p.JobState, 'COMPLETED', JSON.stringify(p));
  assert.equal(fin!.JobState, 'COMPLETED');
  const lastPartEnd = Math.max(...ps.map((p) => Date.parse(p.EndTime!)));
  assert.ok(Date.parse(fin!.StartTime!) >= lastPartEnd, `finalize started ${fin!.StartTime}, after the last part ended (${ps.map((p) => p.EndTime).join(', ')})`);
  assert.deepEqual(await outputDigest(out), await outputDigest(single));
  assert.ok(!existsSync(`${out}.partial`));
  // The finalize job found the output finished by the last part.
  assert.match(await readFile(join(`${out}.slurm`, 'finalize.log'), 'utf8'), /already finalized/);
});

test('scancel of one part mid-run: finalize refuses naming it, Slurm cancels the finalize job; the part resubmitted alone completes identically', { skip }, async () => {
  const single = join(tmp, 'single');
  if (!existsSync(single)) assert.equal((await runCli([...toMegatron(single), '-q'])).code, 0);
  const out = join(tmp, 'cancelled');
  // Part 2 stops after its first file until a signal ends it (a test hook), so it is cancelled mid-part.
  const r = await runCli([...toMegatron(out), '-b', 'slurm_convert_model', '--env', env, '--parts', '4'], { SHARDSHIFT_TEST_HANG_PART: '2' });
  assert.equal(r.code, 0, r.stderr);
  const { parts, final } = ids(r.stdout);
  await waitFor('part 2 to hold one finished file', async () => {
    const st = await runCli(['status', out, '--json']);
    if (st.code !== 0) return undefined;
    const p2 = (JSON.parse(st.stdout) as { parts: Array<{ part: number; state: string; files?: number }> }).parts[2]!;
    return p2.state === 'running' && p2.files === 1 ? true : undefined;
  });
  await sh('scancel', [`${parts}_2`]);
  const ps = await waitJobsEnded(parts);
  assert.equal(ps.find((p) => p.ArrayTaskId === '2')!.JobState, 'CANCELLED');
  const [fin] = await waitJobsEnded(final);
  assert.equal(fin!.JobState, 'CANCELLED', 'a dependency that can never be met cancels the finalize job (--kill-on-invalid-dep)');
  assert.ok(!existsSync(out), 'nothing that looks done');
  const st = await runCli(['status', out]);
  assert.match(st.stdout, /part 2\/4 {2}interrupted 1\/2 files/);
  assert.match(await readFile(join(`${out}.slurm`, 'part-2.log'), 'utf8'), /interrupted; part 2\/4 kept 1 of its 2 finished files/);
  const refused = await runCli(['finalize', out]);
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /part 2\/4 was interrupted \(1 of 2 files done\)/);

  const again = await runCli([...toMegatron(out), '-b', 'slurm_convert_model', '--env', env, '--part', '2/4']);
  assert.equal(again.code, 0, again.stderr);
  assert.match(again.stdout, /submitted part 2\/4 of .*cancelled: parts job \d+ \(array 2\)/);
  const j = ids(again.stdout);
  await waitJobsEnded(j.parts);
  await waitJobsEnded(j.final);
  assert.match(await readFile(join(`${out}.slurm`, 'part-2.log'), 'utf8'), /\(1 kept from an interrupted run\).*it was the last part/);
  assert.deepEqual(await outputDigest(out), await outputDigest(single));
});

test('-r (attached): the parts run as one srun and the combined progress is printed until the output is finalized', { skip }, async () => {
  const single = join(tmp, 'single');
  if (!existsSync(single)) assert.equal((await runCli([...toMegatron(single), '-q'])).code, 0);
  const out = join(tmp, 'attached');
  // Two parts of one CPU each: an srun's tasks run at once, and this machine has two cores.
  const r = await runCli([...toMegatron(out), '-r', 'slurm_convert_model', '--env', env, '--parts', '2']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /^parts: 0\/2 done/m);
  assert.match(r.stderr, /^parts: 2\/2 done — finalized$/m);
  assert.match(r.stdout, /finalized .*attached \(2 parts, under srun; logs in .*attached\.slurm\)/);
  assert.deepEqual(await outputDigest(out), await outputDigest(single));
});

test('the reference docs\' command, verbatim with shardshift\'s name: steps run convert/megatron_to_hf -c default --batch slurm_convert_model …', { skip }, async () => {
  const meg = join(tmp, 'meg');
  assert.equal((await runCli(['convert', '--to', 'megatron', example, meg, '--iteration', '100', '-q'])).code, 0);
  const local = join(tmp, 'hf-local');
  const step = (hf: string): string[] => ['steps', 'run', 'convert/megatron_to_hf', '-c', 'default', `megatron_path=${meg}/iter_0000100`, `hf_model_id=${example}`, `hf_path=${hf}`];
  assert.equal((await runCli([...step(local), '-q'])).code, 0);
  const out = join(tmp, 'sft-hf');
  const r = await runCli(['steps', 'run', 'convert/megatron_to_hf', '-c', 'default', '--batch', 'slurm_convert_model', `megatron_path=${meg}/iter_0000100`, `hf_model_id=${example}`, `hf_path=${out}`], { SHARDSHIFT_ENV: env });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /in 1 part: parts job/);
  const j = ids(r.stdout);
  await waitJobsEnded(j.parts);
  const [fin] = await waitJobsEnded(j.final);
  assert.equal(fin!.JobState, 'COMPLETED');
  assert.deepEqual(await outputDigest(out), await outputDigest(local));
});

test('iterations=all over a run with three saves: one array task per checkpoint, a summary job; a second invocation skips all three', { skip }, async () => {
  const run = await makeRunDir(tmp, [100, 200, 300], 300);
  const hf = join(tmp, 'run-hf');
  const step = ['steps', 'run', 'convert/megatron_to_hf', '-c', 'default', `megatron_path=${run}`, 'iterations=all', `hf_model_id=${example}`, `hf_path=${hf}`];
  const r = await runCli([...step, '--batch', 'slurm_convert_model', '--env', env]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /submitted 3 checkpoints \(iterations 100, 200, 300\): array job \d+ \(one task per checkpoint, 0-2\), summary job \d+/);
  const j = ids(r.stdout);
  const tasks = await waitJobsEnded(j.parts);
  assert.deepEqual(tasks.map((t) => t.JobState), ['COMPLETED', 'COMPLETED', 'COMPLETED']);
  const [fin] = await waitJobsEnded(j.final);
  assert.equal(fin!.JobState, 'COMPLETED');
  const summary = await readFile(join(hf, 'shardshift-batch-logs', 'summary.log'), 'utf8');
  assert.match(summary, /0 converted, 3 skipped \(already finished\), 0 failed/);
  // Each output is what a single conversion of that iteration gives.
  for (const i of [100, 200, 300]) {
    const one = join(tmp, `one-${i}`);
    assert.equal((await runCli(['steps', 'run', 'convert/megatron_to_hf', '-c', 'default', `megatron_path=${run}/iter_0000${i}`, `hf_model_id=${example}`, `hf_path=${one}`, '-q'])).code, 0);
    assert.deepEqual(await outputDigest(join(hf, `iter_0000${i}`)), await outputDigest(one));
  }
  const second = await runCli(step);
  assert.equal(second.code, 0, second.stderr);
  assert.match(second.stdout, /iter_0000100 +skipped \(finished\)/);
  assert.match(second.stdout, /0 converted, 3 skipped \(already finished\), 0 failed/);

  // Attached (-r): one srun task per checkpoint (two, on this two-core node), then the table here.
  const hf2 = join(tmp, 'run-hf-attached');
  const att = await runCli(['steps', 'run', 'convert/megatron_to_hf', '-c', 'default', `megatron_path=${run}`, 'iterations=100,300', `hf_model_id=${example}`, `hf_path=${hf2}`, '-r', 'slurm_convert_model', '--env', env]);
  assert.equal(att.code, 0, att.stderr);
  assert.match(att.stdout, /iter_0000300 +skipped \(finished\)/);
  assert.deepEqual(await outputDigest(join(hf2, 'iter_0000300')), await outputDigest(join(hf, 'iter_0000300')));
});
