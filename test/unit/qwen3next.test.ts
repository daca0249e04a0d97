/**
 * Qwen3-Next without Python: a synthetic HF checkpoint whose every element is distinct goes to
 * Megatron and back byte for byte, and the regrouped tensors hold exactly the rows
 * Megatron-Bridge's `merge_gdn_linear_weights` / `merge_qkv_weights` (attention_output_gate) put
 * there — recomputed here by its reshape/split recipe, independently of the row-run code; the
 * gated output norm is HF − 1; torch_dist keys are per layer with GDN `in_proj` / `conv1d` split as
 * megatron-core's `_split_tensor_factory` splits them. Bad input: an unknown layer type.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { openMegatron } from '../../src/megatron/checkpoint.js';
import { writeSafetensors } from '../../src/formats/safetensors.js';
import { writeOutput } from '../../src/exec/output.js';
import { copyOf } from '../../src/lazy/expr.js';
import { wholeBox, type Box } from '../../src/tensor/layout.js';
import type { SourceTensor } from '../../src/lazy/types.js';
import { cli } from '../helpers/cli.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-qnext-unit-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const H = 8;
const HEADS = 4;
const GROUPS = 2;
const HD = 4;
const V = 10;
const E = 2;
const MOE = 6;
const SHARED = 5;
const NK = 2;
const NV = 4;
const DK = 3;
const DV = 2;
const KER = 3;
const TYPES = ['linear_attention', 'full_attention', 'linear_attention'];

function config(types: unknown[] = TYPES): Record<string, unknown> {
  return {
    architectures: ['Qwen3NextForCausalLM'], model_type: 'qwen3_next', vocab_size: V, hidden_size: H, num_hidden_layers: types.length, layer_types: types,
    num_attention_heads: HEADS, num_key_value_heads: GROUPS, head_dim: HD, intermediate_size: 12, num_experts: E, num_experts_per_tok: 1,
    moe_intermediate_size: MOE, shared_expert_intermediate_size: SHARED, decoder_sparse_step: 1, mlp_only_layers: [], linear_conv_kernel_dim: KER,
    linear_key_head_dim: DK, linear_value_head_dim: DV, linear_num_key_heads: NK, linear_num_value_heads: NV, rms_norm_eps: 1e-6,
    tie_word_embeddings: false, max_position_embeddings: 32, rope_parameters: { rope_theta: 10000, partial_rotary_factor: 0.25, rope_type: 'default' }, dtype: 'float32',
  };
}

/** HF tensor shapes of the synthetic model. */
function hfShapes(types: readonly string[]): Map<string, number[]> {
  const s = new Map<string, number[]>([['model.embed_tokens.weight', [V, H]], ['model.norm.weight', [H]], ['lm_head.weight', [V, H]]]);
  types.forEach((t, i) => {
    const L = `model.layers.${i}`;
    s.set(`${L}.input_layernorm.weight`, [H]);
    s.set(`${L}.post_attention_layernorm.weight`, [H]);
    if (t === 'full_attention') {
      s.set(`${L}.self_attn.q_proj.weight`, [2 * HEADS * HD, H]);
      s.set(`${L}.self_attn.k_proj.weight`, [GROUPS * HD, H]);
      s.set(`${L}.self_attn.v_proj.weight`, [GROUPS * HD, H]);
      s.set(`${L}.self_attn.o_proj.weight`, [H, HEADS * HD]);
      s.set(`${L}.self_attn.q_norm.weight`, [HD]);
      s.set(`${L}.self_attn.k_norm.weight`, [HD]);
    } else {
      s.set(`${L}.linear_attn.in_proj_qkvz.weight`, [2 * NK * DK + 2 * NV * DV, H]);
      s.set(`${L}.linear_attn.in_proj_ba.weight`, [2 * NV, H]);
      s.set(`${L}.linear_attn.conv1d.weight`, [2 * NK * DK + NV * DV, 1, KER]);
      s.set(`${L}.linear_attn.A_log`, [NV]);
      s.set(`${L}.linear_attn.dt_bias`, [NV]);
      s.set(`${L}.linear_attn.norm.weight`, [DV]);
      s.set(`${L}.linear_attn.out_proj.weight`, [H, NV * DV]);
    }
    s.set(`${L}.mlp.gate.weight`, [E, H]);
    for (let e = 0; e < E; e++) {
      s.set(`${L}.mlp.experts.${e}.gate_proj.weight`, [MOE, H]);
      s.set(`${L}.mlp.experts.${e}.up_proj.weight`, [MOE, H]);
      s.set(`${L}.mlp.experts.${e}.down_proj.weight`, [H, MOE]);
    }
    s.set(`${L}.mlp.shared_expert.gate_proj.weight`, [SHARED, H]);
    s.set(`${L}.mlp.shared_expert.up_proj.weight`, [SHARED, H]);
    s.set(`${L}.mlp.shared_expert.down_proj.weight`, [H, SHARED]);
    s.set(`${L}.mlp.shared_expert_gate.weight`, [1, H]);
  });
  return s;
}

const numel = (s: readonly number[]): number => s.reduce((a, b) => a * b, 1);

/** An in-memory F32 tensor (C order). */
function memTensor(name: string, shape: number[], data: Float32Array): SourceTensor {
  const strides = shape.map((_, k) => numel(shape.slice(k + 1)));
  return {
    name, dtype: 'F32', shape, byteLength: data.length * 4, where: 'memory',
    read: async (box: Box, out: Uint8Array) => {
      const f = new Float32Array(out.buffer, out.byteOffset, numel(box.size));
      let w = 0;
      const idx = box.size.map(() => 0);
      for (let n = 0; n < f.length; n++) {
        let off = 0;
        for (let k = 0; k < shape.length; k++) off += (box.start[k]! + idx[k]!) * strides[k]!;
        f[w++] = data[off]!;
        for (let k = shape.length - 1; k >= 0; k--) {
          if (++idx[k]! < box.size[k]!) break;
          idx[k] = 0;
        }
      }
    },
  };
}

async function makeHf(dir: string, types: string[]): Promise<Map<string, Float32Array>> {
  const data = new Map<string, Float32Array>();
  let next = 1;
  const srcs: SourceTensor[] = [];
  for (const [name, shape] of hfShapes(types)) {
    const d = new Float32Array(numel(shape));
    // Distinct values everywhere; the GDN output norm in [0.5, 2) so weight − 1 is exact.
    if (name.endsWith('linear_attn.norm.weight')) d.forEach((_, k) => (d[k] = 0.5 + (next++ % 97) / 97));
    else d.forEach((_, k) => (d[k] = next++));
    data.set(name, d);
    srcs.push(memTensor(name, shape, d));
  }
  const cfgFile = join(tmp, `${dir}.config.json`);
  await writeFile(cfgFile, JSON.stringify(config(types)));
  await writeOutput(cfgFile, join(tmp, dir), 'dir', writeSafetensors(srcs.map((t) => copyOf(t.name, t))).files, [{ from: cfgFile, to: 'config.json' }], {});
  return data;
}

/** Rows r0..r0+n of a [R, C] matrix. */
const rowsOf = (d: Float32Array, C: number, r0: number, n: number): number[] => Array.from(d.subarray(r0 * C, (r0 + n) * C));

test('Qwen3-Next: HF → Megatron → HF byte-identical; in_proj, gated linear_qkv and out_norm as Megatron-Bridge lays them out; split torch_dist keys', async () => {
  const hf = await makeHf('hf', TYPES);
  const meg = join(tmp, 'meg');
  await convertHfToMegatron(join(tmp, 'hf'), meg, { dtype: 'F32' });
  const m = await openMegatron(meg);
  const read = async (n: string): Promise<number[]> => {
    const t = m.source.tensors.get(n);
    assert.ok(t, `torch_dist key ${n}`);
    const b = new Uint8Array(t.byteLength);
    await t.read(wholeBox(t.shape), b);
    return Array.from(new Float32Array(b.buffer, b.byteOffset, t.byteLength / 4));
  };
  try {
    // GDN layer 0. merge_gdn_linear_weights: qkvz.reshape(nk, P, H) split [dk, dk, r·dv, r·dv]
    // along dim 1; ba.reshape(nk, 2r, H) split [r, r]; in_proj = cat([q, k, v, z, b, a]) (tp = 1).
    const r = NV / NK;
    const P = 2 * DK + 2 * r * DV;
    const qkvz = hf.get('model.layers.0.linear_attn.in_proj_qkvz.weight')!;
    const ba = hf.get('model.layers.0.linear_attn.in_proj_ba.weight')!;
    const take = (d: Float32Array, stride: number, off: number, n: number): number[] => Array.from({ length: NK }, (_, h) => rowsOf(d, H, h * stride + off, n)).flat();
    const want: Record<string, number[]> = {
      query: take(qkvz, P, 0, DK),
      key: take(qkvz, P, DK, DK),
      value: take(qkvz, P, 2 * DK, r * DV),
      z: take(qkvz, P, 2 * DK + r * DV, r * DV),
      beta: take(ba, 2 * r, 0, r),
      alpha: take(ba, 2 * r, r, r),
    };
    for (const [suffix, rows] of Object.entries(want)) assert.deepEqual(await read(`decoder.layers.0.self_attention.in_proj.weight.${suffix}`), rows, `in_proj.${suffix}`);
    assert.ok(!m.source.tensors.has('decoder.layers.0.self_attention.in_proj.weight'), 'in_proj is stored split');
    const conv = hf.get('model.layers.0.linear_attn.conv1d.weight')!;
    const qk = NK * DK;
    assert.deepEqual(await read('decoder.layers.0.self_attention.conv1d.weight.query'), rowsOf(conv, KER, 0, qk));
    assert.deepEqual(await read('decoder.layers.0.self_attention.conv1d.weight.key'), rowsOf(conv, KER, qk, qk));
    assert.deepEqual(await read('decoder.layers.0.self_attention.conv1d.weight.value'), rowsOf(conv, KER, 2 * qk, NV * DV));
    const norm = hf.get('model.layers.0.linear_attn.norm.weight')!;
    assert.deepEqual(await read('decoder.layers.0.self_attention.out_norm.weight'), Array.from(norm, (x) => Math.fround(x - 1)));
    assert.deepEqual(await read('decoder.layers.0.self_attention.in_proj.layer_norm_weight'), Array.from(hf.get('model.layers.0.input_layernorm.weight')!));
    // Full-attention layer 1. merge_qkv_weights with attention_output_gate: q.view(np, 2·hn, H)
    // chunked into query / gate halves; per group g: [queries of g; gates of g; k_g; v_g].
    const q = hf.get('model.layers.1.self_attn.q_proj.weight')!;
    const k = hf.get('model.layers.1.self_attn.k_proj.weight')!;
    const v = hf.get('model.layers.1.self_attn.v_proj.weight')!;
    const rq = HEADS / GROUPS;
    const qkv: number[] = [];
    for (let g = 0; g < GROUPS; g++) {
      for (let h = g * rq; h < (g + 1) * rq; h++) qkv.push(...rowsOf(q, H, h * 2 * HD, HD));
      for (let h = g * rq; h < (g + 1) * rq; h++) qkv.push(...rowsOf(q, H, h * 2 * HD + HD, HD));
      qkv.push(...rowsOf(k, H, g * HD, HD), ...rowsOf(v, H, g * HD, HD));
    }
    assert.deepEqual(await read('decoder.layers.1.self_attention.linear_qkv.weight'), qkv);
    assert.deepEqual(await read('decoder.layers.1.mlp.shared_experts.gate_weight'), Array.from(hf.get('model.layers.1.mlp.shared_expert_gate.weight')!));
    assert.equal(m.source.tensors.get('decoder.layers.2.mlp.experts.experts.linear_fc1.weight')?.shape.join(','), `${E},${2 * MOE},${H}`);
  } finally {
    await m.source.close();
  }
  await convertMegatronToHf(meg, join(tmp, 'back'), {});
  assert.ok((await readFile(join(tmp, 'hf', 'model.safetensors'))).equals(await readFile(join(tmp, 'back', 'model.safetensors'))), 'round trip is byte-identical');
  const back = JSON.parse(await readFile(join(tmp, 'back', 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.deepEqual(back.layer_types, TYPES, 'the hybrid pattern is carried to the HF output');
});

function run(a: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...a], (err, _stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr }));
  });
}

test('Qwen3-Next: an unknown layer type in the hybrid pattern is one clear error, nothing written', async () => {
  await makeHf('hf-bad', TYPES);
  const cfg = config(['linear_attention', 'mamba', 'linear_attention']);
  await writeFile(join(tmp, 'hf-bad', 'config.json'), JSON.stringify(cfg));
  const out = join(tmp, 'bad.out');
  const r = await run(['convert', '--to', 'megatron', join(tmp, 'hf-bad'), out]);
  assert.equal(r.code, 1, r.stderr);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /^shardshift: error: .*layer_types\[1\] is "mamba"; a Qwen3-Next layer is "linear_attention" \(gated delta-net\) or "full_attention"/);
  assert.ok(!existsSync(out), 'nothing written');
});

test('Qwen3-Next: legacy / fsdp_dtensor outputs are refused (their GDN TP layout is not mapped yet)', async () => {
  await makeHf('hf-legacy', TYPES);
  for (const ckptFormat of ['torch', 'fsdp_dtensor'] as const) {
    await assert.rejects(convertHfToMegatron(join(tmp, 'hf-legacy'), join(tmp, `legacy-${ckptFormat}`), { ckptFormat }), new RegExp(`--ckpt-format ${ckptFormat} is not supported for Qwen3-Next \\(80B-A3B\\) yet`));
    assert.ok(!existsSync(join(tmp, `legacy-${ckptFormat}`)));
  }
});
