/**
 * LoRA without Python: exact fp32 FMA against a BigInt reference, peft's target/rank/alpha matching
 * rules, adapter_config.json refusals, a hand-checked merge, and bad input through the real CLI
 * on synthetic bases and adapters (one clear message, nothing written).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, mkdir, readdir, readFile, rm, writeFile, cp } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { encodeHeader } from '../../src/formats/safetensors.js';
import { dotChain, fma32, loraDot, setMklPath } from '../../src/tensor/fp32.js';
import { moduleScaling, patternValue, targetStatus } from '../../src/lora/match.js';
import { parseAdapterConfig } from '../../src/formats/peft.js';
import { laneNorm } from '../../src/lora/merge.js';
import { mergeLora } from '../../src/plan/lora-convert.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { wholeBox } from '../../src/tensor/layout.js';
import { produceBox } from '../../src/lazy/expr.js';
import { cli } from '../helpers/cli.js';

// ---------------------------------------------------------------------------------------------
// Exact float32 FMA

const f32buf = new DataView(new ArrayBuffer(4));
/** v = m · 2^e for a float32 value. */
function decompose(v: number): { m: bigint; e: number } {
  f32buf.setFloat32(0, v);
  const u = f32buf.getUint32(0);
  const exp = (u >>> 23) & 0xff;
  const frac = u & 0x7fffff;
  const m = BigInt(exp === 0 ? frac : frac | 0x800000);
  return { m: u >>> 31 ? -m : m, e: exp === 0 ? -149 : exp - 150 };
}
/** Correctly rounded (RNE) float32 of the exact a·b + c, by integer arithmetic. */
function refFma(a: number, b: number, c: number): number {
  const A = decompose(a);
  const B = decompose(b);
  const C = decompose(c);
  const ep = A.e + B.e;
  const E = Math.min(ep, C.e);
  const n = ((A.m * B.m) << BigInt(ep - E)) + (C.m << BigInt(C.e - E));
  if (n === 0n) return 0;
  const neg = n < 0n;
  let x = neg ? -n : n;
  const len = x.toString(2).length;
  const lead = len - 1 + E;
  const shift = lead >= -126 ? len - 24 : -149 - E;
  let exp = E;
  if (shift > 0) {
    const q = x >> BigInt(shift);
    const rem = x - (q << BigInt(shift));
    const half = 1n << BigInt(shift - 1);
    x = rem > half || (rem === half && (q & 1n) === 1n) ? q + 1n : q;
    exp = E + shift;
  }
  const v = Number(x) * 2 ** exp;
  const r = Math.fround(v);
  assert.equal(r, v, 'reference result is a float32');
  return neg ? -r : r;
}

function rand32(rng: () => number): number {
  const mant = 1 + rng();
  const exp = Math.floor(rng() * 40) - 20;
  return Math.fround((rng() < 0.5 ? -1 : 1) * mant * 2 ** exp);
}

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test('fma32 is the correctly rounded float32 a·b + c (random operands and binary64 double-rounding traps)', () => {
  const rng = lcg(7);
  for (let i = 0; i < 200_000; i++) {
    const a = rand32(rng);
    const b = rand32(rng);
    const c = i % 3 === 0 ? Math.fround(-a * b * (1 + rng() * 2 ** -20)) : rand32(rng);
    assert.equal(fma32(a, b, c), refFma(a, b, c), `fma32(${a}, ${b}, ${c})`);
  }
  // a·b = 2^-24 − 2^-70: the binary64 sum 1 + 2^-23 + 2^-24 − 2^-70 rounds onto a float32 midpoint,
  // where Math.fround(a*b + c) would round up to even; the exact value is below the midpoint.
  const a = Math.fround(1 + 2 ** -23);
  const b = Math.fround(2 ** -24 * (1 - 2 ** -23));
  const c = Math.fround(1 + 2 ** -23);
  assert.equal(Math.fround(a * b + c), 1 + 2 ** -22, 'the naive binary64 route rounds the wrong way');
  assert.equal(fma32(a, b, c), 1 + 2 ** -23);
  assert.equal(refFma(a, b, c), 1 + 2 ** -23);
  // and the mirror image: just above a midpoint that ties down to even
  const b2 = Math.fround(2 ** -24 * (1 + 2 ** -23));
  const c2 = Math.fround(1);
  assert.equal(fma32(Math.fround(1 - 2 ** -24), b2, c2), refFma(Math.fround(1 - 2 ** -24), b2, c2));
  // subnormal range
  for (let i = 0; i < 20_000; i++) {
    const x = Math.fround((rng() - 0.5) * 2 ** -60);
    const y = Math.fround((rng() - 0.5) * 2 ** -70);
    const z = Math.fround((rng() - 0.5) * 2 ** -128);
    assert.equal(fma32(x, y, z), refFma(x, y, z), `fma32(${x}, ${y}, ${z})`);
  }
});

test('loraDot, AVX512 MKL: one FMA chain up to rank 384, two halves added in fp32 up to 768', () => {
  const rng = lcg(3);
  setMklPath('avx512');
  try {
    for (const r of [1, 7, 16, 384, 385, 500, 768]) {
      const x = Float32Array.from({ length: r }, () => rand32(rng));
      const y = Float32Array.from({ length: r }, () => rand32(rng));
      let chain = 0;
      for (let k = 0; k < r; k++) chain = refFma(x[k]!, y[k]!, chain);
      if (r <= 384) {
        assert.equal(loraDot(x, 0, y, 0, r), chain);
        assert.equal(dotChain(x, 0, y, 0, r), chain);
      } else {
        const h = Math.ceil(r / 2);
        let c1 = 0;
        let c2 = 0;
        for (let k = 0; k < h; k++) c1 = refFma(x[k]!, y[k]!, c1);
        for (let k = h; k < r; k++) c2 = refFma(x[k]!, y[k]!, c2);
        assert.equal(loraDot(x, 0, y, 0, r), Math.fround(c1 + c2));
      }
    }
  } finally {
    setMklPath(undefined);
  }
});

test('loraDot, AVX2 MKL: FMA chains over blocks of 192, added in order', () => {
  const rng = lcg(4);
  setMklPath('avx2');
  try {
    for (const r of [1, 16, 192, 193, 500, 1000]) {
      const x = Float32Array.from({ length: r }, () => rand32(rng));
      const y = Float32Array.from({ length: r }, () => rand32(rng));
      let acc = 0;
      for (let b = 0; b < r; b += 192) {
        let c = 0;
        for (let k = b; k < Math.min(r, b + 192); k++) c = refFma(x[k]!, y[k]!, c);
        acc = b === 0 ? c : Math.fround(acc + c);
      }
      assert.equal(loraDot(x, 0, y, 0, r), acc, `r=${r}`);
    }
  } finally {
    setMklPath(undefined);
  }
});

test('laneNorm sums squares in 8 fp32 lanes, folds them left to right, then the tail', () => {
  const v = Float32Array.from({ length: 21 }, (_, i) => Math.fround(Math.sin(i + 1) * 3));
  const lanes = new Array<number>(8).fill(0);
  for (let d = 0; d < 16; d++) lanes[d % 8] = Math.fround(lanes[d % 8]! + Math.fround(v[d]! * v[d]!));
  let s = lanes[0]!;
  for (let l = 1; l < 8; l++) s = Math.fround(s + lanes[l]!);
  for (let d = 16; d < 21; d++) s = Math.fround(s + Math.fround(v[d]! * v[d]!));
  assert.equal(laneNorm(v, 0, 21), Math.fround(Math.sqrt(s)));
});

// ---------------------------------------------------------------------------------------------
// peft's matching rules

const cfgOf = (o: Record<string, unknown>) => parseAdapterConfig(JSON.stringify({ peft_type: 'LORA', r: 8, lora_alpha: 16, ...o }), 'adapter_config.json');

test('target_modules: list suffix/exact match, regex full match, layers_to_transform, exclude_modules, modules_to_save', () => {
  const list = cfgOf({ target_modules: ['q_proj', 'mlp.down_proj'] });
  assert.equal(targetStatus(list, 'model.layers.0.self_attn.q_proj'), true);
  assert.equal(targetStatus(list, 'model.layers.0.mlp.down_proj'), true);
  assert.match(String(targetStatus(list, 'model.layers.0.self_attn.qq_proj')), /not matched/);
  const rx = cfgOf({ target_modules: '.*\\.layers\\.[01]\\.self_attn\\.(q|k)_proj' });
  assert.equal(targetStatus(rx, 'model.layers.1.self_attn.k_proj'), true);
  assert.notEqual(targetStatus(rx, 'model.layers.2.self_attn.k_proj'), true);
  assert.notEqual(targetStatus(rx, 'model.layers.1.self_attn.k_proj.extra'), true, 'full match, not search');
  const layers = cfgOf({ target_modules: ['q_proj'], layers_to_transform: [0, 2] });
  assert.equal(targetStatus(layers, 'model.layers.2.self_attn.q_proj'), true);
  assert.match(String(targetStatus(layers, 'model.layers.1.self_attn.q_proj')), /layer 1 not in layers_to_transform/);
  assert.equal(targetStatus(cfgOf({ target_modules: ['q_proj'], layers_to_transform: 1, layers_pattern: 'h' }), 'transformer.h.1.attn.q_proj'), true);
  const ex = cfgOf({ target_modules: ['q_proj', 'v_proj'], exclude_modules: ['model.layers.0.self_attn.v_proj'] });
  assert.match(String(targetStatus(ex, 'model.layers.0.self_attn.v_proj')), /excluded/);
  assert.equal(targetStatus(ex, 'model.layers.1.self_attn.v_proj'), true);
  const mts = cfgOf({ target_modules: ['lm_head', 'q_proj'], modules_to_save: ['lm_head'] });
  assert.match(String(targetStatus(mts, 'lm_head')), /modules_to_save/);
});

test('rank_pattern / alpha_pattern: first key in file order matching (.*\\.)?(key)$; rsLoRA uses sqrt(r)', () => {
  const c = cfgOf({ target_modules: ['q_proj', 'v_proj'], rank_pattern: { 'layers.2.self_attn.q_proj': 4, q_proj: 6 }, alpha_pattern: { v_proj: 5 } });
  assert.deepEqual(moduleScaling(c, 'model.layers.2.self_attn.q_proj'), { r: 4, alpha: 16, scaling: 4 });
  assert.deepEqual(moduleScaling(c, 'model.layers.12.self_attn.q_proj'), { r: 6, alpha: 16, scaling: 16 / 6 }, 'layers.2 must not match layers.12 (anchored at a dot)');
  assert.deepEqual(moduleScaling(c, 'model.layers.0.self_attn.v_proj'), { r: 8, alpha: 5, scaling: 5 / 8 });
  const rs = cfgOf({ target_modules: ['q_proj'], use_rslora: true });
  assert.equal(moduleScaling(rs, 'model.layers.0.self_attn.q_proj').scaling, 16 / Math.sqrt(8));
  assert.equal(patternValue([['q_proj', 3]], 'model.q_proj_x', 9, 'x'), 9);
});

test('adapter_config.json: other tuner types, base-mutating inits and unsupported options are refused by name', () => {
  assert.throws(() => parseAdapterConfig(JSON.stringify({ peft_type: 'IA3' }), 'a.json'), /peft_type IA3 is not supported/);
  assert.throws(() => parseAdapterConfig(JSON.stringify({ peft_type: 'ADALORA' }), 'a.json'), /peft_type ADALORA/);
  for (const [init, name] of [['pissa', 'PiSSA'], ['pissa_niter_4', 'PiSSA'], ['olora', 'OLoRA'], ['corda', 'CorDA'], ['loftq', 'LoftQ'], ['lora_ga', 'LoRA-GA']]) {
    assert.throws(() => cfgOf({ init_lora_weights: init }), new RegExp(`"${init}" \\(${name}\\) rewrites the base weights`));
  }
  assert.throws(() => cfgOf({ target_parameters: ['experts.gate_up_proj'] }), /target_parameters/);
  assert.throws(() => cfgOf({ trainable_token_indices: [1, 2] }), /trainable_token_indices/);
  assert.throws(() => cfgOf({ use_bdlora: { nblocks: 2 } }), /BD-LoRA/);
  assert.throws(() => cfgOf({ bias: 'some' }), /bias must be/);
  assert.throws(() => cfgOf({ r: 0 }), /r must be a positive integer/);
  assert.throws(() => parseAdapterConfig('{"peft_type": "LORA",', 'a.json'), /not valid JSON/);
  assert.throws(() => parseAdapterConfig('{}', 'a.json'), /no peft_type/);
  assert.equal(cfgOf({ init_lora_weights: 'gaussian' }).initLoraWeights, 'gaussian');
});

// ---------------------------------------------------------------------------------------------
// Synthetic bases and adapters

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-lora-unit-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

type Arr = { dtype: 'F32' | 'BF16'; shape: number[]; data: Float32Array };
function f32(shape: number[], fn: (i: number) => number): Arr {
  const n = shape.reduce((a, b) => a * b, 1);
  return { dtype: 'F32', shape, data: Float32Array.from({ length: n }, (_, i) => Math.fround(fn(i))) };
}
async function writeSt(path: string, tensors: Record<string, Arr>): Promise<void> {
  const entries = Object.entries(tensors)
    .map(([name, t]) => ({ name, dtype: t.dtype, shape: t.shape, byteLength: t.data.length * 4, data: t.data }))
    .sort((a, b) => (a.name < b.name ? -1 : 1));
  const header = encodeHeader(entries, new Map([['format', 'pt']]));
  await writeFile(path, Buffer.concat([header, ...entries.map((e) => Buffer.from(e.data.buffer))]));
}

const H = 8;
async function makeBase(dir: string, hidden = H): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'config.json'), JSON.stringify({ model_type: 'llama', architectures: ['LlamaForCausalLM'], hidden_size: hidden, tie_word_embeddings: false }));
  await writeSt(join(dir, 'model.safetensors'), {
    'model.embed_tokens.weight': f32([5, hidden], (i) => Math.sin(i) / 4),
    'model.layers.0.self_attn.q_proj.weight': f32([hidden, hidden], (i) => Math.cos(i) / 3),
    'model.layers.0.self_attn.v_proj.weight': f32([4, hidden], (i) => Math.cos(i * 1.7) / 3),
    'model.layers.0.input_layernorm.weight': f32([hidden], () => 1),
    'lm_head.weight': f32([5, hidden], (i) => Math.sin(i * 0.3)),
  });
}

async function makeAdapter(dir: string, cfg: Record<string, unknown>, tensors: Record<string, Arr>, opts: { noConfig?: boolean } = {}): Promise<void> {
  await mkdir(dir, { recursive: true });
  if (!opts.noConfig) await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'], base_model_name_or_path: 'base', ...cfg }));
  await writeSt(join(dir, 'adapter_model.safetensors'), tensors);
}

const P = 'base_model.model.model.layers.0.self_attn.';
const goodLora = (): Record<string, Arr> => ({
  [`${P}q_proj.lora_A.weight`]: f32([2, H], (i) => (i % 5) / 8 - 0.25),
  [`${P}q_proj.lora_B.weight`]: f32([H, 2], (i) => (i % 3) / 4 - 0.3),
});

test('a hand-checkable merge: W + (B @ A) × alpha/r, rounded as fp32, everything else copied', async () => {
  const base = join(tmp, 'base');
  await makeBase(base);
  const ad = join(tmp, 'ad-good');
  const t = goodLora();
  await makeAdapter(ad, {}, t);
  const out = join(tmp, 'merged-good');
  const r = await mergeLora(base, ad, out);
  assert.ok(r.plan.notes!.some((n) => /1 module \(1 linear\)/.test(n)));
  const src = await openCheckpoint(out);
  const bsrc = await openCheckpoint(base);
  try {
    const read = async (s: typeof src, n: string): Promise<Float32Array> => {
      const x = s.tensors.get(n)!;
      const b = new Uint8Array(x.byteLength);
      await x.read(wholeBox(x.shape), b);
      return new Float32Array(b.buffer);
    };
    const w = await read(bsrc, 'model.layers.0.self_attn.q_proj.weight');
    const m = await read(src, 'model.layers.0.self_attn.q_proj.weight');
    const A = t[`${P}q_proj.lora_A.weight`]!.data;
    const B = t[`${P}q_proj.lora_B.weight`]!.data;
    for (let o = 0; o < H; o++) {
      for (let i = 0; i < H; i++) {
        const d = Math.fround(refFma(B[o * 2 + 1]!, A[H + i]!, refFma(B[o * 2]!, A[i]!, 0)) * 2);
        assert.equal(m[o * H + i], Math.fround(w[o * H + i]! + d));
      }
    }
    assert.deepEqual(await read(src, 'model.layers.0.self_attn.v_proj.weight'), await read(bsrc, 'model.layers.0.self_attn.v_proj.weight'));
    assert.deepEqual([...src.tensors.keys()].sort(), [...bsrc.tensors.keys()].sort());
  } finally {
    await src.close();
    await bsrc.close();
  }
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => {
      res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

async function expectFailure(adapter: string, re: RegExp, opts: { base?: string; code?: number; extra?: string[] } = {}): Promise<string> {
  const out = join(tmp, `out-${Math.random().toString(36).slice(2)}`);
  const r = await run(['merge-lora', '--adapter', adapter, '--base', opts.base ?? join(tmp, 'base'), ...(opts.extra ?? []), out]);
  assert.equal(r.code, opts.code ?? 1, `exit code (stderr: ${r.stderr})`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one message line, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^shardshift: error: /);
  assert.match(lines[0]!, re);
  assert.ok(!/\n\s+at /.test(r.stderr), 'no stack trace');
  assert.ok(!existsSync(out), 'nothing written');
  assert.deepEqual((await readdir(tmp)).filter((n) => n.includes('.partial')), [], 'no partial output left behind');
  return lines[0]!;
}

test('bad input: missing adapter_config.json', async () => {
  const ad = join(tmp, 'ad-noconfig');
  await makeAdapter(ad, {}, goodLora(), { noConfig: true });
  await expectFailure(ad, /ad-noconfig: no adapter_config\.json/);
  const full = join(tmp, 'looks-like-model');
  await makeBase(full);
  await expectFailure(full, /no adapter_config\.json.*is this a full model rather than an adapter/);
});

test('bad input: rank mismatch between lora_A and lora_B', async () => {
  const ad = join(tmp, 'ad-rank');
  const t = goodLora();
  t[`${P}q_proj.lora_B.weight`] = f32([H, 3], () => 0.1);
  await makeAdapter(ad, {}, t);
  await expectFailure(ad, /q_proj: rank mismatch: lora_A \[2, 8\] has rank 2 but lora_B \[8, 3\] has rank 3/);
  const ad2 = join(tmp, 'ad-rank-config');
  await makeAdapter(ad2, { r: 4 }, goodLora());
  await expectFailure(ad2, /adapter_config\.json gives rank 4 \(r \/ rank_pattern\) but the LoRA tensors have rank 2/);
});

test('bad input: unsupported tuner type (IA3) is refused by name', async () => {
  const ad = join(tmp, 'ad-ia3');
  await makeAdapter(ad, { peft_type: 'IA3' }, { [`${P}q_proj.ia3_l`]: f32([H, 1], () => 1) });
  await expectFailure(ad, /peft_type IA3 is not supported/);
});

test('bad input: target module not found in the base', async () => {
  const ad = join(tmp, 'ad-notfound');
  const t = goodLora();
  t['base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'] = f32([2, H], () => 0.1);
  t['base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight'] = f32([H, 2], () => 0.1);
  await makeAdapter(ad, {}, t);
  await expectFailure(ad, /the base .* has no model\.layers\.3\.self_attn\.q_proj\.weight \(target module not found in the base\)/);
});

test('bad input: adapter for a different base (shapes), and base identity (--force-base waives only the name)', async () => {
  const wide = join(tmp, 'base-wide');
  await makeBase(wide, 12);
  const ad = join(tmp, 'ad-shape');
  await makeAdapter(ad, {}, goodLora());
  const msg = await expectFailure(ad, /adapter does not fit the base/, { base: wide });
  assert.match(msg, /model\.layers\.0\.self_attn\.q_proj\.weight: the adapter's lora_A \[2, 8\] \/ lora_B \[8, 2\] need a base weight \[8, 8\], the base has \[12, 12\]/);
  await expectFailure(ad, /adapter does not fit the base/, { base: wide, extra: ['--force-base'] });
  const other = join(tmp, 'other-name');
  await cp(join(tmp, 'base'), other, { recursive: true });
  await expectFailure(ad, /trained on base_model_name_or_path "base", but the base .* is named "other-name".*--force-base/, { base: other });
  // a Hugging Face cache snapshot directory is named by its revision; the repo name is in the path
  const snap = join(tmp, 'hub', 'models--some-org--base', 'snapshots', '0123abcd');
  await cp(join(tmp, 'base'), snap, { recursive: true });
  const viaCache = await run(['merge-lora', '--adapter', ad, '--base', snap, '-q', join(tmp, 'from-cache')]);
  assert.equal(viaCache.code, 0, viaCache.stderr);
  const out = join(tmp, 'forced');
  const r = await run(['merge-lora', '--adapter', ad, '--base', other, '--force-base', '-q', out]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(existsSync(join(out, 'model.safetensors')));
});

test('bad input: LoRA tensors the config does not target, and targeted modules without tensors', async () => {
  const ad = join(tmp, 'ad-untargeted');
  const t = goodLora();
  t[`${P}v_proj.lora_A.weight`] = f32([2, H], () => 0.1);
  t[`${P}v_proj.lora_B.weight`] = f32([4, 2], () => 0.1);
  await makeAdapter(ad, {}, t);
  await expectFailure(ad, /v_proj: LoRA tensors for a module adapter_config\.json does not target \(not matched by target_modules\)/);
  const ad2 = join(tmp, 'ad-incomplete');
  await makeAdapter(ad2, { target_modules: ['q_proj', 'v_proj'] }, goodLora());
  await expectFailure(ad2, /targets model\.layers\.0\.self_attn\.v_proj but the adapter has no LoRA tensors for it/);
  const ad3 = join(tmp, 'ad-halfpair');
  await makeAdapter(ad3, {}, { [`${P}q_proj.lora_A.weight`]: f32([2, H], () => 0.1) });
  await expectFailure(ad3, /module model\.layers\.0\.self_attn\.q_proj has lora_A\.weight but no lora_B\.weight/);
  const ad4 = join(tmp, 'ad-dora-missing');
  await makeAdapter(ad4, { use_dora: true }, goodLora());
  await expectFailure(ad4, /use_dora is true but the module has no lora_magnitude_vector/);
});

test('usage: the output may not be inside the adapter; the base must be a directory', async () => {
  const ad = join(tmp, 'ad-good');
  const inside = await run(['merge-lora', '--adapter', ad, '--base', join(tmp, 'base'), join(ad, 'merged')]);
  assert.equal(inside.code, 2, inside.stderr);
  assert.match(inside.stderr, /inside the adapter directory/);
  assert.ok(!existsSync(join(ad, 'merged')));
  const r = await run(['merge-lora', '--adapter', ad, '--base', join(tmp, 'base', 'model.safetensors'), join(tmp, 'o-file')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /give the HF model directory/);
});

test('merged tensors give the same bytes whatever the executor\'s boxes (whole rows, partial rows; DoRA both layouts)', async () => {
  const { mergedWeight } = await import('../../src/lora/merge.js');
  const mk = (name: string, shape: number[], fn: (i: number) => number) => {
    const n = shape.reduce((x, y) => x * y, 1);
    const data = new Uint8Array(Float32Array.from({ length: n }, (_, i) => Math.fround(fn(i))).buffer);
    const strides = shape.map((_, k) => shape.slice(k + 1).reduce((x, y) => x * y, 1));
    return {
      name,
      dtype: 'F32' as const,
      shape,
      byteLength: n * 4,
      where: name,
      read: async (b: { start: readonly number[]; size: readonly number[] }, out: Uint8Array) => {
        let at = 0;
        const idx = b.size.map(() => 0);
        const total = b.size.reduce((x, y) => x * y, 1);
        for (let e = 0; e < total; e++) {
          const off = idx.reduce((s, v, k) => s + (b.start[k]! + v) * strides[k]!, 0);
          out.set(data.subarray(off * 4, off * 4 + 4), at);
          at += 4;
          for (let k = idx.length - 1; k >= 0; k--) {
            if (++idx[k]! < b.size[k]!) break;
            idx[k] = 0;
          }
        }
      },
    };
  };
  for (const layout of ['out-in', 'in-out'] as const) {
    const [rows, cols] = [6, 20];
    const out = layout === 'out-in' ? rows : cols;
    const inn = layout === 'out-in' ? cols : rows;
    const w = mk('w', [rows, cols], (i) => Math.sin(i) / 2);
    const base = { kind: 'produced' as const, name: 'w', dtype: 'F32' as const, shape: w.shape, byteLength: w.byteLength, describe: 'w', produce: w.read };
    const module = { name: 'm', kind: 'linear' as const, a: mk('a', [3, inn], (i) => Math.cos(i) / 3), b: mk('b', [out, 3], (i) => Math.sin(i * 0.7) / 3), magnitude: mk('mag', [out], (i) => 1 + i / 10) };
    for (const dora of [false, true]) {
      const t = mergedWeight({ name: 'w', base, module, layout, scaling: 1.5, rounding: { roundDelta: false }, dora, describe: 'x' });
      const whole = new Uint8Array(rows * cols * 4);
      await produceBox(t, { start: [0, 0], size: [rows, cols] }, whole);
      const pieces = new Uint8Array(rows * cols * 4);
      const piece = new Uint8Array(7 * 4);
      for (let r = 0; r < rows; r++) {
        for (let c = 0; c < cols; c += 7) {
          const n = Math.min(7, cols - c);
          await produceBox(t, { start: [r, c], size: [1, n] }, piece.subarray(0, n * 4));
          pieces.set(piece.subarray(0, n * 4), (r * cols + c) * 4);
        }
      }
      assert.deepEqual(pieces, whole, `${layout} dora=${dora}`);
      assert.notDeepEqual(whole, new Uint8Array(await (async () => { const b = new Uint8Array(rows * cols * 4); await w.read({ start: [0, 0], size: [rows, cols] }, b); return b; })()), 'the merge changes the weight');
    }
  }
});

test('base identity by content when base_model_name_or_path is a local directory (issue 16, defect 12)', async () => {
  const recorded = join(tmp, 'local-base');
  await makeBase(recorded);
  // Same name, other weights: a different fine-tune saved under the same directory name elsewhere.
  const impostor = join(tmp, 'elsewhere', 'local-base');
  await makeBase(impostor);
  const st = join(impostor, 'model.safetensors');
  const bytes = await readFile(st);
  bytes[bytes.length - 1] = bytes.at(-1)! ^ 1;
  await writeFile(st, bytes);
  const ad = join(tmp, 'ad-local');
  await makeAdapter(ad, { base_model_name_or_path: recorded }, goodLora());
  await expectFailure(ad, /trained on the local base ".*local-base", and .*elsewhere\/local-base holds other weights.*--force-base/, { base: impostor });
  // A byte-identical copy elsewhere is the same base.
  const copy = join(tmp, 'copy-of-local-base');
  await cp(recorded, copy, { recursive: true });
  const ok = await run(['merge-lora', '--adapter', ad, '--base', copy, '-q', join(tmp, 'merged-local')]);
  assert.equal(ok.code, 0, ok.stderr);
  const forced = await run(['merge-lora', '--adapter', ad, '--base', impostor, '--force-base', '-q', join(tmp, 'merged-forced')]);
  assert.equal(forced.code, 0, forced.stderr);
});
