/**
 * The published Qwen3.5 layouts and the hub's MTP layers against transformers 5.24 and
 * megatron-core 0.16.1 (CPU): tiny random `Qwen3_5ForConditionalGeneration` (dense, tied) and
 * `Qwen3_5MoeForConditionalGeneration` (experts fused as the hub stores them) checkpoints with a
 * vision tower and an `mtp.*` layer, and a Qwen3-Next with its MTP layer:
 * - HF → Megatron → HF gives back model.safetensors byte for byte (vision tower and MTP included);
 * - the export loads in transformers with no missing or unexpected keys and the original's logits;
 * - megatron-core's GPTModel with its MTP block loads the Megatron output (under `language_model.`
 *   for the wrappers, as Megatron-Bridge's Qwen3VLModel holds it) with nothing missing or
 *   unexpected but the vision tower; logits equal transformers'; every MTP parameter holds the value
 *   Megatron-Bridge's mapping gives; the vision tower's tensors are Megatron-Bridge's Qwen3.5-VL
 *   mapping of `model.visual.*`.
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-q35vl-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

for (const c of ['qwen3_5_vl', 'qwen3_5_moe_vl', 'qwen3_next_mtp']) {
  test(`${c}: round trip byte-identical (vision and MTP included), the export loads in transformers, megatron-core loads the text stack and its MTP block`, async (t) => {
    const hf = join(tmp, c);
    const made = JSON.parse(await runOracle('qwen35vl_oracle.py', ['make', hf, c])) as { tensors: number; mtp: number; visual: number };
    assert.ok(made.mtp > 10, 'the checkpoint carries MTP tensors');
    const meg = `${hf}.meg`;
    const r1 = await convertHfToMegatron(hf, meg, { dtype: 'F32' });
    assert.ok(r1.plan.notes?.some((n) => /MTP: 1 multi-token-prediction layer/.test(n)), 'the plan says the MTP layer is mapped');
    const back = `${hf}.back`;
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), 'round trip is not byte-identical');
    const h = JSON.parse(await runOracle('qwen35vl_oracle.py', ['check_hf', back, hf, c])) as { missing: string[]; unexpected: string[]; max_abs_diff: number };
    assert.deepEqual(h.missing, []);
    assert.deepEqual(h.unexpected, []);
    assert.equal(h.max_abs_diff, 0);
    const m = JSON.parse(await runOracle('qwen35vl_oracle.py', ['load', join(meg, 'iter_0000000'), hf, c], { timeoutMs: 240_000 })) as {
      missing: string[]; unexpected: string[]; mtp_checked: number; mtp_wrong: string[]; max_abs_diff: number; vision_checked?: number; vision_wrong?: string[];
    };
    assert.deepEqual(m.missing, [], 'megatron-core finds every key it needs');
    assert.deepEqual(m.unexpected, []);
    assert.ok(m.mtp_checked >= 12);
    assert.deepEqual(m.mtp_wrong, [], 'MTP parameters where megatron-core loads them, with the mapped values');
    assert.ok(m.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${m.max_abs_diff}`);
    if (c !== 'qwen3_next_mtp') {
      assert.equal(m.vision_checked, 21);
      assert.deepEqual(m.vision_wrong, []);
    }
    t.diagnostic(`${made.tensors} tensors (${made.mtp} MTP, ${made.visual} vision); MTP params checked ${m.mtp_checked}; logits Δ ${m.max_abs_diff}`);
    // --drop-mtp leaves them out, named in the plan.
    const dropped = await convertHfToMegatron(hf, `${hf}.nomtp`, { dtype: 'F32', dropMtp: true, dryRun: true });
    assert.equal(dropped.plan.skipped?.filter((s) => /--drop-mtp/.test(s.reason)).length, made.mtp);
  });
}
