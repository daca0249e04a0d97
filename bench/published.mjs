/* global process, console */
// `npm run bench -- published [model-id …] [--max-memory 1GiB] [--layout '--ckpt-format torch …'] [--export '--quantize mxfp4'] [--json FILE]`: full-size round trips
// of the published checkpoints (test/published/README.md) — each model written as a sparse
// safetensors checkpoint with its exact hub names, shapes, dtypes and shards (data left as holes,
// so a 163 GB model takes no disk), converted HF → Megatron torch_dist → HF, with wall time, the
// logical bytes per second and peak RSS of each direction, and the round trip checked for every
// name, shape and dtype. Not a test: nothing here asserts a time.
//
// Reading holes costs no disk but all the CPU work of real data (reads, checksums, hashes), so the
// times are those of a page-cache-resident checkpoint, bound by shardshift's per-byte CPU cost.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { benchRoot, cacheRoot } from './generate.mjs';

const root = join(benchRoot, '..');
const helpers = join(root, 'dist', 'test', 'helpers', 'published.js');
const cli = join(root, 'dist', 'src', 'cli', 'main.js');
if (!existsSync(helpers) || !existsSync(cli)) throw new Error('not built: run `npm run bench -- published` (which builds)');
const h = await import(helpers);

const argv = process.argv.slice(2).filter((a) => a !== 'published');
const opt = (k, d) => {
  const i = argv.indexOf(k);
  if (i < 0) return d;
  const v = argv[i + 1];
  argv.splice(i, 2);
  return v;
};
const maxMemory = opt('--max-memory', '1GiB');
const jsonOut = opt('--json', undefined);
// The Megatron layout, e.g. --layout '--ckpt-format torch --tp 8 --ep 8' (default: torch_dist).
const layout = (opt('--layout', '') ?? '').split(' ').filter(Boolean);
// Flags of the export back, e.g. --export '--quantize mxfp4' (the MXFP4 hub layout back: then the
// round trip compares the blocks and scales too).
const exportFlags = (opt('--export', '') ?? '').split(' ').filter(Boolean);
const requantized = exportFlags.includes('--quantize');
const only = argv.filter((a) => !a.startsWith('--'));
const log = (s) => process.stderr.write(s + '\n');

function timed(args) {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %M', process.execPath, cli, ...args], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const last = r.stderr.trimEnd().split('\n').at(-1) ?? '';
  const m = /^([\d.]+) (\d+)$/.exec(last);
  if (r.status !== 0 || !m) throw new Error(`shardshift ${args.join(' ')} failed:\n${r.stderr}`);
  return { seconds: Number(m[1]), rss: Number(m[2]) * 1024 };
}

const MiB = 2 ** 20;
const rows = [];
for (const m of await h.publishedModels()) {
  if (only.length && !only.includes(m.id)) continue;
  const dir = join(cacheRoot, 'published', m.id);
  const tensors = await h.publishedTensors(m);
  if (!existsSync(`${dir}.complete`)) {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(join(cacheRoot, 'published'), { recursive: true });
    await h.writeSparseCheckpoint(dir, await h.publishedConfig(m), tensors, { data: 'holes' });
    writeFileSync(`${dir}.complete`, 'ok');
  }
  const meg = join(cacheRoot, 'published', `${m.id}.megatron`);
  const back = join(cacheRoot, 'published', `${m.id}.hf-back`);
  rmSync(meg, { recursive: true, force: true });
  rmSync(back, { recursive: true, force: true });
  log(`${m.id}: ${tensors.length} tensors …`);
  const a = timed(['convert', '--to', 'megatron', dir, meg, '-q', '--max-memory', maxMemory, ...layout]);
  const b = timed(['convert', '--to', 'hf', meg, back, '-q', '--max-memory', maxMemory, ...(requantized && !m.hub.mxfp4 ? [] : exportFlags)]);
  // Names, shapes and dtypes: the sparse sources are holes, so their bytes (zeros) prove nothing here.
  const d = await h.compareSafetensorsDirs(dir, back, { bytes: false });
  const mxfp4 = requantized ? 0 : tensors.filter((t) => /_(blocks|scales)$/.test(t[0])).length;
  // FP8 weights come back as bf16 of the same shape (their scales gone) unless re-quantized.
  const fp8 = requantized ? [] : tensors.filter((t) => t[1] === 'F8_E4M3');
  const fp8Scales = requantized ? 0 : tensors.filter((t) => t[0].endsWith('_scale_inv')).length;
  const expected = new Set(fp8.map((t) => `${t[0]}: F8_E4M3 [${t[2].join(', ')}] vs BF16 [${t[2].join(', ')}]`));
  const ok = d.differing.every((x) => expected.has(x)) && d.differing.length === fp8.length && d.missing.length === mxfp4 + fp8Scales && d.compared === tensors.length - mxfp4 - fp8.length - fp8Scales;
  const bytes = d.bytes + (requantized ? 0 : tensors.filter((t) => /_(blocks|scales)$/.test(t[0]) || t[0].endsWith('_scale_inv') || t[1] === 'F8_E4M3').reduce((n, t) => n + h.tensorBytes(t), 0));
  rows.push({ model: m.id, repo: m.repo, tensors: tensors.length, bytes, toMegatron: a, toHf: b, roundTrip: ok ? 'names, shapes, dtypes equal' : `DIFFERS: ${d.differing.slice(0, 3).join('; ')}` });
  log(`  → megatron ${a.seconds} s, ${(a.rss / MiB).toFixed(0)} MiB; → hf ${b.seconds} s, ${(b.rss / MiB).toFixed(0)} MiB; ${rows.at(-1).roundTrip}`);
  rmSync(meg, { recursive: true, force: true });
  rmSync(back, { recursive: true, force: true });
}

const gb = (n) => (n / 1e9).toFixed(1);
let md = `### published: full-size round trips (sparse sources), ${layout.join(' ') || 'torch_dist'}${exportFlags.length ? `, export ${exportFlags.join(' ')}` : ''}, --max-memory ${maxMemory}\n\n`;
md += `machine: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, load ${loadavg()[0].toFixed(2)}\n\n`;
md += '| model | tensors | GB | HF → Megatron | GB/s | peak RSS | Megatron → HF | GB/s | peak RSS | round trip |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n';
for (const r of rows) {
  md += `| ${r.repo} | ${r.tensors} | ${gb(r.bytes)} | ${r.toMegatron.seconds.toFixed(1)} s | ${(r.bytes / 1e9 / r.toMegatron.seconds).toFixed(2)} | ${(r.toMegatron.rss / MiB).toFixed(0)} MiB | ${r.toHf.seconds.toFixed(1)} s | ${(r.bytes / 1e9 / r.toHf.seconds).toFixed(2)} | ${(r.toHf.rss / MiB).toFixed(0)} MiB | ${r.roundTrip} |\n`;
}
console.log(md);
if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ maxMemory, rows }, null, 2));
