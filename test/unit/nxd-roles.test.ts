/**
 * NxD layouts come from the family tables (issue 15): each HF tensor's role (q/k/v/o, gate/up/down,
 * vocabulary, else replicated) is read from `Family.layerParams` / `globalParams`, so a dense
 * family registered in models/ exists for NxD; what NxD's converter cannot lay out is refused by
 * name (the interop test runs Mistral and Qwen3 through the real converter).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { familyForHfConfig } from '../../src/models/registry.js';
import { nxdRoles } from '../../src/nxd/layout.js';
import type { ModelConfig } from '../../src/models/config.js';

async function published(file: string): Promise<ModelConfig> {
  const path = join(repoRoot, 'test', 'published', 'configs', file);
  const cfg = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
  return familyForHfConfig(cfg, path).fromHf(cfg, path);
}

test('roles from the table: Llama-3.1-8B and Mistral-7B', async () => {
  for (const [file, layers] of [['meta-llama--Llama-3.1-8B.json', 32], ['mistralai--Mistral-7B-v0.1.json', 32]] as const) {
    const roles = nxdRoles(await published(file), file);
    assert.equal(roles.get('model.embed_tokens.weight'), 'vocab');
    assert.equal(roles.get('lm_head.weight'), 'vocab');
    for (const i of [0, layers - 1]) {
      const L = `model.layers.${i}`;
      assert.deepEqual(['q', 'k', 'v', 'o'].map((x) => roles.get(`${L}.self_attn.${x}_proj.weight`)), ['q', 'k', 'v', 'o']);
      assert.deepEqual(['gate', 'up', 'down'].map((x) => roles.get(`${L}.mlp.${x}_proj.weight`)), ['gate', 'up', 'down']);
      assert.equal(roles.get(`${L}.input_layernorm.weight`), undefined, 'norms are replicated');
    }
    assert.equal(roles.size, 2 + layers * 7);
  }
});

test('Qwen3: q/k norms have no role (replicated, as the converter does)', async () => {
  const c = await published('Qwen--Qwen3-30B-A3B.json');
  // The published Qwen3 checkpoint here is MoE: refused (below). A dense Qwen3 config:
  const dense: ModelConfig = { ...c, moe: undefined, family: 'qwen3' };
  const roles = nxdRoles(dense, 'qwen3');
  assert.equal(roles.get('model.layers.0.self_attn.q_norm.weight'), undefined);
  assert.equal(roles.get('model.layers.0.self_attn.q_proj.weight'), 'q');
});

test('what NxD cannot lay out is refused by name: QKV biases, MoE experts, blocks beyond the decoder', async () => {
  await assert.rejects(async () => nxdRoles(await published('Qwen--Qwen2.5-7B.json'), 'Qwen2.5-7B/config.json'), /model\.layers\.0\.self_attn\.q_proj\.bias: attention biases are not handled by NxD's converter \(Qwen2, Qwen2\.5 has them\)/);
  await assert.rejects(async () => nxdRoles(await published('mistralai--Mixtral-8x7B-v0.1.json'), 'Mixtral/config.json'), /has MoE experts .*NxD's converter handles dense models only/);
  await assert.rejects(async () => nxdRoles(await published('Qwen--Qwen3.5-0.8B.json'), 'Qwen3.5/config.json'), /layer stacks beyond the decoder/);
});
