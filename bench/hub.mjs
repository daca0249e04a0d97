/* global process, console */
// `npm run bench -- hub [--model 1b] [--runs N]`: HF → Megatron torch_dist of a hub model served
// by the loopback hub double (test/helpers/hub-double.ts, built into dist/) against the same
// conversion of the local directory and `cp -r` of the same bytes, interleaved run by run, every
// output fsynced inside the timed region:
//
// - streamed into a fresh HF cache (whole shards, downloaded as the conversion reaches them);
// - streamed with --max-disk a quarter of the model (tensor ranges, deleted once read; the SHA-256
//   of each shard still checked, re-fetching by range what could not be kept for it).
//
// Loopback has no network latency or bandwidth limit: the figure is shardshift's own cost of
// streaming (HTTP, spool writes, hashing), not a hub's download speed.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { rmSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { dirBytes, median, runInterleaved } from './measure.mjs';
import { benchRoot, cacheRoot, hfCheckpoint, MODELS } from './generate.mjs';

const pexec = promisify(execFile);
const root = join(benchRoot, '..');
const cli = join(root, 'dist', 'src', 'cli', 'main.js');
const { HubDouble } = await import(join(root, 'dist', 'test', 'helpers', 'hub-double.js'));
const argv = process.argv.slice(2);
const opt = (k, d) => (argv.includes(k) ? argv[argv.indexOf(k) + 1] : d);
const model = opt('--model', '1b');
const runs = Number(opt('--runs', '3'));
const log = (s) => process.stderr.write(s + '\n');

const src = hfCheckpoint(model, { log });
const bytes = dirBytes(src);
const work = join(cacheRoot, 'work-hub');
rmSync(join(cacheRoot, 'hub-double'), { recursive: true, force: true });
const hub = await HubDouble.start(join(cacheRoot, 'hub-double'));
try {
  log('publishing the model on the loopback double …');
  await hub.addRepo('bench/model', src);
  const env = { ...process.env, HF_ENDPOINT: hub.endpoint, HF_TOKEN: '' };
  const maxDisk = Math.floor(bytes / 4);
  const stats = {};
  const shard = (label, args, extra = {}) => ({
    label,
    times: [],
    go: async (out) => {
      const r = await pexec(process.execPath, [cli, 'convert', '--json', '--to', 'megatron', ...args, out], { env: { ...env, HF_HUB_CACHE: join(work, 'cache'), ...extra }, maxBuffer: 256 << 20 });
      stats[label] = JSON.parse(r.stdout).hub;
    },
  });
  const tools = [
    { label: 'cp -r (baseline)', times: [], go: (out) => pexec('cp', ['-r', src, out]) },
    { label: 'shardshift, local directory', times: [], go: (out) => pexec(process.execPath, [cli, 'convert', '-q', '--to', 'megatron', src, out]) },
    shard('shardshift, streamed from the hub (into a fresh HF cache)', ['bench/model']),
    shard(`shardshift, streamed with --max-disk ${(maxDisk / 1e9).toFixed(2)} GB`, ['bench/model', '--max-disk', String(maxDisk)]),
  ];
  await runInterleaved(tools, { runs, work, log });
  const [cp, local] = tools;
  const rows = tools.map((t) => {
    const st = stats[t.label];
    const note = st ? `fetched ${(st.bytesFetched / 1e9).toFixed(2)} GB${st.bytesFetchedToVerify ? ` + ${(st.bytesFetchedToVerify / 1e9).toFixed(2)} GB to verify` : ''}${st.peakDisk ? `, peak spool ${(st.peakDisk / 1e9).toFixed(2)} GB` : ''}` : '';
    return `| ${t.label} | ${median(t.times).toFixed(2)} s (${Math.min(...t.times).toFixed(2)}–${Math.max(...t.times).toFixed(2)}) | ${(bytes / median(t.times) / 1e9).toFixed(2)} GB/s | ${(median(cp.times) / median(t.times)).toFixed(2)}× cp | ${t === cp ? '—' : `${(median(local.times) / median(t.times)).toFixed(2)}× local`} | ${note} |`;
  });
  console.log(`machine: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, Node ${process.version}\n`);
  console.log(`### hub: HF → Megatron torch_dist (${MODELS[model].label} shape, ${(bytes / 1e9).toFixed(2)} GB) through the loopback hub double, ${runs} run(s) each\n`);
  console.log('| tool | median wall (min–max) | source/s | speed vs cp | speed vs local | source traffic |\n|---|---|---|---|---|---|\n' + rows.join('\n'));
} finally {
  await hub.stop();
  rmSync(join(cacheRoot, 'hub-double'), { recursive: true, force: true });
}
