/* global setTimeout, clearTimeout */
// `npm run fuzz -- [--cases N] [--seed S] [--target NAME]`: the long fuzz campaign (issue 16).
// Every target of test/fuzz/targets.ts gets N structure-aware cases (default 10,000), run in a
// worker thread; the report counts, per target, inputs that parsed, typed errors (the expected
// failure: one readable message), untyped exceptions, hangs (no result within 5 s), memory over
// 1 GiB and crashes (the worker died). Zero of the last four is the bar; the exit code is 1
// otherwise, and each finding is printed with its case index (re-run it with the same seed).
import { execFileSync } from 'node:child_process';
import { Worker } from 'node:worker_threads';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
execFileSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.json')], { stdio: 'inherit' });
const { TARGETS } = await import(join(root, 'dist', 'test', 'fuzz', 'targets.js'));

const argv = process.argv.slice(2);
const opt = (k, d) => (argv.includes(k) ? argv[argv.indexOf(k) + 1] : d);
const cases = Number(opt('--cases', 10_000));
const seed = Number(opt('--seed', 1));
const only = opt('--target', undefined);
const HANG_MS = 5000;
const MEMORY = 1 << 30;
const BATCH = 5000;

function runBatch(target, from, count, stats, findings) {
  return new Promise((resolve) => {
    const w = new Worker(join(root, 'dist', 'test', 'fuzz', 'worker.js'), { workerData: { target, seed, from, count }, resourceLimits: { maxOldGenerationSizeMb: 4096 } });
    let current = from;
    let next = from; // first case not yet finished
    let timer;
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        stats.hang++;
        findings.push(`hang: case ${current} (no result in ${HANG_MS / 1000} s)`);
        w.terminate();
      }, HANG_MS);
    };
    arm();
    w.on('message', (m) => {
      if (m.type === 'start') {
        current = m.i;
        arm();
        return;
      }
      next = m.i + 1;
      stats[m.outcome]++;
      if (m.outcome === 'untyped') findings.push(`untyped: case ${m.i}: ${m.message}`);
      if (m.rss > MEMORY) {
        stats.memory++;
        findings.push(`memory: case ${m.i} left RSS at ${(m.rss / 2 ** 20).toFixed(0)} MiB`);
      }
      arm();
    });
    w.on('error', (e) => {
      stats.crash++;
      findings.push(`crash: case ${current}: ${String(e?.message ?? e).slice(0, 300)}`);
    });
    w.on('exit', () => {
      clearTimeout(timer);
      // Resume after the case that hung or crashed.
      resolve(next <= current ? current + 1 : next);
    });
  });
}

let bad = 0;
const rows = [];
for (const [k, t] of TARGETS.entries()) {
  if (only && !t.name.includes(only)) continue;
  const stats = { ok: 0, typed: 0, untyped: 0, hang: 0, memory: 0, crash: 0 };
  const findings = [];
  const t0 = Date.now();
  for (let i = 0; i < cases; ) {
    const end = Math.min(cases, i + BATCH);
    i = await runBatch(k, i, end - i, stats, findings);
  }
  const secs = (Date.now() - t0) / 1000;
  rows.push(`| ${t.name} | ${cases} | ${stats.ok} | ${stats.typed} | ${stats.untyped} | ${stats.hang} | ${stats.memory} | ${stats.crash} | ${secs.toFixed(0)} s |`);
  for (const f of findings.slice(0, 20)) console.log(`  ${t.name}: ${f}`);
  bad += stats.untyped + stats.hang + stats.memory + stats.crash;
}
console.log(`\nfuzz campaign, seed ${seed}\n\n| target | cases | parsed | typed errors | untyped | hangs (> 5 s) | memory (> 1 GiB) | crashes | time |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n${rows.join('\n')}`);
process.exit(bad ? 1 : 0);
