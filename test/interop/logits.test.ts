/**
 * `verify --logits` (issue 23) against the real libraries:
 * - the Hugging Face reference forward equals transformers' fp32 logits (≤ 1e-5) for every
 *   supported architecture (Llama, Llama 3.1 rope scaling + tied, Mistral sliding window, Qwen2
 *   biases, Qwen3 q/k norms, Mixtral, Qwen3-MoE with and without norm_topk_prob);
 * - the megatron-core reference forward equals megatron-core's own CPU forward for checkpoints
 *   megatron-core saved (TP 2 × PP 2, TP 2 with q/k norm, qkv bias + tied, MoE under EP 2 / TP 2,
 *   and legacy rank files read rank by rank); NxD and legacy outputs of shardshift pass;
 * - verify --logits passes on correct conversions (both directions, F32 and BF16) and FAILS (exit
 *   3) on conversions a byte-identical round trip cannot catch: plain [q; k; v], [up; gate], the experts
 *   in reverse order, interleaved rotary rows, a vocab-padding off-by-one in the HF export;
 * - bad input gets one clear message.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cp, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle, repoRoot } from '../helpers/oracle.js';
import { runCli } from '../helpers/cli.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { openForForward } from '../../src/forward/open.js';
import { forwardLogits } from '../../src/forward/decoder.js';
import type { LogitsReport } from '../../src/plan/logits.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-logits-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const TOKENS = [1, 5, 9, 13, 2, 90, 40, 7];
const made = new Map<string, Promise<string>>();
function model(c: string): Promise<string> {
  let p = made.get(c);
  if (!p) {
    const d = join(tmp, `hf-${c}`);
    made.set(c, (p = runOracle('logits_oracle.py', ['make', d, c]).then(() => d)));
  }
  return p;
}

function maxDiff(ref: number[][], mine: Float32Array): number {
  let m = 0;
  ref.forEach((row, t) => row.forEach((v, i) => (m = Math.max(m, Math.abs(v - mine[t * row.length + i]!)))));
  return m;
}

async function ours(path: string, tokens: readonly number[], hfModel?: string): Promise<Float32Array> {
  const m = await openForForward(path, { blockBytes: 1 << 14, hfModel });
  try {
    return await forwardLogits(m.model, tokens);
  } finally {
    await m.close();
  }
}

async function verify(out: string, src: string, ...extra: string[]): Promise<{ code: number | null; report?: LogitsReport; stderr: string; stdout: string }> {
  const r = await runCli(['verify', out, '--against', src, '--logits', '--json', ...extra]);
  let report: LogitsReport | undefined;
  try {
    report = JSON.parse(r.stdout) as LogitsReport;
  } catch {
    /* an error: no report */
  }
  return { code: r.code, report, stderr: r.stderr, stdout: r.stdout };
}

const CASES = ['llama', 'llama31', 'mistral', 'qwen2', 'qwen3', 'mixtral', 'qwen3_moe', 'qwen3_moe_nonorm'];

for (const c of CASES) {
  test(`${c}: the HF reference forward equals transformers' fp32 logits`, async () => {
    const hf = await model(c);
    const ref = JSON.parse(await runOracle('logits_oracle.py', ['hf_logits', hf, JSON.stringify(TOKENS)])) as number[][];
    const d = maxDiff(ref, await ours(hf, TOKENS));
    assert.ok(d <= 1e-5, `max |Δ| ${d} against transformers`);
  });

  test(`${c}: verify --logits passes on HF → Megatron (F32, TP 2) and back`, async () => {
    const hf = await model(c);
    const meg = join(tmp, `${c}.megatron`);
    await convertHfToMegatron(hf, meg, { dtype: 'F32', tp: 2, ...(c.includes('moe') || c === 'mixtral' ? { ep: 2 } : {}) });
    const r = await verify(meg, hf);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.equal(r.report!.comparison.maxAbs, 0, 'a layout-only conversion computes bit-identical logits');
    const back = join(tmp, `${c}.back`);
    await convertMegatronToHf(meg, back, { hfModel: hf, dtype: 'F32' });
    const r2 = await verify(back, meg);
    assert.equal(r2.code, 0, r2.stdout + r2.stderr);
  });
}

test('llama: a BF16 conversion passes within the BF16 bound, and the report says so', async () => {
  const hf = await model('llama');
  const meg = join(tmp, 'llama.bf16');
  await convertHfToMegatron(hf, meg, { dtype: 'BF16' });
  const r = await verify(meg, hf);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const c = r.report!.comparison;
  assert.ok(c.maxAbs > 0 && c.top1Agreement === 1, JSON.stringify(c));
  assert.match(r.report!.tolerance.basis, /BF16/);
  process.stderr.write(`# bf16 conversion: max |Δ| ${c.maxAbs} of ${c.scale}, min cosine ${c.minCosine}\n`);
});

// megatron-core's own forward: checkpoints it saved (random weights, no training args: the shape comes from hf_ref).
for (const [script, args, label] of [
  ['megatron_oracle.py', ['llama', '--tp', '2', '--pp', '2'], 'llama TP 2 × PP 2'],
  ['megatron_oracle.py', ['qwen3', '--tp', '2'], 'qwen3 (q/k norm) TP 2'],
  ['megatron_oracle.py', ['qwen2', '--tied'], 'qwen2 (qkv bias, tied)'],
  ['moe_oracle.py', ['mixtral', '--ep', '2'], 'mixtral EP 2'],
  ['moe_oracle.py', ['qwen3_moe', '--ep', '2', '--tp', '2'], 'qwen3_moe EP 2 × TP 2'],
] as const) {
  test(`megatron-core ${label}: the Megatron reference forward equals megatron-core's logits`, async () => {
    const run = join(tmp, `mc-${label.replace(/\W+/g, '_')}`);
    await runOracle(script, ['save', run, ...args], { timeoutMs: 240_000 });
    const rows = [
      [1, 5, 9, 13, 2, 96, 40, 7],
      [3, 3, 80, 11, 0, 64, 22, 95],
    ];
    for (let b = 0; b < 2; b++) {
      const ref = JSON.parse(await runOracle('logits_oracle.py', ['saved_logits', join(run, 'logits.pt'), String(b)])) as number[][];
      const d = maxDiff(ref, await ours(run, rows[b]!, join(run, 'hf_ref')));
      assert.ok(d <= 1e-5, `row ${b}: max |Δ| ${d} against megatron-core`);
    }
    if (label.startsWith('llama')) {
      // Export, then the vocab-padding off-by-one in the export (megatron-core's padding rows are random).
      const hf = join(tmp, 'mc-llama.hf');
      await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
      const ok = await verify(hf, run, '--hf-model', join(run, 'hf_ref'));
      assert.equal(ok.code, 0, ok.stdout + ok.stderr);
      const leaked = join(tmp, 'mc-llama.leak');
      await runOracle('logits_oracle.py', ['leak', hf, run, leaked]);
      const bad = await verify(leaked, run, '--hf-model', join(run, 'hf_ref'));
      assert.equal(bad.code, 3, bad.stdout + bad.stderr);
      report('vocab padding row leaked into the HF export', bad.report!);
    }
  });
}

function report(what: string, r: LogitsReport): void {
  const c = r.comparison;
  process.stderr.write(`# broken (${what}): max |Δ| ${c.maxAbs.toPrecision(3)} of ${c.scale.toPrecision(3)}, min cosine ${c.minCosine.toFixed(4)}, top-1 ${(100 * c.top1Agreement).toFixed(0)}%, max KL ${c.maxKl.toPrecision(3)}\n`);
}

for (const [kind, c, what] of [
  ['qkv_plain', 'llama', 'linear_qkv as plain [q; k; v]'],
  ['gate_up', 'qwen3', 'linear_fc1 as [up; gate]'],
  ['rotary', 'llama', 'q/k rows in interleaved rotary order'],
  ['experts', 'mixtral', 'the experts in reverse order'],
] as const) {
  test(`verify --logits fails on a conversion with ${what}`, async () => {
    const hf = await model(c);
    const meg = join(tmp, `${kind}.good`);
    await convertHfToMegatron(hf, meg, { dtype: 'F32' });
    const broken = join(tmp, `${kind}.broken`);
    await runOracle('logits_oracle.py', ['break', meg, kind, broken, '--hf', hf]);
    const r = await verify(broken, hf);
    assert.equal(r.code, 3, r.stdout + r.stderr);
    assert.ok(r.report!.failures.length > 0);
    report(what, r.report!);
    if (kind === 'rotary') {
      // Position 0 has no rotation, so a rotary mistake needs a second position to show.
      const one = await verify(broken, hf, '--positions', '1');
      assert.equal(one.code, 0, 'one position cannot see a rotary error');
    }
  });
}

test('the text report: per-position table, tolerance and a greedy continuation decoded with tokenizer.json', async () => {
  const hf = await model('llama_tok');
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) await cp(join(repoRoot, 'test', 'fixtures', 'tokenizer', f), join(hf, f));
  const meg = join(tmp, 'tok.megatron');
  await convertHfToMegatron(hf, meg, { dtype: 'F32' });
  const r = await runCli(['verify', meg, '--against', hf, '--logits', '--prompt', 'hello world', '--generate', '3']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /^pos {2}token/m);
  assert.match(r.stdout, /greedy continuation \(3 tokens\)/);
  assert.match(r.stdout, /identical/);
  assert.match(r.stdout, /logits agree/);
  assert.doesNotMatch(r.stdout + r.stderr, /undefined/);
});

test('bad input: vocabularies that differ, too many positions, no reference forward, --prompt without a tokenizer, legacy MoE rank files', async () => {
  const a = await model('llama');
  const b = await model('llama_tok');
  const vocab = await verify(b, a);
  assert.equal(vocab.code, 1);
  assert.match(vocab.stderr, /vocabularies differ: .* 96 tokens .* 320/);

  const long = await verify(a, a, '--positions', '40');
  assert.equal(long.code, 2);
  assert.match(long.stderr, /40 prompt positions exceed the model's 32 positions/);

  const other = join(tmp, 'gpt2');
  await cp(a, other, { recursive: true });
  const cfg = JSON.parse(await readFile(join(other, 'config.json'), 'utf8')) as Record<string, unknown>;
  await writeFile(join(other, 'config.json'), JSON.stringify({ ...cfg, architectures: ['GPT2LMHeadModel'], model_type: 'gpt2' }));
  const un = await verify(other, a);
  assert.equal(un.code, 1);
  assert.match(un.stderr, /GPT2LMHeadModel has no reference forward pass \(verify --logits covers LlamaForCausalLM/);

  const noTok = await verify(a, a, '--prompt', 'hi');
  assert.equal(noTok.code, 1);
  assert.match(noTok.stderr, /--prompt needs a tokenizer\.json/);

  const moe = join(tmp, 'legacy-moe');
  await convertHfToMegatron(await model('mixtral'), moe, { dtype: 'F32', ckptFormat: 'torch', ep: 2 });
  const lg = await verify(moe, await model('mixtral'));
  assert.equal(lg.code, 1);
  assert.match(lg.stderr, /legacy MoE rank files have no reference forward yet/);

  const noAgainst = await runCli(['verify', a, '--logits']);
  assert.equal(noAgainst.code, 2);
  assert.match(noAgainst.stderr, /needs --against/);
  for (const r of [vocab, long, un, noTok, lg, noAgainst]) assert.doesNotMatch(r.stderr, /undefined|\n\s+at /);
});

test('the steps take verify_logits=true: both directions report the comparison (text and JSON)', async () => {
  const hf = await model('qwen2');
  const meg = join(tmp, 'step.megatron');
  const r = await runCli(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${hf}`, `megatron_path=${meg}`, 'dtype=float32', 'verify_logits=true', 'verify_positions=5']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /logits agree: .* computes the same model as/);
  assert.equal(r.stdout.match(/^ {2}\d {5,}/gm)?.length, 5, 'five positions compared');
  const back = join(tmp, 'step.hf');
  const j = await runCli(['steps', 'run', 'convert/megatron_to_hf', `megatron_path=${meg}`, `hf_path=${back}`, `hf_model_id=${hf}`, 'dtype=float32', 'verify_logits=true', '--json']);
  assert.equal(j.code, 0, j.stdout + j.stderr);
  const out = JSON.parse(j.stdout) as { logits: LogitsReport };
  assert.equal(out.logits.ok, true);
  assert.equal(out.logits.comparison.maxAbs, 0);
});

test('NxD shards are read rank by rank (each rank\'s heads, partial sums all-reduced): verify --logits passes on HF → NxD', async () => {
  for (const [c, flags] of [
    ['llama', ['--tp', '4', '--pp', '2', '--qkv-linear', '--kv-size-multiplier', '2', '--hw-backend', 'trn1']],
    ['qwen3', ['--tp', '2', '--pp', '3', '--qkv-linear', '--fuse-qkv', '--xser']],
    ['mistral', ['--tp', '2']],
  ] as const) {
    const hf = await model(c);
    const nxd = join(tmp, `${c}.nxd`);
    const conv = await runCli(['convert', '-q', '--to', 'nxd', hf, nxd, ...flags]);
    assert.equal(conv.code, 0, conv.stderr);
    const r = await verify(nxd, hf, '--hf-model', hf);
    assert.equal(r.code, 0, `${c} ${flags.join(' ')}: ${r.stdout}${r.stderr}`);
    assert.match(r.report!.output.describe, /NxD, tp \d/);
    // Summing the ranks' partials reorders the sums: close, not bit-identical.
    assert.ok(r.report!.comparison.maxAbs < 1e-5 * r.report!.comparison.scale, JSON.stringify(r.report!.comparison.maxAbs));
  }
  const noCfg = await verify(join(tmp, 'mistral.nxd'), await model('mistral'));
  assert.equal(noCfg.code, 1);
  assert.match(noCfg.stderr, /NxD shards carry no model config; name the model's HF directory with --hf-model/);
});

test('legacy rank files are read rank by rank: megatron-core\'s own TP 2 × PP 2 save gives its logits, and shardshift\'s legacy outputs pass', async () => {
  const run = join(tmp, 'mc-legacy');
  await runOracle('megatron_oracle.py', ['save_legacy', run, 'qwen2', '--tp', '2', '--pp', '2'], { timeoutMs: 240_000 });
  const rows = [
    [1, 5, 9, 13, 2, 96, 40, 7],
    [3, 3, 80, 11, 0, 64, 22, 95],
  ];
  for (let b = 0; b < 2; b++) {
    const ref = JSON.parse(await runOracle('logits_oracle.py', ['saved_logits', join(run, 'logits.pt'), String(b)])) as number[][];
    const d = maxDiff(ref, await ours(run, rows[b]!));
    assert.ok(d <= 1e-5, `row ${b}: max |Δ| ${d} against megatron-core's legacy model`);
  }
  for (const [c, flags] of [
    ['qwen3', ['--tp', '2', '--pp', '3']],
    ['llama31', ['--tp', '2']],
  ] as const) {
    const hf = await model(c);
    const out = join(tmp, `${c}.legacy`);
    await convertHfToMegatron(hf, out, { dtype: 'F32', ckptFormat: 'torch', tp: Number(flags[1]), ...(flags.length > 2 ? { pp: Number(flags[3]) } : {}) });
    const r = await verify(out, hf);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.report!.output.describe, /legacy rank files, tp 2/);
  }
});

test('an FP8 block-scaled HF source is read with its scales (as the conversion dequantises it): its Megatron conversion passes; other quantization methods are refused by name', async () => {
  const fp8 = join(tmp, 'llama-fp8');
  const q = JSON.parse(await runOracle('logits_oracle.py', ['fp8', await model('llama'), fp8])) as { quantized: number };
  assert.ok(q.quantized > 0);
  const meg = join(tmp, 'llama-fp8.megatron');
  await convertHfToMegatron(fp8, meg, { dtype: 'F32' });
  const r = await verify(meg, fp8);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.equal(r.report!.comparison.maxAbs, 0, 'the dequantised values, widened exactly, on both sides');
  const gptq = join(tmp, 'llama-gptq');
  await cp(await model('llama'), gptq, { recursive: true });
  const cfg = JSON.parse(await readFile(join(gptq, 'config.json'), 'utf8')) as Record<string, unknown>;
  await writeFile(join(gptq, 'config.json'), JSON.stringify({ ...cfg, quantization_config: { quant_method: 'gptq', bits: 4 } }));
  const g = await verify(gptq, await model('llama'));
  assert.equal(g.code, 1);
  assert.match(g.stderr, /quant_method "gptq" has no reference forward/);
});

test('legacy rank files of a tied model at PP > 1 need the last stage\'s output_layer, as megatron-core keeps one', async () => {
  const run = join(tmp, 'mc-legacy-tied');
  await runOracle('megatron_oracle.py', ['save_legacy', run, 'llama', '--tp', '2', '--pp', '2', '--tied'], { timeoutMs: 240_000 });
  const ref = JSON.parse(await runOracle('logits_oracle.py', ['saved_logits', join(run, 'logits.pt'), '0'])) as number[][];
  const d = maxDiff(ref, await ours(run, [1, 5, 9, 13, 2, 96, 40, 7]));
  assert.ok(d <= 1e-5, `max |Δ| ${d} against megatron-core's tied legacy model`);
});

test('Megatron-FSDP fsdp_dtensor outputs (per-layer keys) pass', async () => {
  const hf = await model('qwen3');
  const out = join(tmp, 'qwen3.fsdp');
  await convertHfToMegatron(hf, out, { dtype: 'F32', ckptFormat: 'fsdp_dtensor' });
  const r = await verify(out, hf);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.report!.output.describe, /fsdp_dtensor/);
  assert.equal(r.report!.comparison.maxAbs, 0);
});
