/**
 * `--part i/n` on every command that writes an output, and the two commands of a partitioned
 * run's end: `finalize` (check every part, write what depends on all, rename into place) and
 * `status` (every part's state, from the shared directory alone).
 */
import { Option, type Command } from 'commander';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes } from '../util/size.js';
import { badInput, usage } from '../util/errors.js';
import { parsePart, partResult, plannedOutputs, runPartitioned, type PlannedOutput } from '../exec/parts.js';
import { PARTS_NAME, partStates, readPartsRecord, partCommand, type PartStatus } from '../exec/part-output.js';
import { MANIFEST_NAME } from '../exec/manifest.js';
import type { ConvertResult } from '../plan/convert.js';
import { loadProfile, type Profile } from '../cluster/profiles.js';
import { renderSlurm, runAttached, submitArray, type ArraySubmission } from '../cluster/slurm.js';
import { applyParts, renderK8s } from '../cluster/k8s.js';

/** The command line being run (main sets it; `finalize` re-runs a recorded one). */
let commandLine: readonly string[] = [];
export function setCommandLine(argv: readonly string[]): void {
  commandLine = argv;
}

export const partOption = (): Option => new Option('--part <i/n>', 'write only part i of n of the output (0-based, as a Slurm array task id) into the shared <out>.partial; the last part to finish (or `shardshift finalize <out>`) completes it');

/** The cluster flags of a writing command (see `clusterOptions`). */
interface ClusterFlags {
  part?: string;
  batch?: string;
  run?: string;
  env?: string;
  parts?: string;
  cpusPerPart?: string;
  memPerPart?: string;
  dryRun?: boolean;
}

/** Flags that say how the command is run, not what it converts: left out of the parts' command line. */
const RUN_FLAGS = new Set(['--part', '-b', '--batch', '-r', '--run', '--env', '--parts', '--cpus-per-part', '--mem-per-part']);
const RUN_KEYS = /^(parts|cpus_per_part|mem_per_part)=/;

/** The command line without the flags (and step keys) that say how it runs. */
export function withoutRunFlags(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const eq = a.indexOf('=');
    if (RUN_FLAGS.has(a)) i++;
    else if (a.startsWith('--') && eq > 0 && RUN_FLAGS.has(a.slice(0, eq))) continue;
    else if (RUN_KEYS.test(a)) continue;
    else out.push(a);
  }
  return out;
}

/** The options `partitionable` reads, for `convert` and `steps run`. */
export function clusterOptions(c: Command): Command {
  return c
    .option('-b, --batch <profile>', 'detached: submit the conversion to the cluster profile (env.toml) as a job array of parts plus a finalize job, print the job ids; with --part i/n, resubmit that part alone')
    .option('-r, --run <profile>', 'attached: run the parts as one srun (a step of the current allocation, or its own) and print their combined progress until the output is finalized')
    .option('--env <file>', 'the env.toml holding the profiles (default: $SHARDSHIFT_ENV, $NEMOTRON_ENV_FILE, ./env.toml, ~/.config/shardshift/env.toml)')
    .option('--parts <n>', 'with -b/-r: how many parts (array tasks) to cut the output into (default: the profile\'s parts, else its nodes)')
    .option('--cpus-per-part <n>', 'with -b/-r: CPUs each part asks for (default: the profile\'s cpus_per_part or cpus_per_task, else 2)')
    .option('--mem-per-part <size>', 'with -b/-r: memory each part asks for, in Slurm\'s units (default: the profile\'s mem_per_part or mem, else 4G)');
}

/**
 * Wraps a command's action: with `--part`, the whole command runs as that part of its output;
 * with `-b/--batch` or `-r/--run`, it is planned here (a dry run: bad input stops it before
 * anything is submitted), then submitted to the profile's cluster as parts plus a finalize.
 */
export function partitionable<A extends unknown[]>(action: (...args: A) => Promise<void>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    const opts = args.find((a, i) => i === args.length - 2 && a !== null && typeof a === 'object') as ClusterFlags | undefined;
    if (opts?.batch || opts?.run) return submit(action, args, opts);
    if (!opts?.part) return action(...args);
    const part = parsePart(opts.part);
    return runPartitioned({ kind: 'part', part, argv: withoutRunFlags(commandLine), cwd: process.cwd() }, () => action(...args));
  };
}

function count(s: string | undefined, flag: string): number | undefined {
  if (s === undefined) return undefined;
  const n = Number(s);
  if (!Number.isInteger(n) || n < 1) throw usage(`${flag} ${s}: expected a whole number ≥ 1`);
  return n;
}

async function submit<A extends unknown[]>(action: (...args: A) => Promise<void>, args: A, f: ClusterFlags): Promise<void> {
  if (f.batch && f.run) throw usage('-b/--batch (detached) and -r/--run (attached) are alternatives: pass one');
  const name = (f.batch ?? f.run)!;
  const profile = await loadProfile(name, { envFile: f.env });
  // `parts=4` etc. as step keys (steps run), or the flags.
  const overrides = args.find((a) => Array.isArray(a)) as string[] | undefined;
  const keyed = (k: string): string | undefined => overrides?.find((o) => o.startsWith(`${k}=`))?.slice(k.length + 1);
  if (overrides) for (let i = overrides.length - 1; i >= 0; i--) if (RUN_KEYS.test(overrides[i]!)) overrides.splice(i, 1);
  const v = profile.values as Record<string, unknown>;
  // `--part i/n` with -b/-r resubmits that one part (a cancelled or failed array task).
  const one = f.part ? parsePart(f.part) : undefined;
  const asked = count(f.parts ?? keyed('parts'), '--parts');
  if (one && asked !== undefined && asked !== one.count) throw usage(`--part ${f.part} and --parts ${asked} disagree: a resubmitted part keeps its run's part count`);
  const parts = one?.count ?? asked ?? (v.parts as number | undefined) ?? (v.nodes as number | undefined) ?? 1;
  const cpusPerPart = count(f.cpusPerPart ?? keyed('cpus_per_part'), '--cpus-per-part');
  const memPerPart = f.memPerPart ?? keyed('mem_per_part');
  if (profile.executor !== 'slurm' && profile.executor !== 'k8s') {
    throw usage(`profile ${name} (${profile.file}) uses executor ${JSON.stringify(profile.executor)}, which shardshift cannot drive; use a slurm or k8s profile, or run \`--part i/n\` for i = 0…n-1 as jobs of that platform and \`shardshift finalize <out>\` after them`);
  }
  if (f.run && profile.executor !== 'slurm') throw usage(`-r/--run (attached) runs the parts under srun; profile ${name} uses executor ${profile.executor}: use -b/--batch`);
  // Plan here first: a bad source or flag stops before anything is submitted.
  const submitDry = !!f.dryRun;
  f.dryRun = true;
  // A submission prints its job ids, or (a dry run) its scripts or manifest, not the plan: a
  // printed manifest can be piped into `kubectl apply -f -`.
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = (() => true) as typeof process.stdout.write;
  let planned: readonly PlannedOutput[];
  try {
    planned = await runPartitioned({ kind: 'probe' }, async () => {
      await action(...args);
      return plannedOutputs();
    });
  } finally {
    process.stdout.write = write;
  }
  // A batch plans every checkpoint and lists the ones that failed (stderr) instead of stopping.
  if (process.exitCode) throw badInput('planning failed for the checkpoints named above: nothing submitted');
  const out = planned[0];
  if (!out) throw new Error('internal: the plan named no output');
  const argv = withoutRunFlags(commandLine).filter((a) => a !== '-d' && a !== '--dry-run');
  const common = { argv, cpusPerPart, memPerPart, node: process.execPath, cli: cliPath(), cwd: process.cwd() };
  let spec: ArraySubmission;
  let what: string;
  const iterations = keyed('iterations');
  if (iterations !== undefined) {
    // A batch of checkpoints (steps' iterations=): one array task per checkpoint, each a whole conversion.
    if (one || asked !== undefined) throw usage('iterations= converts each checkpoint as one array task: --part/--parts do not apply (resubmit one checkpoint with iterations=<its number>)');
    const values = planned.map((p) => /^iter_(\d+)$/.exec(basename(p.source))?.[1]).map((n, i) => {
      if (n === undefined) throw new Error(`internal: batch source ${planned[i]!.source} is not an iter_* directory`);
      return String(Number(n));
    });
    const parent = dirname(resolve(out.path));
    spec = { ...common, out: parent, parts: values.length, batch: { key: 'iterations', values }, logDir: join(parent, 'shardshift-batch-logs') };
    what = `${values.length} checkpoint${values.length === 1 ? '' : 's'} (iterations ${values.join(', ')})`;
  } else {
    if (planned.length > 1) throw usage(`-b/-r split one output into parts, and this command writes ${planned.length}; run them as separate commands`);
    if (out.kind !== 'dir') throw usage(`-b/-r split a directory output into parts; ${out.path} is one file — convert it with one job`);
    spec = { ...common, out: resolve(out.path), parts, only: one ? [one.index] : undefined };
    what = one ? `part ${one.index}/${parts} of ${spec.out}` : `${spec.out} in ${parts} part${parts === 1 ? '' : 's'}`;
  }
  if (profile.executor === 'k8s') return applyK8s(renderK8s(profile, spec), submitDry, what);
  const jobs = renderSlurm(profile, spec);
  for (const n of jobs.notes) process.stderr.write(`note: ${n}\n`);
  if (submitDry) {
    const [first, second] = spec.batch ? ['batch.sbatch', 'summary.sbatch'] : ['parts.sbatch', 'finalize.sbatch'];
    process.stdout.write(f.run ? `(attached: srun --ntasks=${one ? 1 : spec.batch ? spec.batch.values.length : parts} runs the tasks' command below, with $SLURM_PROCID for $SLURM_ARRAY_TASK_ID)\n` : '');
    process.stdout.write(`# ${jobs.logDir}/${first}\n${jobs.partsScript}\n# ${jobs.logDir}/${second} (--dependency=afterok:<array job>)\n${jobs.finalizeScript}(submission dry run: nothing submitted)\n`);
    return;
  }
  if (f.run) return attached(profile, spec, what);
  const r = await submitArray(profile, spec, jobs);
  if (spec.batch) {
    process.stdout.write(`submitted ${what}: array job ${r.partsJob} (one task per checkpoint, 0-${spec.batch.values.length - 1}), summary job ${r.finalizeJob} (after all succeed: checks every output and prints the table to ${join(r.jobs.logDir, 'summary.log')}); logs in ${r.jobs.logDir}\n`);
    return;
  }
  process.stdout.write(`submitted ${what}: parts job ${r.partsJob} (array ${one ? one.index : `0-${parts - 1}`}), finalize job ${r.finalizeJob} (after ${one ? 'it succeeds' : 'all parts succeed'}); logs in ${r.jobs.logDir}; watch with \`shardshift status ${spec.out}\`\n`);
}

/** The CLI script this process runs (what the nodes run too). */
function cliPath(): string {
  return fileURLToPath(new URL('./main.js', import.meta.url));
}

/** Prints the manifest; with kubectl on PATH (and not a dry run), applies it too. */
async function applyK8s(manifest: string, dry: boolean, what: string): Promise<void> {
  const r = dry ? undefined : await applyParts(manifest);
  if (!r) {
    process.stdout.write(manifest);
    if (!dry) process.stderr.write('note: kubectl is not on PATH: the manifest is printed, not applied (kubectl apply -f <it>; kubectl wait --for=condition=complete on the parts Job; then apply the finalize Job)\n');
    return;
  }
  process.stdout.write(`submitted ${what}: ${r.applied}\nwhen it completes (kubectl wait --for=condition=complete), apply the finalize Job, or run \`shardshift finalize\` where the volume is mounted:\n---\n${r.finalize}`);
}

/** One combined line of every part's state, from the shared directory. */
async function progressLine(out: string, parts: number, only?: readonly number[]): Promise<{ line: string; failed: PartStatus[] }> {
  const partial = `${out}.partial`;
  const n = only?.length ?? parts;
  if (!existsSync(partial) && existsSync(join(out, MANIFEST_NAME))) return { line: `parts: ${n}/${n} done — finalized`, failed: [] };
  const states = (existsSync(partial) ? await partStates(partial, parts) : []).filter((s) => !only || only.includes(s.part));
  const done = states.filter((s) => s.kind === 'done').length;
  const running = states.filter((s) => s.kind === 'running').length;
  const failed = states.filter((s) => s.kind === 'failed' || s.kind === 'interrupted');
  let bytes = 0;
  let total = 0;
  for (const s of states) {
    if (s.kind === 'missing') continue;
    bytes += s.kind === 'done' ? s.record.bytesTotal : s.record.bytesDone;
    total += s.record.bytesTotal;
  }
  const line = `parts: ${done}/${n} done, ${running} running${failed.length ? `, ${failed.length} stopped (${failed.map((s) => s.part).join(', ')})` : ''} — ${formatBytes(bytes)}${total ? ` of ${formatBytes(total)} started` : ''}`;
  return { line, failed };
}

/** Attached mode: the parts under srun, one combined progress line, then the finalize if the last part did not do it. */
async function attached(profile: Profile, spec: ArraySubmission, what: string): Promise<void> {
  if (spec.batch) return attachedBatch(profile, spec, what);
  const tty = process.stderr.isTTY;
  let last = '';
  const tick = async (): Promise<void> => {
    const { line } = await progressLine(spec.out, spec.parts, spec.only);
    if (line !== last) process.stderr.write(tty ? `\r\x1b[K${line}` : `${line}\n`);
    last = line;
  };
  const r = await runAttached(profile, spec, tick);
  if (tty) process.stderr.write('\n');
  const { failed } = await progressLine(spec.out, spec.parts, spec.only);
  if (r.code !== 0 || failed.length) {
    const list = failed.map((s) => `part ${s.part}/${spec.parts}${s.kind === 'failed' && s.record.error ? ` (${s.record.error})` : ''}`).join('; ');
    throw badInput(`srun ended with exit ${r.code} before ${what} was complete${list ? `: ${list}` : ''}; logs in ${r.logDir}; resubmit a part alone with --part i/${spec.parts} (\`shardshift status ${spec.out}\` lists them)`);
  }
  if (!existsSync(join(spec.out, MANIFEST_NAME)) || existsSync(`${spec.out}.partial`)) {
    const states = existsSync(`${spec.out}.partial`) ? await partStates(`${spec.out}.partial`, spec.parts) : [];
    if (states.some((s) => s.kind !== 'done')) {
      process.stdout.write(`ran ${what}${r.inAllocation ? ' (a step of this allocation)' : ''}; parts still to run: ${states.filter((s) => s.kind !== 'done').map((s) => s.part).join(', ')}\n`);
      return;
    }
    // Every part done but none finalized (a part's finalize lost a race to a stale lock): do it here.
    const code = await new Promise<number>((res) => execFile(process.execPath, [cliPath(), 'finalize', '-q', spec.out], (err) => res(err ? 1 : 0)));
    if (code !== 0) throw badInput(`every part of ${spec.out} is done, but \`shardshift finalize ${spec.out}\` failed: run it to see why`);
  }
  process.stdout.write(`finalized ${spec.out} (${spec.parts} parts, under srun${r.inAllocation ? ' in this allocation' : ''}; logs in ${r.logDir})\n`);
}

/** Attached batch of checkpoints: one srun task each, then the summary (which finds them finished) printed here. */
async function attachedBatch(profile: Profile, spec: ArraySubmission, what: string): Promise<void> {
  const r = await runAttached(profile, spec, async () => undefined);
  const summary = await new Promise<{ code: number; stdout: string; stderr: string }>((res) =>
    execFile(process.execPath, [cliPath(), ...spec.argv, '-q'], { cwd: spec.cwd, encoding: 'utf8' }, (err, stdout, stderr) => res({ code: err ? Number((err as { code?: number }).code ?? 1) : 0, stdout, stderr })),
  );
  process.stdout.write(summary.stdout);
  process.stderr.write(summary.stderr);
  if (r.code !== 0 || summary.code !== 0) throw badInput(`srun ran ${what} with exit ${r.code}; the table above says which failed (logs in ${r.logDir}); re-run the same command to convert the rest — finished outputs are kept`);
}

/** The line a part run prints instead of "wrote …" (undefined when the run was not a part). */
export function partLine(r: ConvertResult): string | undefined {
  const p = partResult();
  if (!p) return undefined;
  const head = `part ${p.part.index}/${p.part.count} of ${p.out}: ${p.files} file${p.files === 1 ? '' : 's'}, ${formatBytes(p.bytes)}${p.filesReused ? ` (${p.filesReused} kept from an interrupted run)` : ''} in ${r.seconds.toFixed(2)} s`;
  if (p.finalized) return `${head}; it was the last part: checked all ${p.part.count} parts and finalized ${p.out}\n`;
  const left = p.part.count - p.partsDone;
  return `${head}; ${p.partsDone} of ${p.part.count} parts done${left ? ` — the last part to finish completes ${p.out} (or run \`shardshift finalize ${p.out}\`)` : ''}${p.note ? ` (${p.note})` : ''}\n`;
}

export function registerPartCommands(p: Command, run: (argv: string[]) => Promise<number>): void {
  p.command('finalize')
    .description('Complete a partitioned run (--part): check every part\'s files (sizes and SHA-256s), write the indexes, metadata and manifest, and rename <out>.partial into place.')
    .argument('<out>', 'the output the parts wrote (its <out>.partial)')
    .option('-q, --quiet', 'no progress display')
    .addHelpText('after', '\nExample:\n  $ shardshift finalize /lustre/me/llama-megatron')
    .action(async (out: string, f: { quiet?: boolean }) => {
      const partial = `${resolve(out)}.partial`;
      const rec = await readPartsRecord(partial);
      if (!rec) {
        if (existsSync(`${resolve(out)}/${MANIFEST_NAME}`) && !existsSync(partial)) {
          process.stdout.write(`${out} is already finalized\n`);
          return;
        }
        throw usage(`${out} is not a partitioned run: ${existsSync(partial) ? `${partial} has no ${PARTS_NAME}` : `there is no ${partial}`} (parts are written with --part i/n)`);
      }
      // Plan again, exactly as the parts did, then finish instead of writing a part.
      const argv = [...rec.argv];
      if (f.quiet && !argv.includes('-q') && !argv.includes('--quiet')) argv.push('-q');
      const prev = process.cwd();
      process.chdir(rec.cwd);
      try {
        const code = await runPartitioned({ kind: 'finalize' }, () => run(argv));
        if (code !== 0) process.exitCode = code;
      } finally {
        process.chdir(prev);
      }
    });

  p.command('status')
    .description('Show the state of every part of a partitioned run (done, running, interrupted, failed, not run) from its shared directory.')
    .argument('<out>', 'the output the parts write')
    .option('--json', 'print one JSON document')
    .action(async (out: string, f: { json?: boolean }) => {
      const partial = `${resolve(out)}.partial`;
      const rec = await readPartsRecord(partial);
      if (!rec) {
        if (existsSync(`${resolve(out)}/${MANIFEST_NAME}`)) {
          process.stdout.write(f.json ? JSON.stringify({ out, state: 'finalized' }) + '\n' : `${out}: finalized\n`);
          return;
        }
        throw usage(`${out} is not a partitioned run in progress (no ${PARTS_NAME} in ${partial})`);
      }
      const states = await partStates(partial, rec.parts, rec.planHash);
      if (f.json) {
        const parts = states.map((s) => (s.kind === 'missing' ? { part: s.part, state: 'not-run' } : { part: s.part, state: s.kind, host: s.record.host, pid: s.record.pid, slurmJob: s.record.slurmJob, files: Object.keys(s.record.files).length, filesTotal: s.record.filesTotal, bytesDone: s.record.bytesDone, bytesTotal: s.record.bytesTotal, updated: s.record.updated, error: s.record.error }));
        process.stdout.write(JSON.stringify({ out, planHash: rec.planHash, parts }, null, 2) + '\n');
        return;
      }
      const lines = [`${out}: ${rec.parts} parts of \`shardshift ${rec.argv.join(' ')}\``];
      for (const s of states) {
        if (s.kind === 'missing') {
          lines.push(`  part ${s.part}/${rec.parts}  not run     (${partCommand(rec, s.part)})`);
          continue;
        }
        const r = s.record;
        const where = `${r.host}:${r.pid}${r.slurmJob ? `, job ${r.slurmJob}` : ''}`;
        lines.push(`  part ${s.part}/${rec.parts}  ${s.kind.padEnd(11)} ${Object.keys(r.files).length}/${r.filesTotal} files, ${formatBytes(r.bytesDone)} of ${formatBytes(r.bytesTotal)}  (${where}, ${r.updated})${r.error ? `: ${r.error}` : ''}`);
      }
      const done = states.filter((s) => s.kind === 'done').length;
      lines.push(done === rec.parts ? `all parts done: run \`shardshift finalize ${out}\`` : `${done} of ${rec.parts} parts done`);
      process.stdout.write(lines.join('\n') + '\n');
    });
}
