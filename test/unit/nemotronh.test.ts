/** Nemotron-H without Python: the hybrid pattern read from either config spelling, and bad patterns refused by name. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { nemotronH } from '../../src/models/nemotron-h.js';

const base = {
  architectures: ['NemotronHForCausalLM'], model_type: 'nemotron_h', vocab_size: 100, hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 2,
  head_dim: 16, intermediate_size: 96, mamba_num_heads: 8, mamba_head_dim: 16, n_groups: 2, ssm_state_size: 16, conv_kernel: 4,
  n_routed_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 32, moe_shared_expert_intermediate_size: 48,
};

test('nemotron_h: hybrid_override_pattern and layers_block_type give the same layers; MoE layers, Mamba split keys', () => {
  const a = nemotronH.fromHf({ ...base, hybrid_override_pattern: 'M*-E' }, 'config.json');
  const b = nemotronH.fromHf({ ...base, layers_block_type: ['linear_attention', 'full_attention', 'mlp', 'moe'] }, 'config.json');
  assert.equal(a.hybrid?.pattern, 'M*-E');
  assert.equal(b.hybrid?.pattern, 'M*-E');
  assert.equal(a.numLayers, 4);
  assert.deepEqual(a.moe?.moeLayers, [false, false, false, true]);
  assert.equal(a.tieEmbeddings, false);
  const split = nemotronH.splitKeys!(a, 0);
  assert.deepEqual(split[0]!.parts.map((p) => `${p.suffix}:${p.rows}`), ['z:128', 'x:128', 'B:32', 'C:32', 'dt:8']);
  assert.deepEqual(nemotronH.splitKeys!(a, 1), []);
  // squared-ReLU MLP and experts: fc1 is up_proj as is, not [gate; up]
  const fc1 = nemotronH.layerParams(a, 3).find((p) => p.megatron === 'mlp.experts.local_experts.{e}.linear_fc1.weight')!;
  assert.equal(fc1.kind, 'copy');
  assert.deepEqual(fc1.shape, [32, 64]);
});

test('nemotron_h: an unknown layer type in the hybrid pattern is one clear error naming it', () => {
  assert.throws(() => nemotronH.fromHf({ ...base, hybrid_override_pattern: 'M*G-' }, 'config.json'), /unknown layer type "G" at layer 2 \(expected M = Mamba, \* = attention, - = MLP, E = MoE\)/);
  assert.throws(() => nemotronH.fromHf({ ...base, layers_block_type: ['mamba', 'conv'] }, 'config.json'), /layers_block_type\[1\] is "conv", an unknown layer type/);
  assert.throws(() => nemotronH.fromHf({ ...base, hybrid_override_pattern: 'M*', num_hidden_layers: 3 }, 'config.json'), /num_hidden_layers \(3\) differs from the 2 layers/);
  assert.throws(() => nemotronH.fromHf({ ...base, hybrid_override_pattern: 'M*', num_nextn_predict_layers: 1 }, 'config.json'), /multi-token prediction/);
});
