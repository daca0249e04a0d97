/* global process, console */
// `npm run bench -- mxfp4 [--model gpt-oss-20b] [--layers 2] [--max-memory 1GiB] [--only torch_dist|legacy] [--runs 3]`: GPT-OSS MXFP4
// experts → Megatron bf16 (torch_dist, and legacy `--tp 8 --ep 8`), the real per-byte cost of
// dequantisation: a layer-truncated copy of the published checkpoint (exact names, shapes,
// dtypes, every expert) with random data end to end. Reports the median wall time of --runs N
// (3), the bytes written per second and its ratio to cp's (`cp -r` of the source, interleaved run
// by run, each followed by `sync` inside the timed region, as bench/run.mjs measures), and peak RSS. Not a test.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { benchRoot, cacheRoot } from './generate.mjs';

const root = join(benchRoot, '..');
const h = await import(join(root, 'dist', 'test', 'helpers', 'published.js'));
const cli = join(root, 'dist', 'src', 'cli', 'main.js');
const argv = process.argv.slice(2).filter((a) => a !== 'mxfp4');
const opt = (k, d) => {
  const i = argv.indexOf(k);
  return i < 0 ? d : argv[i + 1];
};
const id = opt('--model', 'gpt-oss-20b');
const maxMemory = opt('--max-memory', '1GiB');
const m = (await h.publishedModels()).find((x) => x.id === id);
if (!m?.hub.mxfp4) throw new Error(`${id}: not an MXFP4 model of test/published/models.json`);
const published = await h.publishedConfig(m);
const layers = Number(opt('--layers', h.truncatedLayers(published)));
const runs = Number(opt('--runs', 3));
const dir = join(cacheRoot, 'mxfp4', `${id}-${layers}-dense`);
if (!existsSync(`${dir}.complete`)) {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(join(cacheRoot, 'mxfp4'), { recursive: true });
  const tensors = h.truncateTensors(await h.publishedTensors(m), layers, h.layerCount(published));
  await h.writeSparseCheckpoint(dir, h.truncateConfig(published, layers), tensors, { data: 'holes', denseData: /./, shardBytes: 5e9 });
  writeFileSync(`${dir}.complete`, 'ok');
}

function timed(cmd, args) {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %M', cmd, ...args], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const last = r.stderr.trimEnd().split('\n').at(-1) ?? '';
  const x = /^([\d.]+) (\d+)$/.exec(last);
  if (r.status !== 0 || !x) throw new Error(`${cmd} ${args.join(' ')} failed:\n${r.stderr}`);
  return { seconds: Number(x[1]), rss: Number(x[2]) * 1024 };
}
function bytesOf(d) {
  const r = spawnSync('du', ['-s', '--apparent-size', '--block-size=1', d], { encoding: 'utf8' });
  return Number(r.stdout.split('\t')[0]);
}
const MiB = 2 ** 20;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const srcBytes = bytesOf(dir);
// --only torch_dist | legacy: one layout (the legacy output is 4× the torch_dist one: too big for a small tmpfs).
const only = opt('--only', 'both');
const layouts = [[], ['--ckpt-format', 'torch', '--tp', '8', '--ep', '8']].filter((x) => only === 'both' || (only === 'legacy') === (x.length > 0));
for (const extra of layouts) {
  const out = join(cacheRoot, 'mxfp4', `${id}-${layers}.out`);
  const ss = [];
  const cps = [];
  let bytes = 0;
  for (let r = 0; r < runs; r++) {
    rmSync(out, { recursive: true, force: true });
    spawnSync('sync');
    // cp's bytes to disk too (shardshift fsyncs its own), as bench/run.mjs measures every tool.
    cps.push(timed('sh', ['-c', `cp -r '${dir}' '${out}' && sync`]));
    rmSync(out, { recursive: true, force: true });
    spawnSync('sync');
    ss.push(timed('sh', ['-c', `'${process.execPath}' '${cli}' convert --to megatron '${dir}' '${out}' -q --max-memory ${maxMemory} ${extra.join(' ')} && sync`]));
    bytes = bytesOf(out);
  }
  rmSync(out, { recursive: true, force: true });
  const s = median(ss.map((x) => x.seconds));
  const c = median(cps.map((x) => x.seconds));
  const rss = Math.max(...ss.map((x) => x.rss));
  const label = extra.join(' ') || 'torch_dist';
  console.log(
    `${id} ×${layers} layers, ${label}: ${(bytes / 1e9).toFixed(2)} GB written in ${s.toFixed(1)} s (${(bytes / 1e9 / s).toFixed(2)} GB/s), peak RSS ${(rss / MiB).toFixed(0)} MiB; cp -r of the ${(srcBytes / 1e9).toFixed(2)} GB source ${c.toFixed(1)} s (${(srcBytes / 1e9 / c).toFixed(2)} GB/s) → ${((bytes / s) / (srcBytes / c)).toFixed(2)}× cp`,
  );
}
