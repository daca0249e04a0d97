/**
 * The legacy writer's TP split of `linear_fc1` comes from the family table (issue 15): SwiGLU's
 * `[gate; up]` (kind `gated`, or `gateUp` on a fused / interleaved / custom parameter) splits each
 * half; a non-gated fc1 (Nemotron-H's squared ReLU, a vision tower's GELU) splits as one block.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { familyForHfConfig } from '../../src/models/registry.js';
import { gateUpTest } from '../../src/bridge/map.js';
import { writeMegatronLegacy } from '../../src/megatron/legacy.js';
import type { TargetTensor } from '../../src/lazy/types.js';
import { produceBox } from '../../src/lazy/expr.js';

async function published(file: string): Promise<ReturnType<ReturnType<typeof familyForHfConfig>['fromHf']>> {
  const path = join(repoRoot, 'test', 'published', 'configs', file);
  const cfg = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
  return familyForHfConfig(cfg, path).fromHf(cfg, path);
}

test('gateUpTest: [gate; up] where the table says so, per family and layer kind', async () => {
  const llama = gateUpTest(await published('meta-llama--Llama-3.1-8B.json'));
  assert.equal(llama('decoder.layers.0.mlp.linear_fc1.weight'), true);
  assert.equal(llama('decoder.layers.31.mlp.linear_fc1.weight'), true);
  assert.equal(llama('decoder.layers.0.mlp.linear_fc2.weight'), false);
  assert.equal(llama('decoder.layers.0.self_attention.linear_qkv.weight'), false);

  const mixtral = gateUpTest(await published('mistralai--Mixtral-8x7B-v0.1.json'));
  assert.equal(mixtral('decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight'), true);
  assert.equal(mixtral('decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight'), false);

  // GPT-OSS: interleaved HF gate_up_proj (a custom kind) is [gate; up] in Megatron, bias too.
  const gptoss = gateUpTest(await published('openai--gpt-oss-20b.json'));
  assert.equal(gptoss('decoder.layers.0.mlp.experts.local_experts.31.linear_fc1.weight'), true);
  assert.equal(gptoss('decoder.layers.0.mlp.experts.local_experts.31.linear_fc1.bias'), true);

  // Nemotron-H: squared-ReLU MLP and experts, not gated.
  const nemo = await published('nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json');
  const nt = gateUpTest(nemo);
  const pattern = nemo.hybrid!.pattern;
  const moeLayer = pattern.indexOf('E');
  assert.ok(moeLayer >= 0);
  assert.equal(nt(`decoder.layers.${moeLayer}.mlp.experts.local_experts.0.linear_fc1.weight`), false);
  assert.equal(nt(`decoder.layers.${moeLayer}.mlp.shared_experts.linear_fc1.weight`), false);

  // Qwen3.5 VL: the text MLP is gated, the vision tower's GELU MLP is not.
  const q35 = await published('Qwen--Qwen3.5-0.8B.json');
  const qt = gateUpTest(q35);
  const wrap = 'language_model.';
  assert.equal(qt(`${wrap}decoder.layers.0.mlp.linear_fc1.weight`), true);
  assert.equal(qt('vision_model.decoder.layers.0.mlp.linear_fc1.weight'), false);
});

test('the legacy writer splits a gated fc1 per half and a non-gated one as one block', async () => {
  const F = 4;
  const H = 2;
  const ranks = async (gated: boolean): Promise<number[][]> => {
    // Row r of the global [2F, H] u8 tensor holds the value r, so a rank's slice tells which rows it took.
    const numbered: TargetTensor = { kind: 'produced', name: 'decoder.layers.0.mlp.linear_fc1.weight', dtype: 'U8', shape: [2 * F, H], byteLength: 2 * F * H, describe: 'rows', produce: async (box, out) => {
      for (let r = 0; r < box.size[0]!; r++) out.fill(box.start[0]! + r, r * box.size[1]!, (r + 1) * box.size[1]!);
    } };
    const files = writeMegatronLegacy(new Map([[numbered.name, numbered]]), { tp: 2, pp: 1, numLayers: 1, iteration: 0, gateUp: () => gated, args: {}, extraStateModules: () => [] });
    const out: number[][] = [];
    for (const f of files.filter((x) => x.relPath.endsWith('model_optim_rng.pt'))) {
      const slot = f.parts.find((p) => typeof p === 'object' && !(p instanceof Uint8Array) && 'tensor' in p);
      assert.ok(slot && typeof slot === 'object' && 'tensor' in slot);
      const t = slot.tensor;
      const buf = new Uint8Array(t.byteLength);
      await produceBox(t, { start: [0, 0], size: [...t.shape] }, buf);
      out.push(Array.from({ length: t.shape[0]! }, (_, r) => buf[r * H]!));
    }
    return out;
  };
  assert.deepEqual(await ranks(true), [[0, 1, 4, 5], [2, 3, 6, 7]]);
  assert.deepEqual(await ranks(false), [[0, 1, 2, 3], [4, 5, 6, 7]]);
});

test('fc1Gating / swiglu: one flag per model, from the family table; a model mixing gated and plain fc1 is refused for legacy rank files', async () => {
  const { readdir } = await import('node:fs/promises');
  const { fc1Gating } = await import('../../src/bridge/map.js');
  const { megatronArgs } = await import('../../src/bridge/megatron-config.js');
  const { familyOf } = await import('../../src/models/registry.js');
  const seen: Record<string, string> = {};
  for (const f of (await readdir(join(repoRoot, 'test', 'published', 'configs'))).filter((n) => n.endsWith('.json')).sort()) {
    const c = await published(f);
    const g = fc1Gating(familyOf(c), c);
    seen[f] = g;
    const args = megatronArgs(c, { tp: 1, pp: 1, dtype: 'BF16', divisor: 128, iteration: 0 });
    assert.equal(args.swiglu, g !== 'plain', `${f}: swiglu ${String(args.swiglu)} but the table's fc1 is ${g}`);
  }
  assert.equal(seen['nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json'], 'plain');
  assert.equal(seen['meta-llama--Llama-3.1-8B.json'], 'gated');
  assert.equal(seen['openai--gpt-oss-20b.json'], 'gated');
  // A family whose layer 1 is a plain MLP (as a GELU vision tower beside a SwiGLU decoder would be).
  const llama = await published('meta-llama--Llama-3.1-8B.json');
  const fam = familyOf(llama);
  const mixed = { ...fam, layerParams: (c: typeof llama, i: number) => fam.layerParams(c, i).map((p) => (i === 1 && p.kind === 'gated' ? { ...p, kind: 'copy' as const } : p)) } as typeof fam;
  assert.equal(fc1Gating(mixed, llama), 'mixed');
});
