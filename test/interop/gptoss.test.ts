/**
 * GPT-OSS against real megatron-core 0.16.1 on CPU and transformers 5:
 * - HF → Megatron (local-spec keys) loads into megatron-core's GPTModel configured as
 *   Megatron-Bridge's GPT-OSS provider (biases, learnable softmax offset = sinks, clamped
 *   quick-GEGLU, sliding-window layers) with `dist_checkpointing.load(strict=RAISE_ALL)`;
 *   logits equal transformers';
 * - HF → Megatron (TE keys, and local keys) → HF gives back model.safetensors byte for byte.
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-gptoss-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('gpt_oss: megatron-core strictly loads every key with transformers\' logits; HF → Megatron → HF is byte-identical', async (t) => {
  const hf = join(tmp, 'hf');
  await runOracle('gptoss_oracle.py', ['make', hf]);
  const local = join(tmp, 'local');
  await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
  const r = JSON.parse(await runOracle('gptoss_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { keys: string[]; forward_error?: string; max_abs_diff?: number; max_abs?: number };
  for (const k of ['decoder.layers.self_attention.core_attention.softmax_offset', 'decoder.layers.self_attention.linear_proj.bias', 'decoder.layers.mlp.router.bias', 'decoder.layers.mlp.experts.experts.linear_fc1.bias', 'decoder.layers.mlp.experts.experts.linear_fc2.bias']) {
    assert.ok(r.keys.includes(k), `megatron-core's sharded state dict has no ${k}`);
  }
  assert.equal(r.forward_error, undefined);
  t.diagnostic(`strict load of ${r.keys.length} keys; max |logits − transformers'| = ${r.max_abs_diff} (max |logit| ${r.max_abs})`);
  assert.ok(r.max_abs_diff! < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff} (max |logit| ${r.max_abs})`);
  const te = join(tmp, 'te');
  await convertHfToMegatron(hf, te, { dtype: 'F32' });
  for (const [meg, name] of [[te, 'te'], [local, 'local']] as const) {
    const back = join(tmp, `${name}.back`);
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${name} keys: round trip is not byte-identical`);
  }
});
