/**
 * MiniMax-M2 (`MiniMaxM2ForCausalLM`: full-width q/k RMSNorms split over TP, partial RoPE by
 * `rotary_dim`, sigmoid-routed MoE with expert bias under `block_sparse_moe.` names, FP8 hub
 * weights) against real megatron-core 0.16.1 on CPU with Megatron-Bridge's FullDimQNorm /
 * FullDimKNorm (copied into test/oracle/minimax_oracle.py) and transformers 5.24:
 *
 * - HF → Megatron (local spec) loads strictly, the norms whole in torch_dist, logits equal transformers';
 * - HF → Megatron (TE keys, local names, legacy TP/EP/PP rank files) → HF is byte-identical;
 * - megatron-core's own save at TP=2 × EP=2 (norm rows sharded over TP, sums of squares
 *   all-reduced) exports to HF that loads cleanly, with its logits and every expert in place;
 * - shardshift's legacy rank files at TP=2 × EP=2 (each rank its heads' rows) load strictly into
 *   every rank with transformers' logits;
 * - an FP8 checkpoint laid out as the hub's → Megatron (bf16) → HF equals the reference
 *   dequantisation byte for byte; `--quantize fp8` gives the FP8 layout back.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { readHeaders } from '../helpers/published.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-minimax-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test("MiniMax-M2: megatron-core with Megatron-Bridge's full-width q/k norms strictly loads the checkpoint with transformers' logits; HF → Megatron (TE, local, legacy TP/EP/PP) → HF is byte-identical", async () => {
  const hf = join(tmp, 'm2');
  const made = JSON.parse(await runOracle('minimax_oracle.py', ['make', hf])) as { names: string[] };
  assert.ok(made.names.includes('model.layers.0.block_sparse_moe.experts.0.w1.weight') && made.names.includes('model.layers.0.block_sparse_moe.e_score_correction_bias'), made.names.slice(0, 20).join(', '));
  const local = join(tmp, 'm2.local');
  await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
  const r = JSON.parse(await runOracle('minimax_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { max_abs_diff: number; norm_shapes: Record<string, number[]> };
  assert.deepEqual(r.norm_shapes, { 'decoder.layers.self_attention.q_layernorm.weight': [3, 64], 'decoder.layers.self_attention.k_layernorm.weight': [3, 32] });
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
  const te = join(tmp, 'm2.te');
  await convertHfToMegatron(hf, te, { dtype: 'F32' });
  const legacies: Array<[string, string]> = [];
  for (const layout of [{ tp: 2, ep: 2 }, { tp: 2, ep: 4, etp: 1 }, { pp: 3, ep: 2 }]) {
    const leg = join(tmp, `m2.legacy-${Object.entries(layout).flat().join('')}`);
    await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', ...layout });
    legacies.push([leg, JSON.stringify(layout)]);
  }
  for (const [meg, what] of [[te, 'te'], [local, 'local'], ...legacies] as const) {
    const back = `${meg}.back`;
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${what}: round trip is not byte-identical`);
  }
});

test("megatron-core MiniMax-M2 saved at TP=2 × EP=2 → HF: clean load, megatron-core's logits, every expert at its global index", async () => {
  const run = join(tmp, 'saved-tp2-ep2');
  await runOracle('minimax_oracle.py', ['save', run, '--tp', '2', '--ep', '2'], { timeoutMs: 300_000 });
  const hf = `${run}.hf`;
  await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const r = JSON.parse(await runOracle('minimax_oracle.py', ['check_hf', hf, run])) as { max_abs_diff: number; missing: string[]; unexpected: string[]; experts_checked: number; experts_misplaced: string[] };
  assert.deepEqual([r.missing, r.unexpected, r.experts_misplaced, r.experts_checked], [[], [], [], 24]);
  assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
});

test("shardshift's legacy MiniMax-M2 rank files at TP=2 × EP=2 (each rank its heads' q/k norm rows) load strictly into every rank with transformers' logits", async () => {
  const hf = join(tmp, 'm2');
  const leg = join(tmp, 'm2.legacy-local-tp2ep2');
  await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', megatronSpec: 'local', tp: 2, ep: 2 });
  const r = JSON.parse(await runOracle('minimax_oracle.py', ['load_legacy', leg, hf, '--tp', '2', '--ep', '2'], { timeoutMs: 300_000 })) as { max_abs_diff: number; q_norm_rows_per_rank: number };
  assert.equal(r.q_norm_rows_per_rank, 32, 'half of the 4 heads × 16 per rank');
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
});

test('a MiniMax-M2 FP8 checkpoint (hub layout) → Megatron (bf16) → HF equals the reference dequantisation byte for byte; --quantize fp8 writes the FP8 layout back', async () => {
  const hf = join(tmp, 'm2fp8');
  const made = JSON.parse(await runOracle('minimax_oracle.py', ['make', hf, '--fp8'])) as { fp8: number };
  assert.equal(made.fp8, 3 * (4 + 8 * 3), 'q/k/v/o and every expert w1/w2/w3 in FP8');
  const meg = `${hf}.meg`;
  await convertHfToMegatron(hf, meg, {});
  const back = `${hf}.back`;
  await convertMegatronToHf(meg, back, {});
  assert.ok((await readFile(join(`${hf}.ref`, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), 'not the reference bf16 bytes');
  const cfg = JSON.parse(await readFile(join(back, 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(cfg.quantization_config, undefined);
  const r = JSON.parse(await runOracle('minimax_oracle.py', ['compare', back, `${hf}.ref`])) as { max_abs_diff: number; missing_a: string[]; unexpected_a: string[] };
  assert.deepEqual([r.missing_a, r.unexpected_a, r.max_abs_diff], [[], [], 0]);
  const q = `${hf}.q`;
  await convertMegatronToHf(meg, q, { quantize: 'fp8' });
  const [src, got] = [await readHeaders(hf), await readHeaders(q)];
  assert.deepEqual([...got.keys()].sort(), [...src.keys()].sort());
  for (const [name, h] of src) assert.deepEqual([got.get(name)!.dtype, got.get(name)!.shape], [h.dtype, h.shape], name);
  const qc = (JSON.parse(await readFile(join(q, 'config.json'), 'utf8')) as { quantization_config: Record<string, unknown> }).quantization_config;
  assert.equal(qc.fmt, 'float8_e4m3fn');
});
