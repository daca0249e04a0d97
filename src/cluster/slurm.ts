/**
 * A partitioned run on Slurm: one `sbatch --array=0-(n-1)` job whose task i runs `--part i/n`
 * of the command, and a finalize job with `--dependency=afterok:<array job>` that runs
 * `shardshift finalize <out>` (a no-op when the last part already finalized). Slurm is the
 * scheduler; nothing here schedules. The parts need no GPU: a profile's GPU requests (Nemotron's
 * conversion profiles ask for 8) are dropped, and each task asks for CPUs and memory instead.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { delimiter, join } from 'node:path';
import { existsSync } from 'node:fs';
import { usage, badInput } from '../util/errors.js';
import type { Profile } from './profiles.js';

export interface ArraySubmission {
  /** The command of every part, without `--part` (argv after `shardshift`). */
  readonly argv: readonly string[];
  readonly out: string;
  readonly parts: number;
  /** The parts to run (a resubmission of some); all of them when absent. */
  readonly only?: readonly number[];
  /**
   * A batch of checkpoints instead of parts of one: task t runs `argv` with its `key=` argument
   * set to `values[t]` (a whole conversion each, no `--part`), and the job after them runs
   * `argv` as given, which finds every output finished and prints the summary table.
   */
  readonly batch?: { readonly key: string; readonly values: readonly string[] };
  /** Where the scripts and logs go (default `<out>.slurm`). */
  readonly logDir?: string;
  /** Per part, when neither the profile nor the flags say. */
  readonly cpusPerPart?: number;
  readonly memPerPart?: string;
  /** How a node runs shardshift: node binary and CLI script (absolute; on the shared file system). */
  readonly node: string;
  readonly cli: string;
  readonly cwd: string;
}

export interface RenderedJobs {
  readonly partsScript: string;
  readonly finalizeScript: string;
  readonly logDir: string;
  readonly notes: readonly string[];
}

const q = (s: string): string => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`);

/** What every part asks Slurm for, and how it starts shardshift (shared by sbatch and srun). */
interface PartLaunch {
  readonly cpus: number;
  readonly mem: string;
  readonly notes: string[];
  readonly env: string[];
  readonly startup: string[];
  readonly image?: string;
  readonly mounts: readonly string[];
  /** The shell command that runs shardshift with `args`. */
  readonly cmd: (args: readonly string[]) => string;
}

function partLaunch(p: Profile, s: ArraySubmission): PartLaunch {
  const v = p.values as Record<string, unknown>;
  const notes: string[] = [];
  if (v.gpus_per_node || v.gres) notes.push(`profile ${p.name} asks for GPUs (gpus_per_node ${String(v.gpus_per_node ?? '')}${v.gres ? `, gres ${String(v.gres)}` : ''}): shardshift needs none, so none are requested; each part asks for CPUs and memory instead`);
  if (v.ntasks_per_node && Number(v.ntasks_per_node) > 1) notes.push(`ntasks_per_node ${String(v.ntasks_per_node)} (torchrun's ranks) is not used: each part is one process`);
  if (p.ignored.length) notes.push(`Nemotron launcher keys not used (shardshift submits with sbatch from this machine): ${p.ignored.join(', ')}`);
  const cpus = s.cpusPerPart ?? (v.cpus_per_part as number | undefined) ?? (v.cpus_per_task as number | undefined) ?? 2;
  const mem = s.memPerPart ?? (v.mem_per_part as string | undefined) ?? (v.mem as string | undefined) ?? '4G';
  const env = Object.entries((v.env_vars as Record<string, unknown> | undefined) ?? {}).map(([k, x]) => `export ${k}=${q(String(x))}`);
  const startup = ((v.startup_commands as string[] | undefined) ?? []).filter(Boolean);
  // A profile's container image (Nemotron's is a NeMo image, without Node.js or shardshift) is
  // used only when the profile says the image has shardshift (`container = true`): the parts
  // then run `shardshift` inside it through pyxis, with the profile's mounts. Otherwise they run
  // this node and this shardshift, which must be on the nodes' shared file system.
  const image = v.container === true ? (v.container_image as string | undefined) : undefined;
  if (v.container === true && !image) throw usage(`profile ${p.name} (${p.file}): container = true needs container_image`);
  if (v.container_image && !image) notes.push(`container_image ${String(v.container_image)} is not used (set container = true in the profile if that image has shardshift): parts run ${s.node} ${s.cli} on the nodes`);
  const mounts = (v.mounts as string[] | undefined) ?? [];
  if (image) notes.push(`parts run shardshift in ${image} through pyxis (--container-image${mounts.length ? ', --container-mounts' : ''})`);
  const exe = image ? 'shardshift' : `${q(s.node)} ${q(s.cli)}`;
  return { cpus, mem, notes, env, startup, image, mounts, cmd: (args) => `${exe} ${args.map(q).join(' ')}` };
}

/**
 * An argument the shell expands per task: `pre` + `${expr}` + `post` (the task's part, or its
 * checkpoint of a batch). Marked with U+E000 (a private-use character no argument holds), so quoting leaves the
 * marks in one single-quoted word that `expandPerTask` turns into a double-quoted one.
 */
const perTask = (pre: string, expr: string, post = ''): string => `${pre}\uE000${expr}\uE000${post}`;
const expandPerTask = (line: string): string => line.replace(/'([^'\uE000]*)\uE000([^'\uE000]*)\uE000([^']*)'/g, (_m, pre: string, expr: string, post: string) => `"${pre}\${${expr}}${post}"`);

/** The arguments of task `$index` (a shell variable): its part, or its checkpoint of a batch. */
function taskArgs(s: ArraySubmission, index: string): { args: string[]; setup: string[] } {
  const quiet = s.argv.includes('-q') || s.argv.includes('--quiet') ? [] : ['-q'];
  if (!s.batch) return { args: [...s.argv, ...quiet, '--part', perTask('', index, `/${s.parts}`)], setup: [] };
  const { key, values } = s.batch;
  const args = s.argv.map((a) => (a.startsWith(`${key}=`) ? perTask(`${key}=`, `ITEMS[${index}]`) : a));
  return { args: [...args, ...quiet], setup: [`ITEMS=(${values.map(q).join(' ')})`] };
}

/** The array script and the one that runs after it (shown by a dry run, submitted by `submitArray`). */
export function renderSlurm(p: Profile, s: ArraySubmission): RenderedJobs {
  const v = p.values as Record<string, unknown>;
  const { cpus, mem, notes, env, startup, image, mounts, cmd } = partLaunch(p, s);
  const logDir = s.logDir ?? `${s.out}.slurm`;
  const head = (name: string): string[] => {
    const h = ['#!/bin/bash', `#SBATCH --job-name=${q(name)}`];
    if (v.account) h.push(`#SBATCH --account=${q(String(v.account))}`);
    if (v.partition) h.push(`#SBATCH --partition=${q(String(v.partition))}`);
    if (v.qos) h.push(`#SBATCH --qos=${q(String(v.qos))}`);
    if (v.time) h.push(`#SBATCH --time=${q(String(v.time))}`);
    if (v.constraint) h.push(`#SBATCH --constraint=${q(String(v.constraint))}`);
    h.push('#SBATCH --nodes=1', '#SBATCH --ntasks=1', `#SBATCH --chdir=${q(s.cwd)}`);
    return h;
  };
  // In a container, srun (inside the batch step) starts it through pyxis.
  const launch = (args: readonly string[]): string => (image ? `srun --container-image=${q(image)}${mounts.length ? ` --container-mounts=${q(mounts.join(','))}` : ''} ${cmd(args)}` : cmd(args));
  const task = taskArgs(s, 'SLURM_ARRAY_TASK_ID');
  const tasks = s.batch ? s.batch.values.length : s.parts;
  const partsScript = [
    ...head(s.batch ? 'shardshift-batch' : 'shardshift-parts'),
    `#SBATCH --array=${s.only ? s.only.join(',') : `0-${tasks - 1}`}`,
    `#SBATCH --cpus-per-task=${cpus}`,
    `#SBATCH --mem=${q(mem)}`,
    `#SBATCH --output=${q(join(logDir, s.batch ? 'task-%a.log' : 'part-%a.log'))}`,
    'set -euo pipefail',
    ...env,
    ...startup,
    ...task.setup,
    `exec ${expandPerTask(launch(task.args))}`,
    '',
  ].join('\n');
  const final = s.batch ? { name: 'shardshift-summary', log: 'summary.log', args: [...s.argv] } : { name: 'shardshift-finalize', log: 'finalize.log', args: ['finalize', '-q', s.out] };
  const finalizeScript = [...head(final.name), '#SBATCH --cpus-per-task=1', `#SBATCH --mem=${q(mem)}`, `#SBATCH --output=${q(join(logDir, final.log))}`, 'set -euo pipefail', ...env, `exec ${launch(final.args)}`, ''].join('\n');
  return { partsScript, finalizeScript, logDir, notes };
}

/** Where `cmd` is on the PATH of `env` (sbatch, srun, kubectl), if anywhere. */
export function onPath(cmd: string, env: NodeJS.ProcessEnv = process.env): string | undefined {
  for (const d of (env.PATH ?? '').split(delimiter)) if (d && existsSync(join(d, cmd))) return join(d, cmd);
  return undefined;
}

function sbatch(script: string, extra: readonly string[]): Promise<string> {
  return new Promise((res, rej) => {
    const child = execFile('sbatch', ['--parsable', ...extra, script], { encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) rej(badInput(`sbatch ${script} failed: ${(stderr || err.message).trim()}`, script));
      else res(stdout.trim().split(';')[0]!);
    });
    child.stdin?.end();
  });
}

/** Submits the parts and the finalize; returns their job ids. Refused before anything is written when sbatch is missing. */
export async function submitArray(p: Profile, s: ArraySubmission, jobs: RenderedJobs = renderSlurm(p, s), env: NodeJS.ProcessEnv = process.env): Promise<{ partsJob: string; finalizeJob: string; jobs: RenderedJobs }> {
  if (!onPath('sbatch', env)) throw usage(`profile ${p.name} runs on Slurm, but sbatch is not on PATH: run shardshift on a login node of the cluster (where sbatch works), or use --part i/n in jobs of your own`);
  await mkdir(jobs.logDir, { recursive: true });
  const partsPath = join(jobs.logDir, s.batch ? 'batch.sbatch' : 'parts.sbatch');
  const finPath = join(jobs.logDir, s.batch ? 'summary.sbatch' : 'finalize.sbatch');
  await writeFile(partsPath, jobs.partsScript, { mode: 0o755 });
  await writeFile(finPath, jobs.finalizeScript, { mode: 0o755 });
  const partsJob = await sbatch(partsPath, []);
  // A part that fails or is cancelled makes the dependency unsatisfiable: Slurm then cancels the
  // finalize instead of keeping it pending forever; a resubmitted part brings its own.
  const finalizeJob = await sbatch(finPath, [`--dependency=afterok:${partsJob}`, '--kill-on-invalid-dep=yes']);
  return { partsJob, finalizeJob, jobs };
}

/** Slurm's memory sizes (`4G`, `500M`, `4096` = MiB) in MiB. */
export function slurmMiB(mem: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)B?$/i.exec(mem.trim());
  if (!m) throw usage(`memory ${JSON.stringify(mem)}: expected a Slurm size such as 4G or 500M`);
  const scale = { K: 1 / 1024, M: 1, G: 1024, T: 1024 * 1024, '': 1 }[m[2]!.toUpperCase() as 'K' | 'M' | 'G' | 'T' | ''];
  return Math.max(1, Math.ceil(Number(m[1]) * scale));
}

/**
 * Attached mode: the parts as the tasks of one `srun` — a job step of the allocation this runs
 * in (`salloc`, or a batch script), or srun's own allocation when there is none. Task t runs
 * `--part t/n` (`$SLURM_PROCID`); each task's output goes to `<out>.slurm/part-<t>.log`.
 * Resolves with srun's exit code; `onTick` is called every second while it runs.
 */
export async function runAttached(p: Profile, s: ArraySubmission, onTick: () => Promise<void>, env: NodeJS.ProcessEnv = process.env): Promise<{ code: number; logDir: string; inAllocation: boolean }> {
  if (!onPath('srun', env)) throw usage(`profile ${p.name} runs on Slurm, but srun is not on PATH: run shardshift on a login node of the cluster, or use --part i/n in jobs of your own`);
  if (s.only && s.only.length !== 1) throw new Error('internal: attached mode runs all parts or one');
  const v = p.values as Record<string, unknown>;
  const { cpus, mem, env: exports, startup, image, mounts, cmd } = partLaunch(p, s);
  const logDir = s.logDir ?? `${s.out}.slurm`;
  await mkdir(logDir, { recursive: true });
  const tasks = s.only ? 1 : s.batch ? s.batch.values.length : s.parts;
  const task = s.only ? { args: [...s.argv.filter((a) => a !== '-q'), '-q', '--part', `${s.only[0]}/${s.parts}`], setup: [] } : taskArgs(s, 'SLURM_PROCID');
  const script = ['set -euo pipefail', ...exports, ...startup, ...task.setup, `exec ${expandPerTask(cmd(task.args))}`].join('\n');
  const inAllocation = !!env.SLURM_JOB_ID;
  const args = ['--job-name=shardshift-parts', `--ntasks=${tasks}`, `--cpus-per-task=${cpus}`, `--mem-per-cpu=${Math.ceil(slurmMiB(mem) / cpus)}M`, `--chdir=${s.cwd}`, `--output=${join(logDir, s.only ? `part-${s.only[0]}.log` : s.batch ? 'task-%t.log' : 'part-%t.log')}`, '--kill-on-bad-exit=0'];
  if (!inAllocation) for (const k of ['account', 'partition', 'qos', 'time', 'constraint'] as const) if (v[k]) args.push(`--${k}=${String(v[k])}`);
  if (image) args.push(`--container-image=${image}`, ...(mounts.length ? [`--container-mounts=${mounts.join(',')}`] : []));
  args.push('bash', '-c', script);
  const child = spawn('srun', args, { stdio: ['ignore', 'ignore', 'pipe'], env });
  let err = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err = (err + d).slice(-4000)));
  const done = new Promise<number>((res) => child.on('close', (c) => res(c ?? 1)));
  await onTick().catch(() => undefined);
  const timer = setInterval(() => void onTick().catch(() => undefined), 1000);
  try {
    const code = await done;
    await onTick().catch(() => undefined);
    if (code !== 0 && err.trim()) process.stderr.write(`\n${err.trim().split('\n').map((l) => `srun: ${l.replace(/^srun: /, '')}`).join('\n')}\n`);
    return { code, logDir, inAllocation };
  } finally {
    clearInterval(timer);
  }
}
