/**
 * HF ↔ Megatron torch_dist against real megatron-core 0.16.1 on CPU (gloo):
 * - shardshift's Megatron output loads with `dist_checkpointing.load(..., strict=RAISE_ALL)` into
 *   the matching GPTModel (local layer spec), whose logits equal transformers' on the HF model;
 * - checkpoints megatron-core saves (TP=1/2/4 — at 4, fewer query groups than TP ranks — PP=2, tied
 *   and untied, with q/k norm and qkv bias)
 *   export to HF that `from_pretrained` loads with no missing or unexpected keys and whose logits
 *   equal megatron-core's.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-mcore-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

interface Cmp {
  max_abs_diff: number;
  missing?: string[];
  unexpected?: string[];
}

for (const c of ['llama_gqa', 'llama_mha_tied', 'qwen2_bias', 'qwen3_qknorm']) {
  test(`${c}: megatron-core strictly loads shardshift's checkpoint; its logits equal transformers'`, async () => {
    const hf = join(tmp, c);
    await runOracle('models_oracle.py', ['make', hf, c]);
    const meg = join(tmp, `${c}.megatron`);
    await convertHfToMegatron(hf, meg, { dtype: 'F32' });
    const r = JSON.parse(await runOracle('megatron_oracle.py', ['load', join(meg, 'iter_0000000'), hf])) as Cmp;
    assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
  });
}

for (const [family, tp, pp, tied] of [
  ['llama', 1, 1, false],
  ['llama', 2, 1, true],
  ['qwen3', 2, 1, false],
  ['qwen2', 1, 1, true],
  ['llama', 1, 2, true],
  // 2 query groups at TP=4: megatron-core 0.16's num_query_groups < tp (linear_qkv split evenly over the ranks).
  ['llama', 4, 1, false],
] as const) {
  test(`megatron-core ${family} saved at TP=${tp} PP=${pp}${tied ? ', tied' : ''}${tp > 2 ? ' (2 query groups < TP)' : ''} → HF loads cleanly in transformers with megatron-core's logits`, async () => {
    const run = join(tmp, `saved-${family}-tp${tp}-pp${pp}-${tied}`);
    await runOracle('megatron_oracle.py', ['save', run, family, '--tp', String(tp), '--pp', String(pp), ...(tied ? ['--tied'] : [])], { timeoutMs: 180_000 });
    const hf = join(tmp, `saved-${family}-tp${tp}-pp${pp}-${tied}.hf`);
    const res = await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
    assert.ok((res.plan.skipped ?? []).every((s) => /_extra_state/.test(s.name)), 'only TE extra state skipped');
    const r = JSON.parse(await runOracle('megatron_oracle.py', ['check_hf', hf, run])) as Cmp;
    assert.deepEqual(r.missing, []);
    assert.deepEqual(r.unexpected, []);
    assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
  });
}
