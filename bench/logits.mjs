/* global process, console */
// `npm run bench -- logits [--model 8b] [--positions 8] [--runs 2] [--max-memory 1GiB]`: `verify
// --logits` on a Llama-3.1-8B-shaped checkpoint (bench/generate.mjs: the real config, names and
// shapes, random bf16 weights) against its torch_dist conversion — two reference forward passes,
// every weight read once each, the matmuls on the worker pool in WebAssembly SIMD. Reports the
// median wall time of --runs N, CPU seconds, peak RSS, the bytes read, and as the baseline the time
// to read the same bytes (`cat` of both checkpoints' data files to /dev/null, interleaved run by
// run; the page cache is dropped between runs where the machine allows it, else it is said).
// The 70B projection scales the measured time by the bytes to read (compute per position and the
// read both grow with the parameter count). Not a test: nothing here asserts a time.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MODELS, benchRoot, cacheRoot, hfCheckpoint } from './generate.mjs';

const root = join(benchRoot, '..');
const cli = join(root, 'dist', 'src', 'cli', 'main.js');
const argv = process.argv.slice(2).filter((a) => a !== 'logits');
const opt = (k, d) => {
  const i = argv.indexOf(k);
  return i < 0 ? d : argv[i + 1];
};
const model = opt('--model', '8b');
const positions = opt('--positions', '8');
const runs = Number(opt('--runs', 2));
const maxMemory = opt('--max-memory', '1GiB');
const log = (s) => process.stderr.write(s + '\n');

const hf = hfCheckpoint(model, { log });
const meg = join(cacheRoot, `megatron-llama3-${model}`);
if (!existsSync(`${meg}.complete`)) {
  log(`making the torch_dist output ${meg} …`);
  const r = spawnSync(process.execPath, [cli, 'convert', '-q', '--to', 'megatron', hf, meg], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error('conversion failed');
  writeFileSync(`${meg}.complete`, 'ok');
}

const files = (d) => readdirSync(d, { recursive: true }).map((f) => join(d, String(f))).filter((f) => statSync(f).isFile() && /\.(safetensors|distcp)$/.test(f));
const data = [...files(hf), ...files(meg)];
const bytes = data.reduce((a, f) => a + statSync(f).size, 0);

const canDrop = spawnSync('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches'], { stdio: 'ignore' }).status === 0;
const drop = () => canDrop && spawnSync('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches'], { stdio: 'ignore' });

function timed(cmd, args) {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %U %S %M', cmd, ...args], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const last = r.stderr.trimEnd().split('\n').at(-1) ?? '';
  const x = /^([\d.]+) ([\d.]+) ([\d.]+) (\d+)$/.exec(last);
  if (r.status !== 0 || !x) throw new Error(`${cmd} ${args.slice(0, 3).join(' ')} … failed:\n${r.stderr.slice(-3000)}`);
  return { s: Number(x[1]), cpu: Number(x[2]) + Number(x[3]), rss: Number(x[4]) * 1024, stdout: r.stdout };
}

const ss = [];
const cat = [];
let report;
for (let i = 0; i < runs; i++) {
  drop();
  const c = timed('sh', ['-c', `cat ${data.map((f) => `'${f}'`).join(' ')} > /dev/null`]);
  cat.push(c);
  log(`  cat of both checkpoints: run ${i + 1}/${runs} ${c.s.toFixed(1)} s`);
  drop();
  const r = timed(process.execPath, [cli, 'verify', meg, '--against', hf, '--logits', '--positions', positions, '--max-memory', maxMemory, '--json']);
  ss.push(r);
  report = JSON.parse(r.stdout);
  log(`  shardshift verify --logits: run ${i + 1}/${runs} ${r.s.toFixed(1)} s, ${r.cpu.toFixed(1)} CPU s, peak RSS ${(r.rss / 2 ** 20).toFixed(0)} MiB, ok=${report.ok}`);
}
const med = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const t = med(ss.map((r) => r.s));
const tc = med(cat.map((r) => r.s));
const params = (m) => {
  const hd = m.hidden / m.heads;
  const layer = m.hidden * (m.heads * hd) * 2 + m.hidden * (m.kv * hd) * 2 + 3 * m.hidden * m.inter + 2 * m.hidden;
  return m.layers * layer + m.vocab * m.hidden * (m.tied ? 1 : 2);
};
const scale = params(MODELS['70b']) / params(MODELS[model]);
console.log(`\n### verify --logits, ${MODELS[model].label} shape, ${positions} positions, source (HF safetensors) vs torch_dist output`);
console.log(`${canDrop ? 'page cache dropped before every run' : 'page cache NOT dropped (no permission): reads may be served from memory'}; --max-memory ${maxMemory}; ${runs} interleaved runs, medians\n`);
console.log('| | wall | CPU s | peak RSS | bytes read | GB/s |');
console.log('|---|---|---|---|---|---|');
console.log(`| cat of both checkpoints' data files (baseline) | ${tc.toFixed(1)} s | ${med(cat.map((r) => r.cpu)).toFixed(1)} | — | ${(bytes / 1e9).toFixed(1)} GB | ${(bytes / 1e9 / tc).toFixed(2)} |`);
console.log(`| shardshift verify --logits | ${t.toFixed(1)} s | ${med(ss.map((r) => r.cpu)).toFixed(1)} | ${(Math.max(...ss.map((r) => r.rss)) / 2 ** 20).toFixed(0)} MiB | ${((report.source.bytesRead + report.output.bytesRead) / 1e9).toFixed(1)} GB | ${((report.source.bytesRead + report.output.bytesRead) / 1e9 / t).toFixed(2)} |`);
console.log(`\nratio to the read baseline: ${(t / tc).toFixed(2)}× its time; per side: source ${report.source.seconds.toFixed(1)} s, output ${report.output.seconds.toFixed(1)} s (${MODELS[model].layers} layers: ${((report.source.seconds + report.output.seconds) / 2 / MODELS[model].layers).toFixed(2)} s per layer and side)`);
console.log(`70B projection (Llama-3.1-70B, ${(scale).toFixed(1)}× the parameters to read and multiply): ≈ ${((t * scale) / 60).toFixed(1)} min at this machine's pace, the same memory (the budget, not the model, sets it)`);
console.log(`logits: max |Δ| ${report.comparison.maxAbs}, min cosine ${report.comparison.minCosine}, top-1 agreement ${report.comparison.top1Agreement * 100}%`);
