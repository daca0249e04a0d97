/**
 * DeepSeek-V3's bad inputs, each one clear error naming the file and tensor with nothing written,
 * and its plan facts — on the published DeepSeek-V3 layout (test/published: the real names,
 * shapes and dtypes, FP8 weights with their block scales and the MTP layer), truncated to its
 * four layer kinds and eight experts and written sparse (headers only; every case fails or plans
 * before reading data).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { truncatedPublished, writeSparseCheckpoint, type TensorSpec } from '../helpers/published.js';
import { runCli } from '../helpers/cli.js';

let tmp: string;
let config: Record<string, unknown>;
let tensors: TensorSpec[];
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-deepseek-'));
  ({ config, tensors } = await truncatedPublished('deepseek-v3'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

let n = 0;
/** Writes the (possibly edited) checkpoint and converts it to Megatron; the output must not exist after a failure. */
async function convert(cfg: Record<string, unknown>, list: readonly TensorSpec[], ...extra: string[]): Promise<{ code: number | null; stdout: string; stderr: string; out: string }> {
  return convertData('holes', cfg, list, ...extra);
}

async function convertData(data: 'holes' | 'windows', cfg: Record<string, unknown>, list: readonly TensorSpec[], ...extra: string[]): Promise<{ code: number | null; stdout: string; stderr: string; out: string }> {
  const dir = join(tmp, `case-${++n}`);
  await writeSparseCheckpoint(dir, cfg, list, { data });
  const out = join(tmp, `out-${n}`);
  const r = await runCli(['convert', '--to', 'megatron', dir, out, ...extra]);
  return { ...r, out };
}

async function absent(path: string): Promise<boolean> {
  return stat(path).then(() => false, () => true);
}

const Q_A = 'model.layers.0.self_attn.q_a_proj.weight';

test('an FP8 weight without its weight_scale_inv is refused, naming the tensor; nothing is written', async () => {
  const r = await convert(config, tensors.filter((t) => t[0] !== `${Q_A}_scale_inv`));
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`${Q_A.replace(/\./g, '\\.')}: an FP8 \\(F8_E4M3\\) weight without ${Q_A.replace(/\./g, '\\.')}_scale_inv`));
  assert.ok(await absent(r.out));
});

test('a misshapen weight_scale_inv is refused with the shape the 128×128 blocks need', async () => {
  const r = await convert(config, tensors.map((t): TensorSpec => (t[0] === `${Q_A}_scale_inv` ? [t[0], t[1], [12, 55]] : t)));
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /q_a_proj\.weight_scale_inv: shape \[12, 55\] does not fit .*q_a_proj\.weight \[1536, 7168\] in 128×128 blocks, which needs \[12, 56\]/);
  assert.ok(await absent(r.out));
});

test('block scales whose weight is not FP8, and FP8 weights without a quantization_config, are refused', async () => {
  const a = await convert(config, tensors.map((t): TensorSpec => (t[0] === Q_A ? [t[0], 'BF16', t[2]] : t)));
  assert.equal(a.code, 1, a.stderr);
  assert.match(a.stderr, /q_a_proj\.weight_scale_inv: block scales for .*q_a_proj\.weight, which is BF16, not FP8/);
  const { quantization_config: _q, ...bare } = config;
  const b = await convert(bare, tensors);
  assert.equal(b.code, 1, b.stderr);
  assert.match(b.stderr, /holds FP8 weights or block scales, but config\.json has no FP8 quantization_config/);
});

test('a quantization_config shardshift does not read is refused by its method name', async () => {
  const r = await convert({ ...config, quantization_config: { quant_method: 'awq', bits: 4 } }, tensors);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /quantization_config quant_method "awq" is not read/);
  const s = await convert({ ...config, quantization_config: { quant_method: 'fp8', fmt: 'e4m3', weight_block_size: 128 } }, tensors);
  assert.notEqual(s.code, 0);
  assert.match(s.stderr, /weight_block_size 128; only block-scaled FP8/);
  assert.ok(await absent(r.out));
});

test('an MTP layer count that does not match the tensors is refused; a checkpoint with none converts without (said so)', async () => {
  const r = await convert({ ...config, num_nextn_predict_layers: 2 }, tensors);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /num_nextn_predict_layers is 2, but the checkpoint holds MTP layer tensors at model\.layers\.4 \(num_hidden_layers 4\)/);
  assert.ok(await absent(r.out));
  const none = await convert(config, tensors.filter((t) => !t[0].startsWith('model.layers.4.')), '--dry-run', '--json');
  assert.equal(none.code, 0, none.stderr);
  const plan = (JSON.parse(none.stdout) as { plan: { notes: string[]; files: Array<{ tensors?: string[] }> } }).plan;
  assert.ok(plan.notes.some((x) => /MTP: the config records 1 layer\(s\), the checkpoint holds none/.test(x)), plan.notes.join('\n'));
});

test('--drop-mtp leaves the MTP layer out by a named rule; without it the plan maps it, keeps the expert bias float32 and lists the embedding copies', async () => {
  const drop = await convert(config, tensors, '--dry-run', '--json', '--drop-mtp');
  assert.equal(drop.code, 0, drop.stderr);
  const d = (JSON.parse(drop.stdout) as { plan: { skipped: Array<{ name: string; reason: string }> } }).plan;
  const mtp = tensors.filter((t) => t[0].startsWith('model.layers.4.') && !t[0].endsWith('_scale_inv'));
  assert.deepEqual(d.skipped.filter((s) => s.name.startsWith('model.layers.4.')).map((s) => s.name).sort(), mtp.map((t) => t[0]).sort());
  assert.ok(d.skipped.every((s) => !s.name.startsWith('model.layers.4.') || s.reason === 'multi-token prediction layer dropped (--drop-mtp)'));
  const keep = await convert(config, tensors, '--dry-run', '--json');
  assert.equal(keep.code, 0, keep.stderr);
  const k = (JSON.parse(keep.stdout) as { plan: { skipped: Array<{ name: string; reason: string }>; dtypeExceptions: Array<{ name: string; dtype: string }>; notes: string[] } }).plan;
  assert.deepEqual(k.skipped.map((s) => s.name).sort(), ['model.layers.4.embed_tokens.weight', 'model.layers.4.shared_head.head.weight']);
  assert.match(k.skipped[0]!.reason, /a copy of (model\.embed_tokens|lm_head)\.weight/);
  const bias = k.dtypeExceptions.filter((x) => x.name.endsWith('mlp.router.expert_bias'));
  assert.deepEqual(bias.map((x) => [x.name, x.dtype]), [['decoder.layers.3.mlp.router.expert_bias', 'F32'], ['mtp.layers.0.transformer_layer.mlp.router.expert_bias', 'F32']]);
  assert.ok(k.notes.some((x) => /MTP: 1 multi-token-prediction layer/.test(x)));
});

test('DeepSeek-V3.2 is refused by name: its sparse-attention indexer has no Megatron mapping yet', async () => {
  const r = await convert({ ...config, architectures: ['DeepseekV32ForCausalLM'], model_type: 'deepseek_v32', index_n_heads: 64, index_head_dim: 128, index_topk: 2048 }, tensors);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /DeepSeek-V3\.2's sparse-attention indexer \(self_attn\.indexer\.wq_b, wk, k_norm, weights_proj\) has no Megatron mapping yet/);
  assert.ok(await absent(r.out));
});

test('the Kimi K2.5 multimodal wrapper is refused by name, saying what would map and what is missing', async () => {
  const r = await convert({ architectures: ['KimiK25ForConditionalGeneration'], model_type: 'kimi_k25', text_config: config }, tensors);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /Kimi K2\.5's multimodal wrapper is not converted yet: its text branch .* carrying its vision tower \(vision_tower\.\*, mm_projector\.\*\) through Megatron is not written/);
  assert.ok(await absent(r.out));
});

test('compressed-tensors schemes other than pack-quantized INT4 are refused by name before anything is planned', async () => {
  const r = await convert({ ...config, quantization_config: { quant_method: 'compressed-tensors', format: 'float-quantized', config_groups: {} } }, tensors);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /compressed-tensors format "float-quantized"; shardshift reads pack-quantized symmetric INT4 weights/);
});

test('an MTP embedding or head that is not a copy of the main one is refused before anything is written (Megatron keeps one)', async () => {
  // Windows of pseudo-random data seeded by name: the MTP layer's embed_tokens differs from the main one.
  const r = await convertData('windows', config, tensors);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /model\.layers\.4\.(embed_tokens|shared_head\.head)\.weight differs from (model\.embed_tokens|lm_head)\.weight \(from row 0 on\); megatron-core's MTP block shares the main tensor/);
  assert.ok(await absent(r.out));
  const dry = await convert(config, tensors, '--dry-run', '--json');
  const plan = (JSON.parse(dry.stdout) as { plan: { notes: string[] } }).plan;
  assert.ok(plan.notes.some((x) => /2 tensor\(s\) Megatron keeps once .* are compared with their originals when the conversion runs/.test(x)), plan.notes.join('\n'));
});

test('--drop-mtp drops MTP layers the config does not record', async () => {
  const r = await convert({ ...config, num_nextn_predict_layers: 0 }, tensors, '--dry-run', '--json', '--drop-mtp');
  assert.equal(r.code, 0, r.stderr);
  const d = (JSON.parse(r.stdout) as { plan: { skipped: Array<{ name: string; reason: string }> } }).plan;
  assert.ok(d.skipped.some((s) => s.name === 'model.layers.4.eh_proj.weight' && /--drop-mtp/.test(s.reason)));
});

test('routers megatron-core cannot express are refused: norm_topk_prob=false, another scoring function', async () => {
  const a = await convert({ ...config, norm_topk_prob: false }, tensors);
  assert.equal(a.code, 1);
  assert.match(a.stderr, /norm_topk_prob=false; megatron-core's sigmoid router always renormalises the top-8 scores/);
  const b = await convert({ ...config, scoring_func: 'softmax' }, tensors);
  assert.equal(b.code, 1);
  assert.match(b.stderr, /scoring_func "softmax"/);
});
