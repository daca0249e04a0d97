/**
 * Nemotron-H (hybrid Mamba-2 / attention / MLP / MoE) against transformers 5.24 and real
 * megatron-core 0.16.1 on CPU:
 * - HF → Megatron: megatron-core's own MambaModel (pattern M*-EME) loads the torch_dist output with
 *   `dist_checkpointing.load(strict=RAISE_ALL)` — Mamba in_proj / conv1d split keys included — and
 *   its logits equal transformers' (the oracle's CPU stand-ins for the CUDA-only Mamba kernels are
 *   listed in nemotronh_oracle.py);
 * - HF → Megatron → HF gives back model.safetensors byte for byte;
 * - a checkpoint megatron-core itself saves under TP=2 exports to HF that loads cleanly with
 *   megatron-core's logits.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-nemotronh-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const lastJson = <T>(s: string): T => JSON.parse(s.trim().split('\n').at(-1)!) as T;

test('nemotron_h: megatron-core MambaModel strictly loads the hybrid checkpoint with transformers\' logits; HF → Megatron → HF is byte-identical', async () => {
  const hf = join(tmp, 'hf');
  await runOracle('nemotronh_oracle.py', ['make', hf]);
  const meg = join(tmp, 'meg');
  await convertHfToMegatron(hf, meg, { dtype: 'F32' });
  const r = lastJson<{ max_abs_diff: number; layer_types: string[]; split_keys: string[] }>(await runOracle('nemotronh_oracle.py', ['load', join(meg, 'iter_0000000'), hf]));
  assert.deepEqual(r.layer_types, ['M', '*', '-', 'E', 'M', 'E']);
  assert.ok(r.split_keys.includes('decoder.layers.0.mixer.in_proj.weight.z'), `split keys: ${r.split_keys.join(', ')}`);
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
  const back = join(tmp, 'back');
  await convertMegatronToHf(meg, back, {});
  assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), 'round trip is not byte-identical');
});

test('megatron-core MambaModel saved at TP=2 (split Mamba keys, TP-sharded mixer) → HF: clean load, megatron-core\'s logits', async () => {
  const run = join(tmp, 'saved-tp2');
  await runOracle('nemotronh_oracle.py', ['save', run, '--tp', '2'], { timeoutMs: 300_000 });
  const hf = `${run}.hf`;
  await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const r = lastJson<{ max_abs_diff: number; missing: string[]; unexpected: string[] }>(await runOracle('nemotronh_oracle.py', ['check_hf', hf, run]));
  assert.deepEqual(r.missing, []);
  assert.deepEqual(r.unexpected, []);
  assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
});

test('nemotron_h in bf16 as published (router float32): HF → Megatron keeps router weight and expert_bias float32, megatron-core (bf16) strictly loads them bit for bit, HF → Megatron → HF is byte-identical in dtype and value', async () => {
  const hf = join(tmp, 'hf-bf16');
  const made = lastJson<{ f32: string[] }>(await runOracle('nemotronh_oracle.py', ['make_bf16', hf]));
  assert.equal(made.f32.length, 4, 'transformers keeps two routers (weight and bias) float32');
  const meg = join(tmp, 'meg-bf16');
  const r = await convertHfToMegatron(hf, meg, {});
  assert.equal(r.plan.dtypeExceptions?.length, 4, 'the plan lists the four float32 tensors');
  const m = lastJson<{ expert_biases: number; bias_wrong_layers: number[]; stored_router_dtypes: Record<string, string>; max_abs_diff: number; max_abs: number; top1_agree: number }>(
    await runOracle('nemotronh_oracle.py', ['load_bf16', join(meg, 'iter_0000000'), hf]),
  );
  assert.equal(m.expert_biases, 2);
  assert.deepEqual(m.bias_wrong_layers, []);
  assert.ok(Object.values(m.stored_router_dtypes).every((d) => d === 'torch.float32'), JSON.stringify(m.stored_router_dtypes));
  // bf16 on both sides, different operation orders: close, and the same next token everywhere.
  assert.ok(m.max_abs_diff < 0.02 * Math.max(1, m.max_abs), `bf16 logits differ by ${m.max_abs_diff}`);
  assert.equal(m.top1_agree, 1);
  const back = join(tmp, 'back-bf16');
  await convertMegatronToHf(meg, back, {});
  assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), 'round trip is not byte-identical');
});
