/* global process, console */
// `npm run bench -- slurm [--model 8b] [--runs N] [--parts 4]`: one HF → Megatron conversion as a
// 4-part Slurm job array (plus its finalize job) on a private Slurm started here
// (scripts/slurm.mjs), against the same conversion in one process and `cp -r` of the same bytes,
// interleaved run by run, every output fsynced inside the timed region. The array's time runs
// from `sbatch` to the finalize job's end (scheduling, node start-up and finalize included).
//
// On one 2-core machine the parts share two cores and one disk, so no speed-up is expected: the
// figure this reports is the overhead of cutting a conversion into parts. Spread over N nodes on
// a shared file system, each part is an independent 1/N of the bytes (README, "Cluster").
import { spawnSync } from 'node:child_process';
import { statSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { median, runInterleaved } from './measure.mjs';
import { benchRoot, cacheRoot, hfCheckpoint, MODELS } from './generate.mjs';
import { startSlurm } from '../scripts/slurm.mjs';

const root = join(benchRoot, '..');
const cli = join(root, 'dist', 'src', 'cli', 'main.js');
const argv = process.argv.slice(2);
const opt = (k, d) => (argv.includes(k) ? argv[argv.indexOf(k) + 1] : d);
const model = opt('--model', '8b');
const runs = Number(opt('--runs', '2'));
const parts = Number(opt('--parts', '4'));
const log = (s) => process.stderr.write(s + '\n');

const sleep = (ms) => spawnSync('sleep', [String(ms / 1000)]);

function run(cmd, args, env) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, ...env } });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (exit ${r.status}): ${r.stderr.slice(-2000)}`);
  return r.stdout;
}

const src = hfCheckpoint(model, { log });
const work = join(cacheRoot, 'work-slurm');
const slurm = await startSlurm({ log });
const env = slurm.env;
try {
  const envToml = join(slurm.dir, 'env.toml');
  // One CPU and 2 GB per part: four parts queue two at a time on two cores.
  writeFileSync(envToml, `[slurm_convert_model]\nexecutor = "slurm"\npartition = "cpu"\ncpus_per_part = 1\nmem_per_part = "2G"\n`);
  const convert = (out) => ['convert', '-q', '--to', 'megatron', '--dcp-files', String(parts * 2), src, out];
  const tools = [
    { label: 'cp -r (baseline)', times: [], go: (out) => run('cp', ['-r', src, out]) },
    { label: 'shardshift, one process', times: [], go: (out) => run(process.execPath, [cli, ...convert(out)]) },
    {
      label: `shardshift, ${parts}-part sbatch array + finalize job`,
      times: [],
      go: (out) => {
        const s = run(process.execPath, [cli, ...convert(out), '--batch', 'slurm_convert_model', '--env', envToml, '--parts', String(parts)], env);
        const m = /parts job (\d+) .*finalize job (\d+)/.exec(s);
        if (!m) throw new Error(`no job ids in: ${s}`);
        // Until both jobs have left the queue (squeue prints nothing for them).
        for (;;) {
          const q = run('squeue', ['-h', '-j', `${m[1]},${m[2]}`], env).trim();
          if (!q) break;
          sleep(200);
        }
        if (!statSync(join(out, 'shardshift-manifest.json'), { throwIfNoEntry: false })) throw new Error(`the array did not finalize ${out} (logs in ${out}.slurm)`);
      },
    },
  ];
  await runInterleaved(tools, { runs, work, log });
  const [cp, one, array] = tools;
  const rows = tools.map((t) => `| ${t.label} | ${median(t.times).toFixed(2)} s (${Math.min(...t.times).toFixed(2)}–${Math.max(...t.times).toFixed(2)}) | ${(t.written / 1e9).toFixed(2)} GB | ${(t.written / median(t.times) / 1e9).toFixed(2)} GB/s | ${(median(t.times) / median(cp.times)).toFixed(2)}× cp | ${t === cp ? '—' : `${(median(t.times) / median(one.times)).toFixed(2)}× one process`} |`);
  console.log(`machine: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, Node ${process.version}\n`);
  console.log(`### slurm: HF → Megatron torch_dist (${MODELS[model].label} shape) in ${parts} parts on a private one-node Slurm, ${runs} run(s) each\n`);
  console.log('| tool | median wall (min–max) | written | written/s | wall vs cp | wall vs one process |\n|---|---|---|---|---|---|\n' + rows.join('\n'));
  console.log(`\noverhead of the ${parts}-part array on this machine: ${(median(array.times) - median(one.times)).toFixed(2)} s (${((median(array.times) / median(one.times) - 1) * 100).toFixed(0)}%) over one process`);
} finally {
  slurm.stop();
}
