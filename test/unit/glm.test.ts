/**
 * GLM-4.5's plan facts and bad inputs on the published layouts (test/published: GLM-4.5-Air's and
 * GLM-4.6's real names, shapes and dtypes, the MTP layer with and without its embedding / head
 * copies), truncated to their layer kinds and eight experts and written sparse (headers only: every
 * case fails or plans before reading data, except the round trip, which reads holes). The
 * published harness (published.test.ts) round-trips both layouts byte for byte, GLM-4.6's without
 * adding the copies it lacks.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compareSafetensorsDirs, truncatedPublished, writeSparseCheckpoint, type TensorSpec } from '../helpers/published.js';
import { runCli } from '../helpers/cli.js';

let tmp: string;
const models = new Map<string, { config: Record<string, unknown>; tensors: TensorSpec[]; layers: number }>();
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-glm-'));
  for (const id of ['glm-4.5-air', 'glm-4.6']) models.set(id, await truncatedPublished(id));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

let n = 0;
async function convert(cfg: Record<string, unknown>, list: readonly TensorSpec[], ...extra: string[]): Promise<{ code: number | null; stdout: string; stderr: string; out: string; dir: string }> {
  const dir = join(tmp, `case-${++n}`);
  await writeSparseCheckpoint(dir, cfg, list, { data: 'holes' });
  const out = join(tmp, `out-${n}`);
  const r = await runCli(['convert', '--to', 'megatron', dir, out, ...extra]);
  return { ...r, out, dir };
}

const absent = (path: string): Promise<boolean> => stat(path).then(() => false, () => true);
const air = () => models.get('glm-4.5-air')!;

interface Plan {
  notes: string[];
  skipped: Array<{ name: string; reason: string }>;
  dtypeExceptions: Array<{ name: string; dtype: string }>;
}

test('GLM-4.5-Air plans its MoE layer and MTP layer with the expert bias in float32; the MTP embedding / head copies are listed as kept once', async () => {
  const { config, tensors, layers } = air();
  const r = await convert(config, tensors, '--dry-run', '--json');
  assert.equal(r.code, 0, r.stderr);
  const plan = (JSON.parse(r.stdout) as { plan: Plan }).plan;
  // A truncated Air: layer 0 dense, layer 1 MoE, layer 2 = its MTP layer (an MoE layer).
  assert.equal(layers, 2);
  assert.ok(plan.notes.some((x) => /MTP: 1 multi-token-prediction layer/.test(x)), plan.notes.join('\n'));
  const bias = plan.dtypeExceptions.filter((x) => x.name.endsWith('mlp.router.expert_bias'));
  assert.deepEqual(bias.map((x) => [x.name, x.dtype]), [['decoder.layers.1.mlp.router.expert_bias', 'F32'], ['mtp.layers.0.transformer_layer.mlp.router.expert_bias', 'F32']]);
  assert.deepEqual(plan.skipped.map((s) => s.name).sort(), ['model.layers.2.embed_tokens.weight', 'model.layers.2.shared_head.head.weight']);
});

test('routers megatron-core cannot express and rotary fractions that split no head evenly are refused by name; nothing is written', async () => {
  const { config, tensors } = air();
  const a = await convert({ ...config, norm_topk_prob: false }, tensors);
  assert.equal(a.code, 1, a.stderr);
  assert.match(a.stderr, /norm_topk_prob=false; megatron-core's sigmoid router always renormalises the top-8 scores/);
  assert.ok(await absent(a.out));
  const b = await convert({ ...config, partial_rotary_factor: 0.3 }, tensors);
  assert.equal(b.code, 1, b.stderr);
  assert.match(b.stderr, /partial_rotary_factor 0\.3 does not give an even number of rotary dims of the 128-dim heads/);
  assert.ok(await absent(b.out));
});

test('an MTP layer count that does not match the tensors is refused; --drop-mtp leaves the layer out by a named rule', async () => {
  const { config, tensors, layers } = air();
  const r = await convert({ ...config, num_nextn_predict_layers: 2 }, tensors);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, new RegExp(`num_nextn_predict_layers is 2, but the checkpoint holds MTP layer tensors at model\\.layers\\.${layers} \\(num_hidden_layers ${layers}\\)`));
  assert.ok(await absent(r.out));
  const drop = await convert(config, tensors, '--dry-run', '--json', '--drop-mtp');
  assert.equal(drop.code, 0, drop.stderr);
  const d = (JSON.parse(drop.stdout) as { plan: Plan }).plan;
  const mtp = tensors.filter((t) => t[0].startsWith(`model.layers.${layers}.`)).map((t) => t[0]).sort();
  assert.deepEqual(d.skipped.filter((s) => s.name.startsWith(`model.layers.${layers}.`)).map((s) => s.name).sort(), mtp);
  assert.ok(d.skipped.every((s) => s.reason === 'multi-token prediction layer dropped (--drop-mtp)'));
});

test('without an HF config, the export rebuilds GLM-4.5-Air\'s config.json from the Megatron args (rotary_percent, router, shared expert, dense prefix, MTP) and writes the same tensors', async () => {
  const { config, tensors } = air();
  const a = await convert(config, tensors, '-q');
  assert.equal(a.code, 0, a.stderr);
  // shardshift keeps the source's config.json beside the weights (iter_*/hf/): take it away.
  await rm(join(a.out, 'iter_0000000', 'hf'), { recursive: true, force: true });
  const back = `${a.out}-hf`;
  const b = await runCli(['convert', '--to', 'hf', a.out, back, '-q']);
  assert.equal(b.code, 0, b.stderr);
  const cfg = JSON.parse(await readFile(join(back, 'config.json'), 'utf8')) as Record<string, unknown>;
  const want = ['architectures', 'n_routed_experts', 'num_experts_per_tok', 'moe_intermediate_size', 'n_shared_experts', 'first_k_dense_replace', 'n_group', 'topk_group', 'routed_scaling_factor', 'attention_bias', 'use_qk_norm', 'partial_rotary_factor', 'num_nextn_predict_layers', 'head_dim', 'num_key_value_heads', 'rope_theta'];
  const source = JSON.parse(await readFile(join(a.dir, 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.deepEqual(Object.fromEntries(want.map((k) => [k, cfg[k]])), Object.fromEntries(want.map((k) => [k, source[k]])));
  const d = await compareSafetensorsDirs(a.dir, back);
  assert.deepEqual([d.missing, d.extra, d.differing], [[], [], []]);
});
