/**
 * Megatron-FSDP fsdp_dtensor ↔ HF. The fsdp_dtensor checkpoints are written by the test harness
 * following Megatron-LM's source with real torch DCP and DTensors row-sharded unevenly over two
 * gloo ranks (Megatron-FSDP itself needs CUDA): shardshift reads them into HF with the original
 * logits, and its own fsdp_dtensor output holds exactly the tensors the harness derives.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { sortKeys, type TensorDigest } from '../helpers/describe.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-fsdp-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('fsdp_dtensor (uneven DTensor row shards, weight_w/weight_v) → HF with the original logits', async () => {
  const hf = join(tmp, 'hf');
  await runOracle('models_oracle.py', ['make', hf, 'llama_gqa']);
  const run = join(tmp, 'fsdp-run');
  await runOracle('fsdp_oracle.py', ['make', run, hf]);
  const out = join(tmp, 'back');
  const r = await convertMegatronToHf(run, out, { hfModel: hf, dtype: 'F32' });
  assert.ok(r.plan.notes?.some((n) => n.includes('iteration')));
  const cmp = JSON.parse(await runOracle('models_oracle.py', ['compare_hf', out, hf])) as { max_abs_diff: number };
  assert.equal(cmp.max_abs_diff, 0);
});

test('HF → fsdp_dtensor holds exactly the state dict Megatron-FSDP would save', async () => {
  const hf = join(tmp, 'hf');
  const out = join(tmp, 'ours');
  await convertHfToMegatron(hf, out, { ckptFormat: 'fsdp_dtensor', dtype: 'F32' });
  const expected = join(tmp, 'expected.pt');
  await runOracle('fsdp_oracle.py', ['expected', hf, expected]);
  const want = JSON.parse(await runOracle('formats_oracle.py', ['dump', 'torch', expected])) as { tensors: Record<string, TensorDigest> };
  const got = JSON.parse(await runOracle('formats_oracle.py', ['dump', 'dcp', join(out, 'iter_0000000')])) as { tensors: Record<string, TensorDigest>; objects: Record<string, string> };
  assert.deepEqual(sortKeys(got.tensors), sortKeys(want.tensors));
  assert.deepEqual(Object.keys(got.objects).sort(), ['checkpoint_version', 'iteration']);
});
