/**
 * Llama 4 (`Llama4ForConditionalGeneration` and `Llama4ForCausalLM`: NoPE every 4th layer, L2 q/k
 * norms on the RoPE layers, interleaved RoPE, MoE layers with a shared expert and input-major fused
 * experts, sigmoid top-k router applied to the experts' input) against transformers 5.24 and
 * megatron-core 0.16.1 on CPU, the model built as Megatron-Bridge's llama4_utils layer spec builds
 * it (test/oracle/llama4_oracle.py):
 *
 * - HF → Megatron loads strictly (the wrapper's text under `language_model.`), logits equal
 *   transformers'; the wrapper's vision model and projector are carried with their values;
 * - HF → Megatron (TE, local, EP2, and legacy TP2 × EP2 for the text model) → HF is byte-identical,
 *   the export loads cleanly with the original's logits.
 *
 * Not checked on CPU: chunked attention and the NoPE layers' temperature tuning (no effect below
 * 8192 tokens), the vision model's forward (carried, no Megatron model of it exists).
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-llama4-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

for (const causal of [false, true]) {
  test(`Llama 4 ${causal ? 'text model (Llama4ForCausalLM)' : 'wrapper (Llama4ForConditionalGeneration)'}: megatron-core built as Megatron-Bridge's Llama 4 layer spec strictly loads it with transformers' logits; HF → Megatron → HF is byte-identical`, async () => {
    const hf = join(tmp, causal ? 'l4-text' : 'l4');
    const made = JSON.parse(await runOracle('llama4_oracle.py', ['make', hf, ...(causal ? ['--causal'] : [])])) as { experts: Record<string, number[]> };
    const P = causal ? 'model' : 'language_model.model';
    assert.deepEqual(made.experts, { [`${P}.layers.1.feed_forward.experts.gate_up_proj`]: [4, 64, 96], [`${P}.layers.1.feed_forward.experts.down_proj`]: [4, 48, 64] }, 'input-major fused experts');
    const local = `${hf}.local`;
    await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
    const r = JSON.parse(await runOracle('llama4_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number; max_abs: number; vision_checked: number; vision_wrong: string[] };
    assert.deepEqual([r.missing, r.unexpected, r.vision_wrong], [[], [], []]);
    assert.equal(r.vision_checked, causal ? 0 : 10 + 2 * 16);
    // float32 on both sides, summed in different orders: 1e-5 relative to the logits' scale.
    assert.ok(r.max_abs_diff < 1e-5 * Math.max(1, r.max_abs), `megatron-core logits differ from transformers' by ${r.max_abs_diff} (of ${r.max_abs})`);
    const te = `${hf}.te`;
    await convertHfToMegatron(hf, te, { dtype: 'F32', ep: 2 });
    const outs: Array<[string, string]> = [[te, 'te EP2'], [local, 'local']];
    if (causal) {
      const leg = `${hf}.legacy`;
      await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', tp: 2, ep: 2 });
      outs.push([leg, 'legacy TP2 × EP2']);
    }
    for (const [meg, what] of outs) {
      const back = `${meg}.back`;
      await convertMegatronToHf(meg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
    }
    const c = JSON.parse(await runOracle('llama4_oracle.py', ['check_hf', `${te}.back`, hf])) as { missing: string[]; unexpected: string[]; max_abs_diff: number };
    assert.deepEqual([c.missing, c.unexpected, c.max_abs_diff], [[], [], 0]);
  });
}
