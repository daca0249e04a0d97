/**
 * Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`: a Qwen2 text decoder with q/k/v biases, the
 * vision tower kept as transformers' own module) against transformers 5.24 and megatron-core 0.16.1
 * on CPU (test/oracle/qwen25vl_oracle.py), under the hub's names (`model.*`, `visual.*`, as
 * transformers 5 saves them) and transformers 5's in-memory ones (`model.language_model.*`,
 * `model.visual.*`):
 *
 * - HF → Megatron: megatron-core's GPTModel loads `language_model.*` strictly with transformers'
 *   logits; every vision tensor sits under its own `visual.*` name with its value (Megatron-Bridge's
 *   ReplicatedMapping), none left over;
 * - HF → Megatron (TE keys, local names) → HF is byte-identical, the export loads cleanly with the
 *   original's logits; legacy rank files are refused by name.
 *
 * Not exercised: the vision tower's forward (transformers' module, carried value for value).
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-qwen25vl-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

for (const native of [false, true]) {
  test(`Qwen2.5-VL under ${native ? "transformers 5's in-memory names (model.language_model.*, model.visual.*)" : "the hub's names (model.*, visual.*)"}: megatron-core strictly loads the language model with transformers' logits, the vision tower is carried under its own names; HF → Megatron → HF is byte-identical`, async () => {
    const hf = join(tmp, `q25vl${native ? '-native' : ''}`);
    const made = JSON.parse(await runOracle('qwen25vl_oracle.py', ['make', hf, ...(native ? ['--native-names'] : [])])) as { prefixes: string[] };
    assert.deepEqual(made.prefixes, native ? ['lm_head.weight', 'model.language_model', 'model.visual'] : ['lm_head.weight', 'model.embed_tokens', 'model.layers', 'model.norm', 'visual.blocks', 'visual.merger', 'visual.patch_embed']);
    const local = `${hf}.local`;
    await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
    const r = JSON.parse(await runOracle('qwen25vl_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number; vision_checked: number; vision_wrong: string[]; vision_unmatched: string[] };
    assert.deepEqual([r.missing, r.unexpected, r.vision_wrong, r.vision_unmatched], [[], [], [], []]);
    assert.equal(r.vision_checked, 6 + 2 * 12);
    assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
    const te = `${hf}.te`;
    await convertHfToMegatron(hf, te, { dtype: 'F32', tp: 2 });
    for (const [meg, what] of [[te, 'te'], [local, 'local']] as const) {
      const back = `${meg}.back`;
      await convertMegatronToHf(meg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
    }
    const c = JSON.parse(await runOracle('qwen25vl_oracle.py', ['check_hf', `${te}.back`, hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number };
    assert.deepEqual([c.missing, c.unexpected, c.max_abs_diff], [[], [], 0]);
    await assert.rejects(convertHfToMegatron(hf, `${hf}.legacy`, { dtype: 'F32', ckptFormat: 'torch' }), /is a vision-language wrapper .* use --ckpt-format torch_dist/);
  });
}
