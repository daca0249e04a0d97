/**
 * OLMoE (`OlmoeForCausalLM`: full-width q/k RMSNorms, softmax-routed MoE without shared experts)
 * against real megatron-core 0.16.1 on CPU with Megatron-Bridge's OLMoE attention (its
 * `OLMoESelfAttention`, copied into test/oracle/olmoe_oracle.py) and transformers 5.24:
 *
 * - HF → Megatron (local spec) loads strictly, logits equal transformers';
 * - HF → Megatron (TE keys, local names, legacy EP / PP rank files) → HF is byte-identical;
 * - a checkpoint megatron-core saves at EP=2 exports to HF that loads cleanly, with its logits and
 *   every expert at its global index.
 *
 * Not run: TP > 1 (the OLMoE attention normalises all heads, which a TP shard does not hold).
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-olmoe-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test("OLMoE: megatron-core with Megatron-Bridge's OLMoE attention strictly loads the checkpoint (full-width q/k norms) with transformers' logits; HF → Megatron (TE, local, legacy) → HF is byte-identical", async () => {
  const hf = join(tmp, 'olmoe');
  await runOracle('olmoe_oracle.py', ['make', hf]);
  const local = join(tmp, 'olmoe.local');
  await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
  const r = JSON.parse(await runOracle('olmoe_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { max_abs_diff: number; q_layernorm_shape: number[] };
  assert.deepEqual(r.q_layernorm_shape, [3, 64], 'q_layernorm stacked over 3 layers, 64 = 4 heads × 16 wide');
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
  const te = join(tmp, 'olmoe.te');
  await convertHfToMegatron(hf, te, { dtype: 'F32' });
  const legacy = join(tmp, 'olmoe.legacy');
  await convertHfToMegatron(hf, legacy, { dtype: 'F32', ckptFormat: 'torch', ep: 2, pp: 3 });
  for (const [meg, what] of [[te, 'te'], [local, 'local'], [legacy, 'legacy EP2 × PP3']] as const) {
    const back = `${meg}.back`;
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
  }
});

test('megatron-core OLMoE saved at EP=2 → HF: clean load, megatron-core\'s logits, every expert at its global index', async () => {
  const run = join(tmp, 'saved-ep2');
  await runOracle('olmoe_oracle.py', ['save', run, '--ep', '2'], { timeoutMs: 240_000 });
  const hf = `${run}.hf`;
  await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const r = JSON.parse(await runOracle('olmoe_oracle.py', ['check_hf', hf, run])) as { max_abs_diff: number; missing: string[]; unexpected: string[]; experts_checked: number; experts_misplaced: string[] };
  assert.deepEqual([r.missing, r.unexpected, r.experts_misplaced, r.experts_checked], [[], [], [], 24]);
  assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
});
