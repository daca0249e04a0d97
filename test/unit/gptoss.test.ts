/**
 * GPT-OSS without Python: the expert layout moves element by element (interleaved gate/up
 * columns → [gate; up] rows, transposes), HF → Megatron → HF back to the same tensors, and a
 * bad `layer_types` entry refused through the CLI.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeF32Safetensors, type SyntheticTensor } from '../helpers/synthetic.js';
import { digestPath, sortKeys } from '../helpers/describe.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { openMegatron } from '../../src/megatron/checkpoint.js';
import { openSafetensors } from '../../src/formats/safetensors.js';
import type { SourceTensor } from '../../src/lazy/types.js';
import { cli } from '../helpers/cli.js';

const [LAYERS, H, HEADS, KV, HD, E, F, V] = [2, 16, 4, 2, 4, 3, 8, 20];
let tmp: string;

function config(edit: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    architectures: ['GptOssForCausalLM'], model_type: 'gpt_oss', vocab_size: V, hidden_size: H, num_hidden_layers: LAYERS,
    num_attention_heads: HEADS, num_key_value_heads: KV, head_dim: HD, intermediate_size: F, num_local_experts: E,
    num_experts_per_tok: 2, sliding_window: 4, layer_types: ['sliding_attention', 'full_attention'], tie_word_embeddings: false,
    attention_bias: true, ...edit,
  };
}

async function writeHf(dir: string, edit: Record<string, unknown> = {}): Promise<void> {
  await mkdir(dir, { recursive: true });
  const t: SyntheticTensor[] = [
    { name: 'model.embed_tokens.weight', shape: [V, H] },
    { name: 'model.norm.weight', shape: [H] },
    { name: 'lm_head.weight', shape: [V, H] },
  ];
  for (let i = 0; i < LAYERS; i++) {
    const L = `model.layers.${i}`;
    t.push(
      { name: `${L}.input_layernorm.weight`, shape: [H] },
      { name: `${L}.post_attention_layernorm.weight`, shape: [H] },
      { name: `${L}.self_attn.q_proj.weight`, shape: [HEADS * HD, H] },
      { name: `${L}.self_attn.q_proj.bias`, shape: [HEADS * HD] },
      { name: `${L}.self_attn.k_proj.weight`, shape: [KV * HD, H] },
      { name: `${L}.self_attn.k_proj.bias`, shape: [KV * HD] },
      { name: `${L}.self_attn.v_proj.weight`, shape: [KV * HD, H] },
      { name: `${L}.self_attn.v_proj.bias`, shape: [KV * HD] },
      { name: `${L}.self_attn.o_proj.weight`, shape: [H, HEADS * HD] },
      { name: `${L}.self_attn.o_proj.bias`, shape: [H] },
      { name: `${L}.self_attn.sinks`, shape: [HEADS] },
      { name: `${L}.mlp.router.weight`, shape: [E, H] },
      { name: `${L}.mlp.router.bias`, shape: [E] },
      { name: `${L}.mlp.experts.gate_up_proj`, shape: [E, H, 2 * F] },
      { name: `${L}.mlp.experts.gate_up_proj_bias`, shape: [E, 2 * F] },
      { name: `${L}.mlp.experts.down_proj`, shape: [E, F, H] },
      { name: `${L}.mlp.experts.down_proj_bias`, shape: [E, H] },
    );
  }
  await writeF32Safetensors(join(dir, 'model.safetensors'), t, 5);
  await writeFile(join(dir, 'config.json'), JSON.stringify(config(edit)));
}

async function values(t: SourceTensor): Promise<Float32Array> {
  const buf = new Uint8Array(t.byteLength);
  await t.read({ start: t.shape.map(() => 0), size: [...t.shape] }, buf);
  return new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
}

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-gptoss-unit-'));
  await writeHf(join(tmp, 'hf'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('gpt_oss: fc1 = de-interleaved gate_up_projᵀ, fc1 bias de-interleaved, fc2 = down_projᵀ, sinks → softmax_offset; round trip gives the same tensors', async () => {
  const hf = join(tmp, 'hf');
  const meg = join(tmp, 'meg');
  await convertHfToMegatron(hf, meg, { dtype: 'F32' });
  const s = await openSafetensors(join(hf, 'model.safetensors'));
  const m = await openMegatron(meg);
  try {
    const get = (n: string): SourceTensor => {
      const t = m.source.tensors.get(n);
      assert.ok(t, `no ${n}`);
      return t;
    };
    const fc1 = get('decoder.layers.mlp.experts.experts.linear_fc1.weight');
    assert.deepEqual(fc1.shape, [LAYERS, E, 2 * F, H]);
    const fc1b = get('decoder.layers.mlp.experts.experts.linear_fc1.bias');
    const fc2 = get('decoder.layers.mlp.experts.experts.linear_fc2.weight');
    assert.deepEqual(fc2.shape, [LAYERS, E, H, F]);
    const sinks = get('decoder.layers.self_attention.core_attention.softmax_offset');
    assert.deepEqual(sinks.shape, [LAYERS, HEADS]);
    for (const k of ['decoder.layers.self_attention.linear_proj.bias', 'decoder.layers.mlp.router.bias', 'decoder.layers.mlp.experts.experts.linear_fc2.bias', 'decoder.layers.self_attention.linear_qkv.bias']) get(k);
    const [w1, b1, w2, sk] = (await Promise.all([fc1, fc1b, fc2, sinks].map(values))) as [Float32Array, Float32Array, Float32Array, Float32Array];
    for (let l = 0; l < LAYERS; l++) {
      const gu = await values(s.tensors.get(`model.layers.${l}.mlp.experts.gate_up_proj`)!);
      const gub = await values(s.tensors.get(`model.layers.${l}.mlp.experts.gate_up_proj_bias`)!);
      const dp = await values(s.tensors.get(`model.layers.${l}.mlp.experts.down_proj`)!);
      const hs = await values(s.tensors.get(`model.layers.${l}.self_attn.sinks`)!);
      for (let e = 0; e < E; e++) {
        for (let f = 0; f < F; f++) {
          for (let h = 0; h < H; h++) {
            const gate = gu[(e * H + h) * 2 * F + 2 * f]!;
            const up = gu[(e * H + h) * 2 * F + 2 * f + 1]!;
            assert.equal(w1[((l * E + e) * 2 * F + f) * H + h], gate);
            assert.equal(w1[((l * E + e) * 2 * F + F + f) * H + h], up);
            assert.equal(w2[((l * E + e) * H + h) * F + f], dp[(e * F + f) * H + h]);
          }
          assert.equal(b1[(l * E + e) * 2 * F + f], gub[e * 2 * F + 2 * f]);
          assert.equal(b1[(l * E + e) * 2 * F + F + f], gub[e * 2 * F + 2 * f + 1]);
        }
      }
      for (let k = 0; k < HEADS; k++) assert.equal(sk[l * HEADS + k], hs[k]);
    }
  } finally {
    await m.source.close();
    await s.close();
  }
  const back = join(tmp, 'back');
  await convertMegatronToHf(meg, back, { dtype: 'F32' });
  assert.deepEqual(sortKeys(await digestPath(join(back, 'model.safetensors'))), sortKeys(await digestPath(join(hf, 'model.safetensors'))));
});

function run(args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, _stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr }));
  });
}

test('gpt_oss: an unknown layer type is refused with one clear message (CLI, exit 1)', async () => {
  const bad = join(tmp, 'bad-layer');
  await writeHf(bad, { layer_types: ['sliding_attention', 'linear_attention'] });
  const r = await run(['convert', '--to', 'megatron', bad, join(tmp, 'bad-layer.out'), '-q']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /layer_types\[1\] is "linear_attention"; GPT-OSS layers are sliding_attention or full_attention/);
});
