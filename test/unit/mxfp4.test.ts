/**
 * MXFP4 dequantisation without Python: the FP4 table, nibble order, scale bias, the lazy
 * transposed view, and the bad-input messages (the bit-for-bit check against transformers for
 * every scale byte is in test/interop/gptoss.test.ts).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { dequantRows } from '../../src/tensor/mxfp4.js';
import { mxfp4Tensor, withMxfp4Dequantized } from '../../src/formats/mxfp4.js';
import type { CheckpointSource } from '../../src/formats/types.js';
import type { SourceTensor } from '../../src/lazy/types.js';
import { castBytes } from '../../src/tensor/cast.js';
import { workerTuning } from '../../src/tensor/pool.js';
import { cli } from '../helpers/cli.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-mxfp4-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function mem(name: string, shape: number[], data: Uint8Array): SourceTensor {
  return {
    name,
    dtype: 'U8',
    shape,
    byteLength: data.length,
    where: 'memory',
    read: async (box, out) => {
      // Row-major box copy for U8 tensors of any rank.
      const strides = shape.map((_, d) => shape.slice(d + 1).reduce((a, b) => a * b, 1));
      const n = box.size.reduce((a, b) => a * b, 1);
      const idx = box.size.map(() => 0);
      for (let k = 0; k < n; k++) {
        out[k] = data[idx.reduce((s, v, d) => s + (box.start[d]! + v) * strides[d]!, 0)]!;
        for (let d = idx.length - 1; d >= 0; d--) {
          if (++idx[d]! < box.size[d]!) break;
          idx[d] = 0;
        }
      }
    },
  };
}

test('FP4 codes, low nibble first, scale biased by 127', () => {
  const blocks = new Uint8Array(16);
  blocks[0] = 0x71; // low nibble 1 (0.5), high nibble 7 (6)
  blocks[1] = 0xf9; // 9 (−0.5), 15 (−6)
  const out = new Float32Array(32);
  dequantRows(blocks, Uint8Array.of(128), 1, 1, out);
  assert.deepEqual([...out.slice(0, 4)], [1, 12, -1, -12]);
  dequantRows(blocks, Uint8Array.of(127 - 3), 1, 1, out);
  assert.deepEqual([...out.slice(0, 4)], [0.0625, 0.75, -0.0625, -0.75]);
});

test('the view is [E, 32·G, R] (transposed as transformers returns it); sub-boxes read the same bytes', async () => {
  const E = 2, R = 3, G = 2;
  const blocks = Uint8Array.from({ length: E * R * G * 16 }, (_, i) => (i * 37) & 255);
  const scales = Uint8Array.from({ length: E * R * G }, (_, i) => 120 + i);
  const t = mxfp4Tensor('w', mem('w_blocks', [E, R, G, 16], blocks), mem('w_scales', [E, R, G], scales));
  assert.deepEqual(t.shape, [E, 64, R]);
  const whole = new Uint8Array(t.byteLength);
  await t.read({ start: [0, 0, 0], size: [E, 64, R] }, whole);
  // Element [e, c, r] from the formula.
  const vals = new Float32Array(R * G * 32);
  for (let e = 0; e < E; e++) {
    dequantRows(blocks.subarray(e * R * G * 16), scales.subarray(e * R * G), R, G, vals);
    for (let c = 0; c < 64; c++) {
      for (let r = 0; r < R; r++) {
        const bf = new Uint8Array(2);
        castBytes(new Uint8Array(Float32Array.of(vals[r * 64 + c]!).buffer), 'F32', 'BF16', bf);
        const at = ((e * 64 + c) * R + r) * 2;
        assert.deepEqual([...whole.subarray(at, at + 2)], [...bf], `[${e}, ${c}, ${r}]`);
      }
    }
  }
  const sub = new Uint8Array(1 * 10 * 2 * 2);
  await t.read({ start: [1, 28, 1], size: [1, 10, 2] }, sub);
  for (let c = 0; c < 10; c++) for (let r = 0; r < 2; r++) {
    const at = ((64 + 28 + c) * R + 1 + r) * 2;
    assert.deepEqual([...sub.subarray((c * 2 + r) * 2, (c * 2 + r) * 2 + 2)], [...whole.subarray(at, at + 2)]);
  }
});

test('packed rows (the untransposed [E, R, 32·G] layout the GPT-OSS mapping reads): any row order, whole and partial column ranges, every scale', async () => {
  const E = 2, R = 9, G = 3;
  const blocks = Uint8Array.from({ length: E * R * G * 16 }, (_, i) => (i * 131 + 7) & 255);
  // Every scale byte appears (0 and 255 included: subnormal-range and overflowing values).
  const scales = Uint8Array.from({ length: E * R * G }, (_, i) => (i * 29) & 255);
  const t = mxfp4Tensor('w', mem('w_blocks', [E, R, G, 16], blocks), mem('w_scales', [E, R, G], scales));
  assert.deepEqual(t.packedShape, [E, R, 96]);
  const vals = new Float32Array(R * G * 32);
  const expect = (e: number, r: number, c: number): number[] => {
    dequantRows(blocks.subarray(e * R * G * 16), scales.subarray(e * R * G), R, G, vals);
    const bf = new Uint8Array(2);
    castBytes(new Uint8Array(Float32Array.of(vals[r * 96 + c]!).buffer), 'F32', 'BF16', bf);
    return [...bf];
  };
  const order = [8, 0, 2, 4, 6, 1, 3, 5, 7];
  for (const [c0, cn] of [[0, 96], [5, 70], [64, 32], [31, 2]] as const) {
    for (const e of [0, 1]) {
      const out = new Uint8Array(order.length * cn * 2);
      await t.readPackedRows([e], order.length, (i) => order[i]!, c0, cn, out);
      for (let i = 0; i < order.length; i++) {
        for (let c = 0; c < cn; c++) assert.deepEqual([...out.subarray((i * cn + c) * 2, (i * cn + c) * 2 + 2)], expect(e, order[i]!, c0 + c), `e ${e} row ${order[i]} col ${c0 + c}`);
      }
    }
  }
});

test('packed rows into a shared buffer are dequantised on the worker pool, bit for bit as inline', async () => {
  const E = 1, R = 64, G = 90; // GPT-OSS's 2880-wide rows
  const blocks = Uint8Array.from({ length: E * R * G * 16 }, (_, i) => (i * 2654435761) >>> 24);
  const scales = Uint8Array.from({ length: E * R * G }, (_, i) => 110 + (i % 30));
  const t = mxfp4Tensor('w', mem('w_blocks', [E, R, G, 16], blocks), mem('w_scales', [E, R, G], scales));
  const rows = Array.from({ length: R }, (_, i) => (i < R / 2 ? 2 * i : 2 * (i - R / 2) + 1)); // de-interleave
  const inline = new Uint8Array(R * G * 64);
  await t.readPackedRows([0], R, (i) => rows[i]!, 0, G * 32, inline);
  const saved = { ...workerTuning };
  workerTuning.castWorkerMinBytes = 0;
  try {
    for (const [c0, cn] of [[0, G * 32], [40, 1000]] as const) {
      const shared = new Uint8Array(new SharedArrayBuffer(8 + R * cn * 2), 8, R * cn * 2);
      await t.readPackedRows([0], R, (i) => rows[i]!, c0, cn, shared);
      for (let i = 0; i < R; i++) assert.deepEqual(shared.subarray(i * cn * 2, (i + 1) * cn * 2), inline.subarray(i * G * 64 + c0 * 2, i * G * 64 + (c0 + cn) * 2), `row ${i} [${c0}, +${cn}]`);
    }
  } finally {
    Object.assign(workerTuning, saved);
  }
});

test('bad input: inconsistent blocks/scales shapes, blocks without scales, through the CLI too', async () => {
  const src = (tensors: SourceTensor[]): CheckpointSource => ({ format: 'safetensors', path: 'm', root: 'm', tensors: new Map(tensors.map((t) => [t.name, t])), objects: new Map(), metadata: new Map(), dataFiles: [], sideFiles: [], close: async () => undefined });
 assert.throws(() => withMxfp4Dequantized(src([mem('x_blocks', [2, 3, 2, 16], new Uint8Array(192)), mem('x_scales', [2, 3, 3], new Uint8Array(18))])), /x_blocks \(U8 \[2, 3, 2, 16\]\) and x_scales \(U8 \[2, 3, 3\]\) are not MXFP4 blocks and scales/);
  assert.throws(() => withMxfp4Dequantized(src([mem('y_blocks', [1, 1, 1, 16], new Uint8Array(16))])), /y_blocks: MXFP4 blocks without y_scales/);
  // Through the CLI: a GPT-OSS-like directory whose scales disagree with its blocks.
  const dir = join(tmp, 'bad');
  await rm(dir, { recursive: true, force: true });
  await import('node:fs/promises').then((f) => f.mkdir(dir));
  const header = { 'model.layers.0.mlp.experts.down_proj_blocks': { dtype: 'U8', shape: [2, 32, 1, 16], data_offsets: [0, 1024] }, 'model.layers.0.mlp.experts.down_proj_scales': { dtype: 'U8', shape: [2, 32, 2], data_offsets: [1024, 1152] } };
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  await writeFile(join(dir, 'model.safetensors'), Buffer.concat([len, Buffer.from(json), Buffer.alloc(1152)]));
  await writeFile(join(dir, 'config.json'), JSON.stringify({ architectures: ['GptOssForCausalLM'], model_type: 'gpt_oss', hidden_size: 32, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8, vocab_size: 64, num_local_experts: 2, num_experts_per_tok: 1, layer_types: ['full_attention'] }));
  const r = await new Promise<{ code: number; stderr: string }>((res) => execFile(process.execPath, [cli, 'convert', '--to', 'megatron', dir, join(tmp, 'bad.out')], (err, _o, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr })));
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /down_proj_blocks \(U8 \[2, 32, 1, 16\]\) and model\.layers\.0\.mlp\.experts\.down_proj_scales \(U8 \[2, 32, 2\]\) are not MXFP4 blocks and scales/);
  assert.equal(r.stderr.trim().split('\n').length, 1, `one message line, got:\n${r.stderr}`);
  assert.equal(await readdir(join(tmp, 'bad.out')).catch(() => 'absent'), 'absent');
});
