/**
 * Gemma 2 (`Gemma2ForCausalLM`: zero-centred sandwich norms, GeGLU, attention and final logit
 * soft-capping, sliding window on alternating layers, tied embeddings, √hidden embedding scale)
 * against transformers 5.24 and megatron-core 0.16.1 on CPU, the model built as Megatron-Bridge's
 * Gemma 2 provider builds it (test/oracle/gemma_oracle.py: its attention, post-norm linears,
 * output soft-capping and embedding scale on megatron-core's local parts):
 *
 * - HF → Megatron loads strictly under the TE names, logits equal transformers' (which tests the
 *   norms are carried zero-centred, not shifted, and the post-norms land on the sub-block outputs);
 * - HF → Megatron (TE keys, local names, legacy TP2 / PP3) → HF is byte-identical;
 * - a checkpoint megatron-core saves at TP=2 exports to HF that loads cleanly with its logits.
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-gemma-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test("Gemma 2: megatron-core built as Megatron-Bridge's Gemma 2 model strictly loads the checkpoint (TE names) with transformers' logits; HF → Megatron (TE, local, legacy) → HF is byte-identical", async () => {
  const hf = join(tmp, 'g2');
  await runOracle('gemma_oracle.py', ['make', hf]);
  const te = join(tmp, 'g2.te');
  await convertHfToMegatron(hf, te, { dtype: 'F32' });
  const r = JSON.parse(await runOracle('gemma_oracle.py', ['load', join(te, 'iter_0000000'), hf])) as { max_abs_diff: number; max_abs: number; post_layernorm_keys: string[] };
  assert.deepEqual(r.post_layernorm_keys, ['decoder.layers.mlp.linear_fc2.post_layernorm.weight', 'decoder.layers.self_attention.linear_proj.post_layernorm.weight']);
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff} (of ${r.max_abs})`);
  const local = join(tmp, 'g2.local');
  await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
  const legacies: Array<[string, string]> = [];
  for (const layout of [{ tp: 2 }, { pp: 3 }]) {
    const leg = join(tmp, `g2.legacy-${Object.entries(layout).flat().join('')}`);
    await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', ...layout });
    legacies.push([leg, JSON.stringify(layout)]);
  }
  for (const [meg, what] of [[te, 'te'], [local, 'local'], ...legacies] as const) {
    const back = `${meg}.back`;
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
  }
});

test("megatron-core Gemma 2 saved at TP=2 → HF: clean load, megatron-core's logits", async () => {
  const run = join(tmp, 'saved-tp2');
  await runOracle('gemma_oracle.py', ['save', run, '--tp', '2'], { timeoutMs: 240_000 });
  const hf = `${run}.hf`;
  await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const r = JSON.parse(await runOracle('gemma_oracle.py', ['check_hf', hf, run])) as { max_abs_diff: number; max_abs: number; missing: string[]; unexpected: string[] };
  assert.deepEqual([r.missing, r.unexpected], [[], []]);
  assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff} (of ${r.max_abs})`);
});

test("Gemma 3: megatron-core built as Megatron-Bridge's Gemma 3 model (q/k norms, 5 : 1 local / global attention with their own RoPE) strictly loads the checkpoint with transformers' logits; HF → Megatron (TE, local, legacy TP2) → HF is byte-identical; a TP=2 save exports cleanly", async () => {
  const hf = join(tmp, 'g3');
  await runOracle('gemma_oracle.py', ['make', hf, '--gemma3']);
  const te = join(tmp, 'g3.te');
  await convertHfToMegatron(hf, te, { dtype: 'F32' });
  const r = JSON.parse(await runOracle('gemma_oracle.py', ['load', join(te, 'iter_0000000'), hf])) as { max_abs_diff: number; max_abs: number };
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff} (of ${r.max_abs})`);
  const local = join(tmp, 'g3.local');
  await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
  const leg = join(tmp, 'g3.legacy');
  await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', tp: 2 });
  for (const [meg, what] of [[te, 'te'], [local, 'local'], [leg, 'legacy TP2']] as const) {
    const back = `${meg}.back`;
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
  }
  const run = join(tmp, 'saved-g3-tp2');
  await runOracle('gemma_oracle.py', ['save', run, '--tp', '2', '--gemma3'], { timeoutMs: 240_000 });
  const out = `${run}.hf`;
  await convertMegatronToHf(run, out, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const c = JSON.parse(await runOracle('gemma_oracle.py', ['check_hf', out, run])) as { max_abs_diff: number; max_abs: number; missing: string[]; unexpected: string[] };
  assert.deepEqual([c.missing, c.unexpected], [[], []]);
  assert.ok(c.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${c.max_abs_diff} (of ${c.max_abs})`);
});

for (const native of [false, true]) {
  test(`Gemma 3 VL under ${native ? "transformers 5's in-memory names" : "the hub's names (language_model.model.*, vision_tower.vision_model.*)"}: megatron-core's Gemma 3 text model strictly loads language_model.* with transformers' logits; the SigLIP tower and projector equal Megatron-Bridge's mapping (projector transposed, norm renamed); HF → Megatron → HF is byte-identical`, async () => {
    const hf = join(tmp, `g3vl${native ? '-native' : ''}`);
    const made = JSON.parse(await runOracle('gemma_oracle.py', ['make_vl', hf, ...(native ? ['--native-names'] : [])])) as { prefixes: string[] };
    assert.deepEqual(made.prefixes, native ? ['model.language_model', 'model.multi_modal_projector', 'model.vision_tower'] : ['language_model.model', 'multi_modal_projector.mm_input_projection_weight', 'multi_modal_projector.mm_soft_emb_norm', 'vision_tower.vision_model']);
    const te = `${hf}.te`;
    await convertHfToMegatron(hf, te, { dtype: 'F32' });
    const r = JSON.parse(await runOracle('gemma_oracle.py', ['load_vl', join(te, 'iter_0000000'), hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number; vision_checked: number; vision_wrong: string[]; vision_unmatched: string[] };
    assert.deepEqual([r.missing, r.unexpected, r.vision_wrong, r.vision_unmatched], [[], [], [], []]);
    assert.equal(r.vision_checked, 5 + 2 * 16 + 2, 'embeddings and post-norm, 16 tensors per encoder layer, the projector');
    assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
    const back = `${te}.back`;
    await convertMegatronToHf(te, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), 'round trip is not byte-identical');
    const c = JSON.parse(await runOracle('gemma_oracle.py', ['compare_vl', back, hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number };
    assert.deepEqual([c.missing, c.unexpected, c.max_abs_diff], [[], [], 0]);
  });
}
