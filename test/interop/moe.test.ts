/**
 * MoE families (Mixtral, Qwen3-MoE incl. a mixed dense/MoE stack) against real megatron-core
 * 0.16.1 on CPU and transformers 5:
 * - HF → Megatron (local-spec keys) loads into megatron-core's MoE GPTModel with
 *   `dist_checkpointing.load(strict=RAISE_ALL)`, logits equal transformers';
 * - HF → Megatron (default TE keys) → HF gives back model.safetensors byte for byte;
 * - checkpoints megatron-core saves under EP=4, and EP=2 × TP=2, export to HF that loads cleanly,
 *   with megatron-core's logits and every expert at its global index (fingerprints per expert).
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-moe-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

for (const c of ['mixtral', 'qwen3_moe', 'qwen3_moe_mixed']) {
  test(`${c}: megatron-core strictly loads the MoE checkpoint with transformers' logits; HF → Megatron → HF is byte-identical`, async () => {
    const hf = join(tmp, c);
    await runOracle('moe_oracle.py', ['make', hf, c]);
    const local = join(tmp, `${c}.local`);
    await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
    const r = JSON.parse(await runOracle('moe_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { max_abs_diff: number };
    assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
    const te = join(tmp, `${c}.te`);
    await convertHfToMegatron(hf, te, { dtype: 'F32' });
    for (const [meg, name] of [[te, 'te'], [local, 'local']] as const) {
      const back = join(tmp, `${c}.${name}.back`);
      await convertMegatronToHf(meg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${name} keys: round trip is not byte-identical`);
    }
  });
}

for (const [c, ep, tp] of [
  ['mixtral', 4, 1],
  ['qwen3_moe', 2, 2],
] as const) {
  test(`megatron-core ${c} saved at EP=${ep} TP=${tp} → HF: clean load, megatron-core's logits, every expert at its global index`, async () => {
    const run = join(tmp, `saved-${c}-ep${ep}-tp${tp}`);
    await runOracle('moe_oracle.py', ['save', run, c, '--ep', String(ep), '--tp', String(tp)], { timeoutMs: 240_000 });
    const hf = `${run}.hf`;
    await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
    const r = JSON.parse(await runOracle('moe_oracle.py', ['check_hf', hf, run])) as { max_abs_diff: number; missing: string[]; unexpected: string[]; experts_checked: number; experts_misplaced: string[] };
    assert.deepEqual(r.missing, []);
    assert.deepEqual(r.unexpected, []);
    assert.equal(r.experts_checked, 24);
    assert.deepEqual(r.experts_misplaced, []);
    assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
  });
}

test('Megatron-LM legacy rank files saved by megatron-core at EP=2 × TP=2 (mp_rank_TT_EEE, local experts) → HF with every expert at its global index', async () => {
  const run = join(tmp, 'saved-legacy-ep2-tp2');
  await runOracle('moe_oracle.py', ['save', run, 'qwen3_moe', '--ep', '2', '--tp', '2', '--legacy'], { timeoutMs: 240_000 });
  const hf = `${run}.hf`;
  await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const r = JSON.parse(await runOracle('moe_oracle.py', ['check_hf', hf, run])) as { max_abs_diff: number; missing: string[]; unexpected: string[]; experts_checked: number; experts_misplaced: string[] };
  assert.deepEqual([r.missing, r.unexpected, r.experts_misplaced, r.experts_checked], [[], [], [], 24]);
  assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
});

test("shardshift's legacy rank files at EP=2 × TP=2 load strictly into each rank of megatron-core's model, logits equal transformers'", async () => {
  const hf = join(tmp, 'qwen3_moe');
  const meg = join(tmp, 'qwen3_moe.leg.ep2tp2');
  await convertHfToMegatron(hf, meg, { dtype: 'F32', ckptFormat: 'torch', megatronSpec: 'local', tp: 2, ep: 2 });
  const r = JSON.parse(await runOracle('moe_oracle.py', ['load_legacy', meg, hf, '--tp', '2', '--ep', '2'], { timeoutMs: 240_000 })) as { max_abs_diff: number };
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
});
