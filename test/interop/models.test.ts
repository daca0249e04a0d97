/**
 * HF ↔ Megatron torch_dist against transformers: tiny random models of each family, converted to
 * Megatron and checked by an independent pure-torch forward of Megatron's GPT layout (logits equal
 * transformers'), converted back and required bit-identical, and the classic cat([q, k, v]) bug
 * shown to be caught.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { openMegatron } from '../../src/megatron/checkpoint.js';

const CASES = ['llama_gqa', 'llama_mha_tied', 'llama31_rope', 'mistral', 'qwen2_bias', 'qwen3_qknorm'];
let tmp: string;

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-models-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

interface Cmp {
  max_abs_diff: number;
  shape: number[];
}

for (const c of CASES) {
  test(`${c}: HF → Megatron gives transformers' logits through Megatron's layout; → HF is bit-identical`, async () => {
    const hf = join(tmp, c);
    await runOracle('models_oracle.py', ['make', hf, c]);
    const meg = join(tmp, `${c}.megatron`);
    await convertHfToMegatron(hf, meg, { dtype: 'F32' });
    const fwd = JSON.parse(await runOracle('models_oracle.py', ['compare_megatron', join(meg, 'iter_0000000'), hf])) as Cmp;
    assert.ok(fwd.max_abs_diff < 1e-5, `Megatron-layout logits differ from transformers' by ${fwd.max_abs_diff}`);

    const back = join(tmp, `${c}.hf`);
    await convertMegatronToHf(meg, back, {});
    const a = await readFile(join(hf, 'model.safetensors'));
    const b = await readFile(join(back, 'model.safetensors'));
    assert.ok(a.equals(b), 'HF → Megatron → HF reproduces model.safetensors byte for byte');
    assert.deepEqual(JSON.parse(await readFile(join(back, 'config.json'), 'utf8')), JSON.parse(await readFile(join(hf, 'config.json'), 'utf8')));
    assert.ok((await readFile(join(back, 'tokenizer_config.json'), 'utf8')).includes('carried as a side file'));
    const same = JSON.parse(await runOracle('models_oracle.py', ['compare_hf', hf, back])) as Cmp;
    assert.equal(same.max_abs_diff, 0);
  });
}

test('bf16 by default; vocab padded to make_vocab_size_divisible_by × tp; tied models have no output_layer', async () => {
  const hf = join(tmp, 'llama_mha_tied');
  const meg = join(tmp, 'tied.megatron.tp2');
  await convertHfToMegatron(hf, meg, { tp: 2 });
  const m = await openMegatron(meg);
  try {
    const emb = m.source.tensors.get('embedding.word_embeddings.weight')!;
    assert.equal(emb.dtype, 'BF16');
    assert.deepEqual(emb.shape, [256, 32]); // 97 → multiple of 128 × 2
    assert.equal(m.source.tensors.has('output_layer.weight'), false);
    assert.deepEqual(m.source.tensors.get('decoder.layers.self_attention.linear_qkv.weight')!.shape, [3, 96, 32]);
  } finally {
    await m.source.close();
  }
});

test('the classic cat([q, k, v]) layout is caught: its logits do not match', async () => {
  const hf = join(tmp, 'llama_gqa');
  const naive = join(tmp, 'naive-iter');
  await runOracle('models_oracle.py', ['naive', join(tmp, 'llama_gqa.megatron', 'iter_0000000'), hf, naive]);
  const r = JSON.parse(await runOracle('models_oracle.py', ['compare_megatron', naive, hf])) as Cmp;
  assert.ok(r.max_abs_diff > 1e-2, `a naive QKV layout must change the logits (diff ${r.max_abs_diff})`);
});
