// Format-conversion benchmark: a synthetic Llama-shaped bf16 checkpoint of a chosen size,
// converted among safetensors, torch.save and DCP, timed against `cp -r` of the same bytes on the
// same disk (measured in the same run). Prints median wall time, GB/s of bytes written, peak RSS
// and the ratio to cp. Not a test: nothing here asserts a time.
//
//   npm run bench -- [--size 1GB] [--runs 3] [--max-memory 1GiB] [--keep]
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, rmSync, existsSync, openSync, writeSync, closeSync, statSync, readdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomFillSync } from 'node:crypto';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : def;
};
const parseSize = (s) => {
  const m = /^(\d+(?:\.\d+)?)\s*(|k|m|g|kb|mb|gb|kib|mib|gib)$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  const u = { '': 1, k: 1e3, kb: 1e3, m: 1e6, mb: 1e6, g: 1e9, gb: 1e9, kib: 1024, mib: 2 ** 20, gib: 2 ** 30 }[m[2].toLowerCase()];
  return Math.floor(Number(m[1]) * u);
};
const size = parseSize(opt('--size', '1GB'));
const runs = Number(opt('--runs', '3'));
const maxMemory = opt('--max-memory', '1GiB');
const cacheDir = join(root, 'bench', '.cache');

execFileSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.json')], { stdio: 'inherit' });
const cli = join(root, 'dist', 'src', 'cli', 'main.js');

/** Llama-like layer shapes scaled so the checkpoint is about `bytes` of bf16. */
function makeCheckpoint(dir, bytes) {
  const hidden = 2048, inter = 5632, vocab = 32000, kv = 512;
  const perLayer = 2 * (hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter + 2 * hidden);
  const fixed = 2 * (2 * vocab * hidden + hidden);
  const layers = Math.max(1, Math.round((bytes - fixed) / perLayer));
  const tensors = [['model.embed_tokens.weight', [vocab, hidden]], ['model.norm.weight', [hidden]], ['lm_head.weight', [vocab, hidden]]];
  for (let i = 0; i < layers; i++) {
    const p = `model.layers.${i}.`;
    tensors.push(
      [p + 'self_attn.q_proj.weight', [hidden, hidden]], [p + 'self_attn.k_proj.weight', [kv, hidden]],
      [p + 'self_attn.v_proj.weight', [kv, hidden]], [p + 'self_attn.o_proj.weight', [hidden, hidden]],
      [p + 'mlp.gate_proj.weight', [inter, hidden]], [p + 'mlp.up_proj.weight', [inter, hidden]],
      [p + 'mlp.down_proj.weight', [hidden, inter]], [p + 'input_layernorm.weight', [hidden]],
      [p + 'post_attention_layernorm.weight', [hidden]],
    );
  }
  // Shards of at most 2 GB, written as safetensors by hand (sorted the way the crate sorts: same dtype → by name).
  mkdirSync(dir, { recursive: true });
  const shards = [];
  let cur = [], curBytes = 0;
  for (const t of tensors) {
    const b = 2 * t[1].reduce((a, c) => a * c, 1);
    if (cur.length && curBytes + b > 2e9) { shards.push(cur); cur = []; curBytes = 0; }
    cur.push([...t, b]);
    curBytes += b;
  }
  shards.push(cur);
  const wm = {};
  let total = 0;
  const buf = Buffer.alloc(16 << 20);
  shards.forEach((s, i) => {
    const name = shards.length === 1 ? 'model.safetensors' : `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`;
    s.sort((a, b) => (a[0] < b[0] ? -1 : 1));
    let at = 0;
    const head = {};
    head.__metadata__ = { format: 'pt' };
    for (const [n, shape, b] of s) {
      head[n] = { dtype: 'BF16', shape, data_offsets: [at, at + b] };
      at += b;
      wm[n] = name;
      total += b;
    }
    let json = Buffer.from(JSON.stringify(head));
    json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
    const fd = openSync(join(dir, name), 'w');
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    writeSync(fd, len);
    writeSync(fd, json);
    for (let left = at; left > 0; ) {
      const n = Math.min(left, buf.length);
      randomFillSync(buf, 0, n);
      // Keep values finite bf16: clear the top exponent bit of every element.
      for (let j = 1; j < n; j += 2) buf[j] &= 0xbf;
      writeSync(fd, buf, 0, n);
      left -= n;
    }
    closeSync(fd);
  });
  if (shards.length > 1) {
    const fd = openSync(join(dir, 'model.safetensors.index.json'), 'w');
    writeSync(fd, JSON.stringify({ metadata: { total_size: total }, weight_map: wm }, null, 2));
    closeSync(fd);
  }
  const cfg = openSync(join(dir, 'config.json'), 'w');
  writeSync(cfg, JSON.stringify({ architectures: ['LlamaForCausalLM'], hidden_size: hidden, intermediate_size: inter, num_hidden_layers: layers, vocab_size: vocab }));
  closeSync(cfg);
  return { tensors: tensors.length, bytes: total };
}

function dirBytes(p) {
  const st = statSync(p);
  if (!st.isDirectory()) return st.size;
  return readdirSync(p).reduce((s, n) => s + dirBytes(join(p, n)), 0);
}

const hasTimeV = existsSync('/usr/bin/time');
/** Runs a command, returns wall seconds and peak RSS (kB) of the child. */
function timed(cmd, argv) {
  const t0 = process.hrtime.bigint();
  const r = hasTimeV ? spawnSync('/usr/bin/time', ['-v', cmd, ...argv], { encoding: 'utf8' }) : spawnSync(cmd, argv, { encoding: 'utf8' });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} failed:\n${r.stderr}`);
  const m = /Maximum resident set size \(kbytes\): (\d+)/.exec(r.stderr ?? '');
  return { s, rssKb: m ? Number(m[1]) : undefined };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const srcDir = join(cacheDir, `llama-${size}`);
if (!existsSync(join(srcDir, 'config.json'))) {
  rmSync(srcDir, { recursive: true, force: true });
  process.stderr.write(`generating ${srcDir} …\n`);
  makeCheckpoint(srcDir, size);
}
const srcBytes = dirBytes(srcDir);
const work = join(cacheDir, 'work');

const cases = [
  ['cp -r (baseline)', (out) => ['cp', ['-r', srcDir, out]]],
  ['safetensors → torch', (out) => [process.execPath, [cli, 'convert', '-q', '--to', 'torch', '--max-memory', maxMemory, srcDir, out]]],
  ['safetensors → dcp', (out) => [process.execPath, [cli, 'convert', '-q', '--to', 'dcp', '--max-memory', maxMemory, srcDir, out]]],
  ['safetensors → safetensors (reshard 1GB)', (out) => [process.execPath, [cli, 'convert', '-q', '--to', 'safetensors', '--shard-size', '1GB', '--max-memory', maxMemory, srcDir, out]]],
  ['safetensors bf16 → fp32 cast', (out) => [process.execPath, [cli, 'convert', '-q', '--to', 'safetensors', '--dtype', 'float32', '--max-memory', maxMemory, srcDir, out]]],
];

const rows = [];
let cpRate;
for (const [name, make] of cases) {
  const times = [];
  let rss = 0;
  let written = 0;
  for (let i = 0; i < runs; i++) {
    rmSync(work, { recursive: true, force: true });
    const [cmd, argv] = make(work);
    const r = timed(cmd, argv);
    times.push(r.s);
    rss = Math.max(rss, r.rssKb ?? 0);
    written = dirBytes(work);
  }
  const t = median(times);
  const rate = written / t / 1e9;
  if (!cpRate) cpRate = rate;
  rows.push([name, `${t.toFixed(2)} s`, `${rate.toFixed(2)} GB/s`, rss ? `${(rss / 1024).toFixed(0)} MB` : 'n/a', `${(rate / cpRate).toFixed(2)}×`]);
}
rmSync(work, { recursive: true, force: true });

const head = ['case', 'median wall', 'written/s', 'peak RSS', 'vs cp'];
const w = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
const line = (r) => '| ' + r.map((c, i) => c.padEnd(w[i])).join(' | ') + ' |';
console.log(`\nsource: ${srcDir} (${(srcBytes / 1e9).toFixed(2)} GB, bf16), ${runs} runs each, --max-memory ${maxMemory}`);
console.log(line(head));
console.log('|' + w.map((x) => '-'.repeat(x + 2)).join('|') + '|');
for (const r of rows) console.log(line(r));
if (!args.includes('--keep')) rmSync(srcDir, { recursive: true, force: true });
