/**
 * Qwen3-VL (`Qwen3VLForConditionalGeneration`: a Qwen3 text decoder under `model.language_model.`,
 * a vision tower with deepstack mergers under `model.visual.`) against transformers 5.24 and
 * megatron-core 0.16.1 on CPU (test/oracle/qwen3vl_oracle.py), tied and untied:
 *
 * - HF → Megatron: megatron-core's GPTModel loads the `language_model.*` keys strictly (nothing
 *   missing or unexpected but the vision tower) with transformers' logits; the vision tower's
 *   torch_dist tensors equal Megatron-Bridge's Qwen3-VL mapping (deepstack mergers included), and
 *   no vision key is left unmatched;
 * - HF → Megatron (TE keys, local names) → HF is byte-identical, and the export loads cleanly with
 *   the original's logits; legacy rank files are refused by name (the wrapper's prefixed language
 *   model and vision tower have no legacy layout).
 *
 * Not exercised: the vision tower's forward (megatron-core has no Qwen3-VL vision model; its
 * weights are checked value for value).
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-qwen3vl-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

for (const tied of [false, true]) {
  test(`Qwen3-VL${tied ? ' (tied embeddings)' : ''}: megatron-core strictly loads the language model with transformers' logits, the vision tower and deepstack mergers equal Megatron-Bridge's mapping; HF → Megatron → HF is byte-identical`, async () => {
    const hf = join(tmp, `q3vl${tied ? '-tied' : ''}`);
    const made = JSON.parse(await runOracle('qwen3vl_oracle.py', ['make', hf, ...(tied ? ['--tied'] : [])])) as { deepstack: number; lm_head: boolean };
    assert.equal(made.deepstack, 2 * 6);
    assert.equal(made.lm_head, !tied);
    const local = join(tmp, `${hf}.local`);
    await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
    const r = JSON.parse(await runOracle('qwen3vl_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number; vision_checked: number; vision_wrong: string[]; vision_unmatched: string[] };
    assert.deepEqual([r.missing, r.unexpected, r.vision_wrong, r.vision_unmatched], [[], [], [], []]);
    assert.equal(r.vision_checked, 9 + 12 + 2 * 6, 'patch embed, pos embed, merger; 12 stacked block tensors; two deepstack mergers');
    assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
    const te = `${hf}.te`;
    await convertHfToMegatron(hf, te, { dtype: 'F32' });
    // Legacy rank files key a wrapper's prefixed language model and its vision tower in no way Megatron-Bridge reads.
    await assert.rejects(convertHfToMegatron(hf, `${hf}.legacy`, { dtype: 'F32', ckptFormat: 'torch', tp: 2 }), /is a vision-language wrapper .* legacy rank files are not written for; use --ckpt-format torch_dist/);
    for (const [meg, what] of [[te, 'te'], [local, 'local']] as const) {
      const back = `${meg}.back`;
      await convertMegatronToHf(meg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
    }
    const c = JSON.parse(await runOracle('qwen3vl_oracle.py', ['check_hf', `${te}.back`, hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number };
    assert.deepEqual([c.missing, c.unexpected, c.max_abs_diff], [[], [], 0]);
  });
}

for (const hub of [true, false]) {
  test(`Qwen3-VL-MoE, experts fused ${hub ? "input-major as the hub stores them (gate_up_proj [E, H, 2F], down_proj [E, F, H])" : "output-major as transformers 5 saves a model it built ([E, 2F, H], [E, H, F])"}: megatron-core's MoE language model loads them with transformers' logits; HF → Megatron (TE, local, EP2) → HF is byte-identical${hub ? '; without the recorded layout (as a megatron-core save) the export writes the hub\'s' : ''}`, async () => {
    const hf = join(tmp, `q3vlmoe-${hub ? 'hub' : 'tf5'}`);
    const made = JSON.parse(await runOracle('qwen3vl_oracle.py', ['make', hf, '--moe', ...(hub ? ['--hub-layout'] : [])])) as { experts: Record<string, number[]> };
    const [H, F] = [64, 48];
    assert.deepEqual(made.experts, { 'model.language_model.layers.0.mlp.experts.gate_up_proj': hub ? [8, H, 2 * F] : [8, 2 * F, H], 'model.language_model.layers.0.mlp.experts.down_proj': hub ? [8, F, H] : [8, H, F] });
    const c = JSON.parse(await runOracle('qwen3vl_oracle.py', ['check_hf', hf, hf])) as { missing: string[]; unexpected: string[] };
    assert.deepEqual([c.missing, c.unexpected], [[], []], 'transformers loads the test checkpoint itself');
    const local = `${hf}.local`;
    await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
    const r = JSON.parse(await runOracle('qwen3vl_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number; vision_wrong: string[]; vision_unmatched: string[] };
    assert.deepEqual([r.missing, r.unexpected, r.vision_wrong, r.vision_unmatched], [[], [], [], []]);
    assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
    const te = `${hf}.te`;
    await convertHfToMegatron(hf, te, { dtype: 'F32', ep: 2 });
    for (const [meg, what] of [[te, 'te, EP2'], [local, 'local']] as const) {
      const back = `${meg}.back`;
      await convertMegatronToHf(meg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
    }
    if (hub) {
      // Without the recorded layout (as a megatron-core save has none), the export writes the hub's.
      await rm(join(local, 'iter_0000000', 'hf'), { recursive: true, force: true });
      await runOracle('qwen3vl_oracle.py', ['strip_layout', join(local, 'iter_0000000')]);
      const bare = `${local}.bare`;
      await convertMegatronToHf(local, bare, { hfModel: hf });
      const x = JSON.parse(await runOracle('qwen3vl_oracle.py', ['check_hf', bare, hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number };
      assert.deepEqual([x.missing, x.unexpected, x.max_abs_diff], [[], [], 0]);
    }
  });
}
