/**
 * GLM-4.5 (`Glm4MoeForCausalLM`: GQA with QKV bias and partial RoPE, optional q/k norms, a dense
 * prefix, sigmoid-routed MoE with expert bias and shared experts, MTP in DeepSeek-V3's hub layout)
 * against real megatron-core 0.16.1 on CPU and transformers 5.24 (test/oracle/glm_oracle.py):
 *
 * - tiny random models (glm45: the published GLM-4.5 shape — attention bias, no q/k norm, rotary
 *   0.5, 1 dense layer, 1 shared expert, MTP 1; glm_qk: q/k norms, 2 dense layers, 2 shared experts):
 *   HF → Megatron strictly loaded by megatron-core configured as Megatron-Bridge's GLM-4.5 bridge
 *   configures it (MTP block included and run), logits and MTP output equal transformers';
 *   HF → Megatron (TE keys, local names, legacy TP/EP/PP rank files) → HF byte-identical;
 * - megatron-core's own save at EP=2 × TP=2 with MTP exports to HF that loads cleanly, with its
 *   logits, its MTP output and every expert at its global index;
 * - shardshift's legacy rank files at EP=2 × TP=2 load strictly into every rank.
 *
 * Not exercised on CPU: TransformerEngine's fused kernels, the alltoall dispatcher.
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-glm-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

interface Made {
  missing: string[];
  unexpected: string[];
  tensors: Record<string, [number[], string]>;
}
interface Load {
  max_abs_diff: number;
  mtp_max_abs_diff?: number | null;
}

for (const [c, mtp] of [['glm45', true], ['glm_qk', false]] as const) {
  test(`${c}: megatron-core strictly loads the GLM-4.5 checkpoint${mtp ? ' (MTP block included)' : ''} with transformers' logits; HF → Megatron (TE, local, legacy) → HF is byte-identical`, async () => {
    const hf = join(tmp, c);
    const made = JSON.parse(await runOracle('glm_oracle.py', ['make', hf, c])) as Made;
    assert.deepEqual([made.missing, made.unexpected], [[], []], 'the test model itself does not load cleanly');
    assert.ok(Object.keys(made.tensors).some((n) => n.endsWith('self_attn.q_proj.bias')));
    if (mtp) assert.ok(Object.keys(made.tensors).some((n) => n.startsWith('model.layers.3.eh_proj')), 'no MTP layer written');

    const local = join(tmp, `${c}.local`);
    await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
    const r = JSON.parse(await runOracle('glm_oracle.py', ['load', join(local, 'iter_0000000'), hf, ...(mtp ? ['--mtp'] : [])])) as Load;
    assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
    if (mtp) assert.ok(typeof r.mtp_max_abs_diff === 'number' && r.mtp_max_abs_diff < 1e-5, `MTP block output differs by ${r.mtp_max_abs_diff}`);

    const te = join(tmp, `${c}.te`);
    await convertHfToMegatron(hf, te, { dtype: 'F32' });
    const layouts = [{ tp: 2, ep: 2 }, { tp: 2, ep: 4, etp: 1 }, { pp: c === 'glm45' ? 3 : 2, ep: 2 }];
    const legacies: Array<[string, string]> = [];
    for (const layout of layouts) {
      const leg = join(tmp, `${c}.legacy-${Object.entries(layout).flat().join('')}`);
      await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', ...layout });
      legacies.push([leg, JSON.stringify(layout)]);
    }
    for (const [meg, what] of [[te, 'te'], [local, 'local'], ...legacies] as const) {
      const back = `${meg}.back`;
      await convertMegatronToHf(meg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
    }
  });
}

test('megatron-core GLM-4.5 saved at EP=2 × TP=2 with MTP → HF: clean load, megatron-core\'s logits and MTP output, every expert at its global index', async () => {
  const run = join(tmp, 'saved-ep2-tp2');
  await runOracle('glm_oracle.py', ['save', run, 'glm45', '--ep', '2', '--tp', '2', '--mtp'], { timeoutMs: 300_000 });
  const hf = `${run}.hf`;
  await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const r = JSON.parse(await runOracle('glm_oracle.py', ['check_hf', hf, run])) as {
    max_abs_diff: number; mtp_max_abs_diff: number | null; missing: string[]; unexpected: string[]; experts_checked: number; experts_misplaced: string[]; mtp_copies_exact: boolean | null;
  };
  assert.deepEqual([r.missing, r.unexpected, r.experts_misplaced], [[], [], []]);
  assert.equal(r.experts_checked, 3 * 8, 'two MoE decoder layers and the MTP layer, 8 experts each');
  assert.equal(r.mtp_copies_exact, true);
  assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
  assert.ok(typeof r.mtp_max_abs_diff === 'number' && r.mtp_max_abs_diff < 1e-5, `HF MTP output differs from megatron-core's by ${r.mtp_max_abs_diff}`);
});

test("shardshift's legacy GLM-4.5 rank files at EP=2 × TP=2 (QKV bias split per query group, MTP experts local) load strictly into every rank, logits and MTP output equal transformers'", async () => {
  const hf = join(tmp, 'glm45');
  const leg = join(tmp, 'glm45.legacy-local-tp2ep2');
  await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', megatronSpec: 'local', tp: 2, ep: 2 });
  const r = JSON.parse(await runOracle('glm_oracle.py', ['load_legacy', leg, hf, '--tp', '2', '--ep', '2', '--mtp'], { timeoutMs: 300_000 })) as Load;
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
  assert.ok(typeof r.mtp_max_abs_diff === 'number' && r.mtp_max_abs_diff < 1e-5, `MTP output differs by ${r.mtp_max_abs_diff}`);
});
