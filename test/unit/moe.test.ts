/**
 * MoE conversions without Python: torch_dist keys (experts stacked [L, E, …] with global
 * indices), legacy rank files under any TP × PP × EP (and ETP 1) back to the same bytes,
 * Megatron → Megatron resharding across EP, and the bad-input messages.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { writeSyntheticMoe } from '../helpers/synthetic.js';
import { digestPath, sortKeys } from '../helpers/describe.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { openMegatron } from '../../src/megatron/checkpoint.js';
import { canonicalMegatron } from '../../src/bridge/megatron-keys.js';
import type { ModelConfig } from '../../src/models/config.js';
import type { CheckpointSource } from '../../src/formats/types.js';
import type { SourceTensor } from '../../src/lazy/types.js';
import { cli } from '../helpers/cli.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-moe-unit-'));
  await writeSyntheticMoe(join(tmp, 'mixtral'), 'mixtral');
  await writeSyntheticMoe(join(tmp, 'qwen3_moe'), 'qwen3_moe');
  await writeSyntheticMoe(join(tmp, 'qwen3_mixed'), 'qwen3_moe', undefined, (c) => {
    c.mlp_only_layers = [1];
  }, [1]);
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

/** Every tensor of b equals a's, bit for bit (the synthetic source is not written by our writer, so its bytes differ in header layout). */
async function same(a: string, b: string): Promise<boolean> {
  assert.deepEqual(sortKeys(await digestPath(b)), sortKeys(await digestPath(a)));
  return true;
}

test('torch_dist: experts are one [L, E, …] key per parameter, global index = position; back to the same bytes', async () => {
  const hf = join(tmp, 'mixtral');
  const meg = join(tmp, 'mixtral.td');
  await convertHfToMegatron(hf, meg, { dtype: 'F32', ep: 4 });
  const m = await openMegatron(meg);
  try {
    const fc1 = m.source.tensors.get('decoder.layers.mlp.experts.experts.linear_fc1.weight');
    assert.deepEqual(fc1?.shape, [3, 8, 32, 32]);
    assert.deepEqual(m.source.tensors.get('decoder.layers.mlp.router.weight')?.shape, [3, 8, 32]);
    assert.ok(m.source.tensors.has('decoder.layers.pre_mlp_layernorm.weight'), 'TE spec keeps pre_mlp_layernorm for MoE layers');
    assert.ok(m.source.objects.has('decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_2.7_3.8'));
  } finally {
    await m.source.close();
  }
  const back = join(tmp, 'mixtral.td.hf');
  await convertMegatronToHf(meg, back, {});
  assert.ok(await same(hf, back));
});

for (const [tp, pp, ep, etp] of [
  [2, 1, 2, 2],
  [2, 1, 2, 1],
  [1, 3, 4, 1],
  [2, 3, 2, 2],
] as const) {
  test(`legacy rank files TP=${tp} PP=${pp} EP=${ep} ETP=${etp}: mp_rank dirs as Megatron-LM names them, local expert numbers, back to the same bytes`, async () => {
    const hf = join(tmp, 'qwen3_moe');
    const meg = join(tmp, `q.leg.${tp}.${pp}.${ep}.${etp}`);
    await convertHfToMegatron(hf, meg, { dtype: 'F32', ckptFormat: 'torch', tp, pp, ep, etp });
    const dirs = (await readdir(join(meg, 'iter_0000000'))).filter((d) => d.startsWith('mp_rank_')).sort();
    assert.equal(dirs.length, tp * pp * ep);
    assert.ok(dirs.every((d) => d.split('_').length === 3 + (pp > 1 ? 1 : 0) + (ep > 1 ? 1 : 0)), dirs.join(' '));
    const back = join(tmp, `q.leg.${tp}.${pp}.${ep}.${etp}.hf`);
    await convertMegatronToHf(meg, back, {});
    assert.ok(await same(hf, back));
  });
}

test('resharding EP: legacy EP=4 → torch_dist → legacy EP=2 × TP=2 keeps every expert in place', async () => {
  const hf = join(tmp, 'mixtral');
  const a = join(tmp, 'rs.ep4');
  await convertHfToMegatron(hf, a, { dtype: 'F32', ckptFormat: 'torch', ep: 4 });
  const b = join(tmp, 'rs.td');
  await convertHfToMegatron(a, b, { dtype: 'F32' });
  const c = join(tmp, 'rs.ep2tp2');
  await convertHfToMegatron(b, c, { dtype: 'F32', ckptFormat: 'torch', ep: 2, tp: 2 });
  const back = join(tmp, 'rs.hf');
  await convertMegatronToHf(c, back, {});
  assert.ok(await same(hf, back));
});

test('a mixed dense/MoE stack (mlp_only_layers) is keyed per layer, as megatron-core keys non-homogeneous stacks', async () => {
  const hf = join(tmp, 'qwen3_mixed');
  const meg = join(tmp, 'mixed.td');
  await convertHfToMegatron(hf, meg, { dtype: 'F32' });
  const m = await openMegatron(meg);
  try {
    assert.deepEqual(m.source.tensors.get('decoder.layers.0.mlp.experts.experts.linear_fc1.weight')?.shape, [8, 32, 32]);
    assert.deepEqual(m.source.tensors.get('decoder.layers.1.mlp.linear_fc1.weight')?.shape, [64, 32]);
    assert.ok(m.source.tensors.has('decoder.layers.1.mlp.linear_fc1.layer_norm_weight'));
    assert.ok(m.source.tensors.has('decoder.layers.2.pre_mlp_layernorm.weight'));
    assert.ok(!m.source.tensors.has('decoder.layers.mlp.router.weight'), 'no stacked keys');
    assert.ok(m.source.objects.has('decoder.layers.2.mlp.experts.experts.linear_fc1._extra_state/shard_7_8'));
  } finally {
    await m.source.close();
  }
  const back = join(tmp, 'mixed.hf');
  await convertMegatronToHf(meg, back, {});
  assert.ok(await same(hf, back));
  // Experts on a layer the config makes dense: named, nothing written.
  const r = await run(['convert', '--to', 'megatron', join(tmp, 'qwen3_moe'), join(tmp, 'mixed.bad'), '-q']);
  assert.equal(r.code, 0);
  const cfgPath = join(tmp, 'qwen3_moe', 'config.json');
  const orig = await readFile(cfgPath, 'utf8');
  await writeFile(cfgPath, JSON.stringify({ ...JSON.parse(orig), mlp_only_layers: [1] }));
  try {
    const bad = await run(['convert', '--to', 'megatron', join(tmp, 'qwen3_moe'), join(tmp, 'mixed.bad2'), '-q']);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /model\.layers\.1\.mlp\.gate_proj\.weight/);
    assert.equal(await readdir(join(tmp, 'mixed.bad2')).catch(() => 'absent'), 'absent');
  } finally {
    await writeFile(cfgPath, orig);
  }
});

test('bad input: --ep not dividing the experts, --etp not dividing the expert ffn, --ep on a dense model, top-k > experts', async () => {
  const hf = join(tmp, 'mixtral');
  let r = await run(['convert', '--to', 'megatron', hf, join(tmp, 'bad1'), '--ep', '3']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--ep 3 does not divide the 8 experts/);
  r = await run(['convert', '--to', 'megatron', hf, join(tmp, 'bad2'), '--ep', '2', '--etp', '3']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--etp 3 does not divide the experts' ffn hidden size 16/);
  r = await run(['convert', '--to', 'megatron', join(repoRoot, 'examples', 'tiny-llama'), join(tmp, 'bad3'), '--ep', '2']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /expert parallelism applies to MoE models; llama is dense/);
  const cfgPath = join(tmp, 'mixtral', 'config.json');
  const orig = await readFile(cfgPath, 'utf8');
  await writeFile(cfgPath, JSON.stringify({ ...JSON.parse(orig), num_experts_per_tok: 9 }));
  try {
    r = await run(['convert', '--to', 'megatron', hf, join(tmp, 'bad4')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /num_experts_per_tok \(9\) exceeds num_local_experts \(8\)/);
  } finally {
    await writeFile(cfgPath, orig);
  }
  for (const d of ['bad1', 'bad2', 'bad3', 'bad4']) assert.equal(await readdir(join(tmp, d)).catch(() => 'absent'), 'absent');
});

test('fsdp_dtensor: experts under global indices (as Megatron-LM renames them for Megatron-FSDP), back to the same tensors', async () => {
  const hf = join(tmp, 'qwen3_moe');
  const meg = join(tmp, 'q.fsdp');
  await convertHfToMegatron(hf, meg, { dtype: 'F32', ckptFormat: 'fsdp_dtensor' });
  const back = join(tmp, 'q.fsdp.hf');
  await convertMegatronToHf(meg, back, {});
  assert.ok(await same(hf, back));
});

test('grouped-GEMM expert names (linear_fc1.weight<e>) read as the SequentialMLP names the maps use', () => {
  const t = (name: string, shape: number[]): SourceTensor => ({ name, dtype: 'F32', shape, byteLength: 0, where: '', read: async () => undefined });
  const tensors = new Map<string, SourceTensor>([
    ['decoder.layers.0.mlp.experts.linear_fc1.weight3', t('decoder.layers.0.mlp.experts.linear_fc1.weight3', [4, 2])],
    ['decoder.layers.mlp.experts.experts.linear_fc2.weight', t('decoder.layers.mlp.experts.experts.linear_fc2.weight', [2, 5, 2, 2])],
  ]);
  const src: CheckpointSource = { format: 'megatron', path: 'x', root: 'x', tensors, objects: new Map(), metadata: new Map(), dataFiles: [], sideFiles: [], close: async () => undefined };
  const view = canonicalMegatron(src, { numLayers: 2 } as ModelConfig);
  assert.ok(view.has('decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight'));
  assert.deepEqual(view.get('decoder.layers.1.mlp.experts.local_experts.4.linear_fc2.weight')?.part.prefix, [1, 4]);
  assert.equal(view.get('decoder.layers.1.mlp.experts.local_experts.4.linear_fc2.weight')?.origin, 'decoder.layers.mlp.experts.experts.linear_fc2.weight');
});

test('export without an HF config: MoE fields come from the training args in common.pt; config.json is synthesized', async () => {
  for (const fam of ['mixtral', 'qwen3_mixed'] as const) {
    const hf = join(tmp, fam);
    const meg = join(tmp, `${fam}.noconf`);
    await convertHfToMegatron(hf, meg, { dtype: 'F32' });
    await rm(join(meg, 'iter_0000000', 'hf'), { recursive: true });
    const back = join(tmp, `${fam}.noconf.hf`);
    await convertMegatronToHf(meg, back, {});
    assert.ok(await same(hf, back));
    const cfg = JSON.parse(await readFile(join(back, 'config.json'), 'utf8')) as Record<string, unknown>;
    const want = JSON.parse(await readFile(join(hf, 'config.json'), 'utf8')) as Record<string, unknown>;
    assert.deepEqual(cfg.architectures, want.architectures);
    for (const k of ['num_local_experts', 'num_experts', 'num_experts_per_tok', 'moe_intermediate_size', 'mlp_only_layers']) assert.deepEqual(cfg[k], want[k], k);
  }
});

test('verify --against the HF source passes for MoE outputs keyed by either layer spec', async () => {
  for (const spec of ['te', 'local']) {
    const meg = join(tmp, `verify.${spec}`);
    await convertHfToMegatron(join(tmp, 'mixtral'), meg, { dtype: 'F32', megatronSpec: spec as 'te' | 'local' });
    const r = await run(['verify', meg, '--against', join(tmp, 'mixtral')]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /tensors bit-identical to their mapping/);
  }
});

test('step convert/hf_to_megatron takes ep / etp as the reference docs spell them', async () => {
  const out = join(tmp, 'step.ep');
  const r = await run(['steps', 'run', 'convert/hf_to_megatron', `hf_model_id=${join(tmp, 'mixtral')}`, `megatron_path=${out}`, 'ep=2', 'tp=2', 'etp=1', 'ckpt_format=torch', 'dtype=float32']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual((await readdir(join(out, 'iter_0000000'))).filter((d) => d.startsWith('mp_rank')).sort(), ['mp_rank_00_000', 'mp_rank_00_001', 'mp_rank_01_000', 'mp_rank_01_001']);
  const back = join(tmp, 'step.ep.hf');
  await convertMegatronToHf(out, back, {});
  assert.ok(await same(join(tmp, 'mixtral'), back));
});
