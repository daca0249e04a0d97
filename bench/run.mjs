/* global process, console */
// The benchmark runner: `npm run bench -- <case…> [options]` (scripts/bench.mjs builds first, then
// runs this; `node bench/run.mjs …` runs it against an existing build).
//
// Each case converts a cached synthetic checkpoint (bench/generate.mjs) with shardshift and times
// it against baselines measured in the same run, interleaved run by run: `cp -r` of the same
// source bytes to the same disk, and the Python peer doing the same job on CPU where one exists.
// Every timed command is followed, inside the timed region, by an fsync of every file it wrote,
// so every tool is measured to the same end point: its bytes on disk (shardshift fsyncs its own
// output; cp and most peers do not). Prints one markdown table per case: median wall time of N
// runs (and the spread), bytes written and GB/s, peak RSS (/usr/bin/time -v), throughput relative
// to cp, and the wall-time speed-up over the peer. Not a test: nothing here asserts a time.
//
//   cases: hf-to-megatron megatron-to-hf dcp-to-hf dcp-to-torch hf-to-dcp cast reshard lora
//          memory (1B/3B/8B peak RSS) sparse-70b (70B-shaped sparse checkpoint) all
//   options: --model 1b|3b|8b|tiny|mixtral-tiny|mixtral-1b|mixtral-8x7b   shape for the cases that take one (reshard defaults to 8b)
//            --runs N (3) --max-memory 1GiB --no-peer --no-cp --json FILE
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, totalmem } from 'node:os';
import { join } from 'node:path';
import { dirBytes, median, syncTree } from './measure.mjs';
import { benchRoot, cacheRoot, hfCheckpoint, loraAdapter, MODELS } from './generate.mjs';

const root = join(benchRoot, '..');
// SHARDSHIFT_BENCH_CLI runs another build (e.g. a copy of an older dist/ for before/after numbers).
const cli = process.env.SHARDSHIFT_BENCH_CLI ?? join(root, 'dist', 'src', 'cli', 'main.js');
if (!existsSync(cli)) throw new Error(`${cli} not built: run \`npm run bench\` (which builds) or \`npm run build\``);

const argv = process.argv.slice(2);
const flags = new Set();
const values = {};
const positional = [];
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (['--model', '--runs', '--max-memory', '--json', '--direct-io'].includes(a)) values[a] = argv[++i];
  else if (a.startsWith('--')) flags.add(a);
  else positional.push(a);
}
const runs = Number(values['--runs'] ?? 3);
const maxMemory = values['--max-memory'] ?? '1GiB';
const withPeer = !flags.has('--no-peer');
const withCp = !flags.has('--no-cp');
// How shardshift writes large files: `off` (its default: buffered writes with early write-back)
// or `on` (O_DIRECT from aligned staging blocks). Passed to every shardshift run as
// SHARDSHIFT_DIRECT_IO.
const directIo = values['--direct-io'] ?? process.env.SHARDSHIFT_DIRECT_IO ?? 'off';
if (!['on', 'off'].includes(directIo)) throw new Error(`--direct-io ${directIo}: use on or off`);
process.env.SHARDSHIFT_DIRECT_IO = directIo;
const log = (s) => process.stderr.write(s + '\n');

let python;
async function peerPython() {
  if (python === undefined) {
    python = process.env.SHARDSHIFT_PYTHON;
    if (!python) {
      const { oracleVenv } = await import('../scripts/oracle-venv.mjs');
      python = oracleVenv({ log }) ?? null;
    }
  }
  return python;
}

// ---------------------------------------------------------------------------------------------
// Sources: the generated HF checkpoint, and Megatron / DCP checkpoints made from it by shardshift.

function shardshift(args) {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`shardshift ${args.join(' ')} failed:\n${r.stderr}`);
}

function derived(kind, model, make) {
  const dir = join(cacheRoot, `${kind}-llama3-${model}`);
  const stamp = `${dir}.complete`;
  if (existsSync(stamp)) return dir;
  rmSync(dir, { recursive: true, force: true });
  log(`making the ${kind} source ${dir} …`);
  make(hfCheckpoint(model, { log }), dir);
  writeFileSync(stamp, 'ok');
  return dir;
}
const megatronSource = (model) => derived('megatron', model, (hf, out) => shardshift(['convert', '-q', '--to', 'megatron', hf, out]));
const dcpSource = (model) => derived('dcp', model, (hf, out) => shardshift(['convert', '-q', '--to', 'dcp', hf, out]));

// ---------------------------------------------------------------------------------------------
// Measuring.

const hasTimeV = existsSync('/usr/bin/time');
/** Runs a command and fsyncs its output; returns wall seconds (both) and the child's peak RSS in bytes. */
function timed(cmd, args, out) {
  const t0 = process.hrtime.bigint();
  const r = hasTimeV ? spawnSync('/usr/bin/time', ['-v', cmd, ...args], { encoding: 'utf8', maxBuffer: 1 << 26 }) : spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) {
    // Drop /usr/bin/time's report: the command's own last words are what explain the failure.
    const own = (r.stderr ?? '').split('\tCommand being timed')[0].trim() || `exit ${r.status}`;
    throw new Error(`${cmd} ${args.join(' ')} failed (exit ${r.status}):\n${own.slice(-4000)}`);
  }
  syncTree(out);
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  const m = /Maximum resident set size \(kbytes\): (\d+)/.exec(r.stderr ?? '');
  return { s, rss: m ? Number(m[1]) * 1024 : undefined };
}

const work = () => join(cacheRoot, 'work');

/**
 * Times each tool `runs` times, interleaved (run 1 of every tool, then run 2 …), removing the
 * output before each run. Returns one result per tool.
 */
function measure(tools, n) {
  const res = tools.map((t) => ({ ...t, times: [], rss: 0, written: 0 }));
  for (let i = 0; i < n; i++) {
    for (const r of res) {
      if (r.failed) continue;
      const out = join(work(), r.key);
      rmSync(work(), { recursive: true, force: true });
      mkdirSync(work(), { recursive: true });
      const [cmd, args] = r.command(out);
      let m;
      try {
        m = timed(cmd, args, out);
      } catch (e) {
        // A peer that cannot run here (a package missing from the venv …) is reported, not fatal.
        if (r.key === 'shardshift') throw e;
        r.failed = e.message.split('\n').filter(Boolean).slice(-1)[0] ?? 'failed';
        log(`  ${r.label}: failed — ${e.message.slice(-2000)}`);
        continue;
      }
      r.times.push(m.s);
      r.rss = Math.max(r.rss, m.rss ?? 0);
      r.written = dirBytes(out);
      log(`  ${r.label}: run ${i + 1}/${n} ${m.s.toFixed(2)} s${m.rss ? `, peak RSS ${(m.rss / 2 ** 20).toFixed(0)} MiB` : ''}`);
    }
  }
  rmSync(work(), { recursive: true, force: true });
  return res;
}

// ---------------------------------------------------------------------------------------------
// Cases.

const ss = (args, command = 'convert') => (out) => [process.execPath, [cli, command, ...(command === 'convert' ? ['-q'] : []), '--max-memory', maxMemory, ...args(out)]];
const cp = (src) => (out) => ['cp', ['-r', src, out]];
const peer = (args) => (out) => [python, [join(benchRoot, 'peers.py'), ...args(out)]];

/** Each case: what it converts, how shardshift does it, and the peer (or why there is none). */
const CASES = {
  'hf-to-megatron': (model) => {
    const src = hfCheckpoint(model, { log });
    return {
      title: `HF safetensors → Megatron-Core torch_dist (${MODELS[model].label} shape)`,
      src,
      shardshift: ss((out) => ['--to', 'megatron', src, out]),
      noPeer: 'no CPU peer: Megatron-Bridge `convert_checkpoints.py import` and NeMo import build the model with torchrun on CUDA',
    };
  },
  'megatron-to-hf': (model) => {
    const src = megatronSource(model);
    return {
      title: `Megatron-Core torch_dist → HF safetensors (${MODELS[model].label} shape)`,
      src,
      shardshift: ss((out) => ['--to', 'hf', src, out]),
      noPeer: 'no CPU peer: Megatron-Bridge `convert_checkpoints.py export` needs torchrun on CUDA',
    };
  },
  'dcp-to-hf': (model) => {
    const src = dcpSource(model);
    return {
      title: `PyTorch DCP → HF safetensors (${MODELS[model].label} shape)`,
      src,
      shardshift: ss((out) => ['--to', 'safetensors', src, out]),
      peer: { label: 'python: DCP load (as dcp_to_torch_save) + huggingface_hub.save_torch_state_dict', command: peer((out) => ['dcp-to-hf', src, out]) },
    };
  },
  'dcp-to-torch': (model) => {
    const src = dcpSource(model);
    return {
      title: `PyTorch DCP → torch.save (${MODELS[model].label} shape)`,
      src,
      shardshift: ss((out) => ['--to', 'torch', src, out]),
      peer: { label: 'python: format_utils.dcp_to_torch_save', command: peer((out) => ['dcp-to-torch', src, out]), file: true },
    };
  },
  'hf-to-dcp': (model) => {
    const src = hfCheckpoint(model, { log });
    return {
      title: `HF safetensors → PyTorch DCP (${MODELS[model].label} shape)`,
      src,
      shardshift: ss((out) => ['--to', 'dcp', src, out]),
      peer: { label: 'python: safetensors load_file + dcp.save(no_dist=True)', command: peer((out) => ['hf-to-dcp', src, out]) },
    };
  },
  cast: (model) => {
    const src = hfCheckpoint(model, { log });
    return {
      title: `HF bf16 → fp32 cast, safetensors (${MODELS[model].label} shape)`,
      src,
      shardshift: ss((out) => ['--to', 'safetensors', '--dtype', 'float32', src, out]),
      peer: { label: 'python: transformers from_pretrained(dtype=float32) + save_pretrained', command: peer((out) => ['hf-save', src, out, '--dtype', 'float32']) },
    };
  },
  reshard: (model) => {
    const src = hfCheckpoint(model, { log });
    return {
      title: `HF reshard 5GB → 2GB shards, safetensors (${MODELS[model].label} shape)`,
      src,
      shardshift: ss((out) => ['--to', 'safetensors', '--shard-size', '2GB', src, out]),
      peer: { label: "python: transformers from_pretrained + save_pretrained(max_shard_size='2GB')", command: peer((out) => ['hf-save', src, out, '--shard-size', '2GB']) },
    };
  },
  lora: (model) => {
    if (spawnSync(process.execPath, [cli, 'merge-lora', '--help']).status !== 0) return { skip: '`shardshift merge-lora` is not in this build' };
    const { base, adapter } = loraAdapter(model, { log });
    return {
      title: `LoRA merge, r=16 on every linear layer, into HF bf16 safetensors (${MODELS[model].label} shape)`,
      src: base,
      shardshift: ss((out) => ['--adapter', adapter, '--base', base, out], 'merge-lora'),
      peer: { label: 'python: peft PeftModel.from_pretrained + merge_and_unload + save_pretrained', command: peer((out) => ['lora-merge', base, out, '--adapter', adapter]) },
    };
  },
};
const DEFAULT_MODEL = { reshard: '8b' };

function fmtBytes(b) {
  return b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : `${(b / 1e6).toFixed(1)} MB`;
}
const fmtRss = (b) => (b ? `${(b / 2 ** 20).toFixed(0)} MiB` : 'n/a');

function table(head, rows) {
  const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => String(r[i]).length)));
  const line = (r) => '| ' + r.map((c, i) => String(c).padEnd(w[i])).join(' | ') + ' |';
  return [line(head), '|' + w.map((x) => '-'.repeat(x + 2)).join('|') + '|', ...rows.map(line)].join('\n');
}

const results = [];
const speedup = (x) => (x >= 1 ? `${x.toFixed(1)}× faster than the peer` : `${(1 / x).toFixed(1)}× slower than the peer`);

async function runCase(name) {
  const model = values['--model'] ?? DEFAULT_MODEL[name] ?? '1b';
  const c = CASES[name](model);
  if (c.skip) {
    log(`${name}: skipped — ${c.skip}`);
    console.log(`\n### ${name}: skipped — ${c.skip}\n`);
    results.push({ case: name, model, skipped: c.skip, tools: [] });
    return;
  }
  const srcBytes = dirBytes(c.src);
  const tools = [];
  if (withCp) tools.push({ key: 'cp', label: 'cp -r (baseline)', command: cp(c.src) });
  tools.push({ key: 'shardshift', label: 'shardshift', command: c.shardshift });
  if (withPeer && c.peer && (await peerPython())) tools.push({ key: c.peer.file ? 'peer.pt' : 'peer', label: c.peer.label, command: c.peer.command });
  log(`\n${name}: ${c.title}; source ${c.src} (${fmtBytes(srcBytes)}); ${runs} run(s) each`);
  const load0 = loadavg()[0];
  const res = measure(tools, runs);
  const load1 = loadavg()[0];
  const cpRes = res.find((r) => r.key === 'cp');
  const ssRes = res.find((r) => r.key === 'shardshift');
  const peerRes = res.find((r) => r.key.startsWith('peer') && !r.failed);
  const rate = (r) => r.written / median(r.times) / 1e9;
  const rows = res.filter((r) => r.failed).map((r) => [r.label, `failed: ${r.failed}`, '', '', '', '', '']);
  rows.unshift(...res.filter((r) => !r.failed).map((r) => [
    r.label,
    `${median(r.times).toFixed(2)} s` + (r.times.length > 1 ? ` (${Math.min(...r.times).toFixed(2)}–${Math.max(...r.times).toFixed(2)})` : ''),
    fmtBytes(r.written),
    `${rate(r).toFixed(2)} GB/s`,
    fmtRss(r.rss),
    cpRes ? `${(rate(r) / rate(cpRes)).toFixed(2)}×` : '—',
    r === ssRes ? (peerRes ? speedup(median(peerRes.times) / median(ssRes.times)) : '—') : r === peerRes ? '1.0×' : '—',
  ]));
  let md = `### ${name}: ${c.title}\n\nsource ${fmtBytes(srcBytes)}, ${runs} run(s) each, --max-memory ${maxMemory}, load average ${load0.toFixed(2)} → ${load1.toFixed(2)}\n\n`;
  md += table(['tool', 'median wall (min–max)', 'written', 'written/s', 'peak RSS', 'vs cp (GB/s)', 'vs peer (wall)'], rows);
  if (c.noPeer) md += `\n\nPython peer: ${c.noPeer}.`;
  console.log('\n' + md + '\n');
  results.push({ case: name, model, title: c.title, srcBytes, maxMemory, runs, load: [load0, load1], tools: res.map((r) => ({ label: r.label, times: r.times, written: r.written, rss: r.rss, failed: r.failed })), noPeer: c.noPeer });
}

/** Peak RSS of HF → Megatron across model sizes at one budget (one row per size). */
async function runMemory(models, sparse) {
  const rows = [];
  for (const model of models) {
    const src = hfCheckpoint(model, { log, sparse });
    const res = measure([{ key: 'shardshift', label: 'shardshift', command: ss((out) => ['--to', 'megatron', src, out]) }], sparse ? 1 : runs)[0];
    const budget = parseBudget(maxMemory);
    rows.push([
      `${MODELS[model].label}${sparse ? ' (sparse source)' : ''}`,
      fmtBytes(res.written),
      `${median(res.times).toFixed(2)} s`,
      fmtRss(res.rss),
      `${maxMemory}`,
      `${((res.rss - budget) / 2 ** 20).toFixed(0)} MiB`,
    ]);
    results.push({ case: sparse ? 'sparse-70b' : 'memory', model, sparse, maxMemory, tools: [{ label: 'shardshift', times: res.times, written: res.written, rss: res.rss }] });
  }
  const md = `### ${sparse ? 'sparse-70b' : 'memory'}: peak RSS of HF → Megatron by model size, --max-memory ${maxMemory}\n\n` +
    table(['model', 'written', 'median wall', 'peak RSS', 'budget', 'RSS − budget'], rows);
  console.log('\n' + md + '\n');
}

function parseBudget(s) {
  const m = /^(\d+(?:\.\d+)?)\s*(|k|m|g|kb|mb|gb|kib|mib|gib)$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Number(m[1]) * { '': 1, k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9, kib: 1024, mib: 2 ** 20, gib: 2 ** 30 }[m[2].toLowerCase()];
}

const ALL = ['hf-to-megatron', 'megatron-to-hf', 'dcp-to-hf', 'cast', 'lora', 'reshard', 'memory', 'sparse-70b'];
const todo = positional.length === 0 || positional.includes('all') ? ALL : positional;
console.log(`machine: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, Node ${process.version}; shardshift writes: ${directIo === "on" ? "O_DIRECT (--direct-io on)" : "buffered (default)"}; cache ${cacheRoot}`);
for (const name of todo) {
  if (name === 'memory') await runMemory(values['--model'] ? [values['--model']] : ['1b', '3b', '8b'], false);
  else if (name === 'sparse-70b') await runMemory([values['--model'] ?? '70b'], true);
  else if (CASES[name]) await runCase(name);
  else throw new Error(`unknown case ${name} (one of ${[...Object.keys(CASES), 'memory', 'sparse-70b', 'all'].join(', ')})`);
}
if (values['--json']) writeFileSync(values['--json'], JSON.stringify(results, null, 2) + '\n');
