/**
 * Qwen3-Next and Qwen3.5 (dense and MoE) against real megatron-core 0.16.1 (CPU) and
 * transformers 5.24.0: a tiny random model (linear- and full-attention layers; MoE ones with 4
 * experts and a gated shared expert; random norms) → Megatron torch_dist (TE key names, as Megatron-Bridge writes them) loads into
 * megatron-core's GatedDeltaNet / gated-attention MoE stack with
 * `dist_checkpointing.load(strict=RAISE_ALL)` and gives transformers' logits; → HF gives back
 * model.safetensors byte for byte. (CPU stand-ins for TE's fused norm-linear and fla's l2norm: see
 * test/oracle/qwen3next_oracle.py.)
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-qnext-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

for (const c of ['qwen3_next', 'qwen3_5', 'qwen3_5_moe']) {
  test(`${c}: megatron-core strictly loads the hybrid GDN / gated-attention checkpoint with transformers' logits; HF → Megatron → HF is byte-identical`, async () => {
    const hf = join(tmp, `${c}.hf`);
    await runOracle('qwen3next_oracle.py', ['make', hf, c]);
    const meg = join(tmp, `${c}.meg`);
    await convertHfToMegatron(hf, meg, { dtype: 'F32' });
    const r = JSON.parse(await runOracle('qwen3next_oracle.py', ['load', join(meg, 'iter_0000000'), hf], { timeoutMs: 240_000 })) as { params: number; max_abs_diff?: number; max_abs?: number; forward_error?: string };
    assert.equal(r.forward_error, undefined, `megatron-core forward failed: ${r.forward_error}`);
    assert.ok(r.max_abs_diff! < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff} (max |logit| ${r.max_abs})`);
    const back = join(tmp, `${c}.back`);
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), 'round trip is not byte-identical');
  });
}
