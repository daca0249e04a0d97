/**
 * config.json as transformers 5 needs it: float fields stay floats through an edit (its strict
 * config dataclasses refuse `"swiglu_limit": 7` for 7.0), and a GPT-OSS export of unquantised
 * weights drops the hub's `quantization_config` (else vLLM and transformers' GPU path would read
 * the bf16 experts as MXFP4 blocks) while keeping every other byte of the reference config.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { configJson, JsonFloat, parseConfigJson, withoutTopLevelKey } from '../../src/formats/config-json.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { compareSafetensorsDirs, writeSparseCheckpoint, type TensorSpec } from '../helpers/published.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-cfgjson-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('parseConfigJson keeps float lexemes as floats; configJson writes them back with a decimal point', () => {
  const v = parseConfigJson('{"a": 7.0, "b": 7, "c": 1e-05, "d": [0.5, 2], "e": {"f": -3.25E2}, "g": NaN, "s": "7.0"}') as Record<string, unknown>;
  assert.ok(v.a instanceof JsonFloat && v.a.value === 7);
  assert.equal(v.b, 7);
  assert.ok(v.c instanceof JsonFloat && v.c.value === 1e-5);
  assert.equal(v.s, '7.0');
  const back = JSON.parse(configJson(v).replace(/\bNaN\b/, 'null')) as Record<string, unknown>;
  assert.equal(back.b, 7);
  assert.match(configJson(v), /"a": 7\.0,/);
  assert.match(configJson(v), /"f": -325\.0/);
  assert.match(configJson(v), /"g": NaN/);
  assert.match(configJson({ x: new JsonFloat(1e-6), y: new JsonFloat(10000) }), /"x": 0\.000001,\n {2}"y": 10000\.0/);
});

test('withoutTopLevelKey removes one member, nested or not, and keeps every other byte', () => {
  const t = '{\n    "a": 1,\n    "quantization_config": {\n        "modules_to_not_convert": ["x", "y"],\n        "quant_method": "mxfp4"\n    },\n    "swiglu_limit": 7.0\n}\n';
  assert.equal(withoutTopLevelKey(t, 'quantization_config'), '{\n    "a": 1,\n    "swiglu_limit": 7.0\n}\n');
  assert.equal(withoutTopLevelKey(t, 'swiglu_limit'), '{\n    "a": 1,\n    "quantization_config": {\n        "modules_to_not_convert": ["x", "y"],\n        "quant_method": "mxfp4"\n    }\n}\n');
  assert.equal(withoutTopLevelKey(t, 'a'), '{\n    "quantization_config": {\n        "modules_to_not_convert": ["x", "y"],\n        "quant_method": "mxfp4"\n    },\n    "swiglu_limit": 7.0\n}\n');
  assert.equal(withoutTopLevelKey(t, 'modules_to_not_convert'), t, 'only top-level members');
  assert.equal(withoutTopLevelKey('{"only": {"k": "v,}"}}', 'only'), '{}');
});

test('GPT-OSS exported unquantised: config.json without quantization_config, every other byte of the reference kept', async () => {
  // A 1-layer GPT-OSS with MXFP4 experts, the hub's config shape (swiglu_limit 7.0, quantization_config).
  const H = 64;
  const E = 4;
  const F = 64;
  const heads = 4;
  const kv = 2;
  const hd = 16;
  const config = {
    architectures: ['GptOssForCausalLM'], model_type: 'gpt_oss', hidden_size: H, intermediate_size: F, num_hidden_layers: 1,
    num_attention_heads: heads, num_key_value_heads: kv, head_dim: hd, num_local_experts: E, num_experts_per_tok: 2,
    vocab_size: 128, tie_word_embeddings: false, layer_types: ['sliding_attention'], sliding_window: 128,
    swiglu_limit: new JsonFloat(7), rms_norm_eps: new JsonFloat(1e-5), rope_theta: new JsonFloat(150000), torch_dtype: 'bfloat16',
    quantization_config: { modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'], quant_method: 'mxfp4' },
  };
  const L = 'model.layers.0';
  const tensors: TensorSpec[] = [
    ['model.embed_tokens.weight', 'BF16', [128, H]], ['lm_head.weight', 'BF16', [128, H]], ['model.norm.weight', 'BF16', [H]],
    [`${L}.input_layernorm.weight`, 'BF16', [H]], [`${L}.post_attention_layernorm.weight`, 'BF16', [H]],
    [`${L}.self_attn.q_proj.weight`, 'BF16', [heads * hd, H]], [`${L}.self_attn.q_proj.bias`, 'BF16', [heads * hd]],
    [`${L}.self_attn.k_proj.weight`, 'BF16', [kv * hd, H]], [`${L}.self_attn.k_proj.bias`, 'BF16', [kv * hd]],
    [`${L}.self_attn.v_proj.weight`, 'BF16', [kv * hd, H]], [`${L}.self_attn.v_proj.bias`, 'BF16', [kv * hd]],
    [`${L}.self_attn.o_proj.weight`, 'BF16', [H, heads * hd]], [`${L}.self_attn.o_proj.bias`, 'BF16', [H]], [`${L}.self_attn.sinks`, 'BF16', [heads]],
    [`${L}.mlp.router.weight`, 'BF16', [E, H]], [`${L}.mlp.router.bias`, 'BF16', [E]],
    [`${L}.mlp.experts.gate_up_proj_blocks`, 'U8', [E, 2 * F, H / 32, 16]], [`${L}.mlp.experts.gate_up_proj_scales`, 'U8', [E, 2 * F, H / 32]],
    [`${L}.mlp.experts.gate_up_proj_bias`, 'BF16', [E, 2 * F]],
    [`${L}.mlp.experts.down_proj_blocks`, 'U8', [E, H, F / 32, 16]], [`${L}.mlp.experts.down_proj_scales`, 'U8', [E, H, F / 32]],
    [`${L}.mlp.experts.down_proj_bias`, 'BF16', [E, H]],
  ];
  const hf = join(tmp, 'gptoss');
  await writeSparseCheckpoint(hf, config, tensors, { data: 'windows' });
  const meg = join(tmp, 'gptoss.meg');
  await convertHfToMegatron(hf, meg, {});
  const back = join(tmp, 'gptoss.back');
  const r = await convertMegatronToHf(meg, back, {});
  assert.ok(r.plan.notes?.some((n) => /quantization_config \(mxfp4\) dropped/.test(n)), 'the plan says why the config changed');
  const text = await readFile(join(back, 'config.json'), 'utf8');
  assert.equal(text, withoutTopLevelKey(await readFile(join(hf, 'config.json'), 'utf8'), 'quantization_config'));
  assert.doesNotMatch(text, /quantization_config|mxfp4/);
  assert.match(text, /"swiglu_limit": 7\.0/);
  // The weights: every non-expert tensor as it was; the experts as unquantised bf16 (names without _blocks/_scales).
  const d = await compareSafetensorsDirs(hf, back);
  assert.deepEqual(d.differing, []);
  assert.deepEqual(d.missing.sort(), tensors.filter((t) => /_(blocks|scales)$/.test(t[0])).map((t) => t[0]).sort());
  assert.deepEqual(d.extra.sort(), [`${L}.mlp.experts.down_proj`, `${L}.mlp.experts.gate_up_proj`]);
});
