/**
 * Legacy Megatron files (`--ckpt-format torch`) against real megatron-core 0.16.1 on CPU:
 * - per-rank files written the way Megatron-LM's save_checkpoint writes them (the model's own
 *   `state_dict_for_save_checkpoint()` per TP/PP rank, args, RNG state with numpy arrays) convert
 *   to HF that transformers loads with megatron-core's logits;
 * - shardshift's TP=2 PP=2 legacy output, and a TP=4 one with 2 query groups (fewer than the TP
 *   ranks), load strictly into megatron-core's GPTModel on every rank, and the logits equal transformers';
 * - resharding TP1PP1 → TP2PP2 → TP4PP1 → HF gives back the original bytes.
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-legacy-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

interface Cmp {
  max_abs_diff: number;
  missing?: string[];
  unexpected?: string[];
}

for (const [family, tp, pp, tied] of [
  ['llama', 2, 2, false],
  ['qwen3', 2, 1, true],
  // 2 query groups at TP=4 (num_query_groups < tp): each rank holds an even row slice of linear_qkv.
  ['llama', 4, 1, false],
] as const) {
  test(`Megatron-LM-style legacy ${family} TP=${tp} PP=${pp}${tied ? ' tied' : ''} → HF with megatron-core's logits`, async () => {
    const run = join(tmp, `legacy-${family}-${tp}-${pp}`);
    await runOracle('megatron_oracle.py', ['save_legacy', run, family, '--tp', String(tp), '--pp', String(pp), ...(tied ? ['--tied'] : [])], { timeoutMs: 180_000 });
    const hf = `${run}.hf`;
    const r0 = await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
    assert.ok((r0.plan.skipped ?? []).some((s) => s.name === 'rng_state'), 'RNG state recognised and skipped');
    const r = JSON.parse(await runOracle('megatron_oracle.py', ['check_hf', hf, run])) as Cmp;
    assert.deepEqual([r.missing, r.unexpected], [[], []]);
    assert.ok(r.max_abs_diff < 1e-5, `logits differ by ${r.max_abs_diff}`);
  });
}

test('shardshift legacy TP=2 PP=2 (local spec names) loads strictly into megatron-core on every rank', async () => {
  const hf = join(tmp, 'legacy-llama-2-2.hf'); // 4 layers, from the test above
  const out = join(tmp, 'ours-tp2pp2');
  await convertHfToMegatron(hf, out, { ckptFormat: 'torch', megatronSpec: 'local', tp: 2, pp: 2, dtype: 'F32' });
  const r = JSON.parse(await runOracle('megatron_oracle.py', ['load_legacy', out, hf, '--tp', '2', '--pp', '2'], { timeoutMs: 180_000 })) as Cmp;
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
});

test('shardshift legacy TP=4 with 2 query groups (fewer than TP ranks) loads strictly into megatron-core on every rank', async () => {
  const hf = join(tmp, 'legacy-llama-4-1.hf'); // 2 KV heads, from the TP=4 test above
  const out = join(tmp, 'ours-tp4');
  await convertHfToMegatron(hf, out, { ckptFormat: 'torch', megatronSpec: 'local', tp: 4, dtype: 'F32' });
  const r = JSON.parse(await runOracle('megatron_oracle.py', ['load_legacy', out, hf, '--tp', '4'], { timeoutMs: 240_000 })) as Cmp;
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
});

test('resharding TP1PP1 → TP2PP2 → TP4PP1 → HF gives back the original bytes', async () => {
  const hf = join(tmp, 'mha');
  await runOracle('models_oracle.py', ['make', hf, 'llama_mha_4l']);
  const a = join(tmp, 'tp1pp1');
  const b = join(tmp, 'tp2pp2');
  const c = join(tmp, 'tp4pp1');
  await convertHfToMegatron(hf, a, { ckptFormat: 'torch', tp: 1, pp: 1, dtype: 'F32' });
  await convertHfToMegatron(a, b, { ckptFormat: 'torch', tp: 2, pp: 2, dtype: 'F32' });
  await convertHfToMegatron(b, c, { ckptFormat: 'torch', tp: 4, pp: 1, dtype: 'F32' });
  const back = join(tmp, 'mha-back');
  await convertMegatronToHf(c, back, {});
  assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))));
});
