/**
 * compressed-tensors pack-quantized INT4 decompression against the committed golden table
 * (test/fixtures/int4-pack.safetensors, made by test/oracle/int4_oracle.py table with
 * compressed-tensors 0.20.1): every 4-bit value in every group of 32 under bf16, fp16 and fp32
 * scales (1, negative, zero, subnormal, a product overflowing to Inf, random), and weights
 * compressed by the package itself — each must equal its PackedQuantizationCompressor.decompress
 * bit for bit; boxes that cut through words and groups read the same bits as the whole.
 * (test/interop/deepseek.test.ts re-derives the table from the package on every run.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { packQuantizedSchemeOf, withInt4Dequantized } from '../../src/formats/pack-quantized.js';
import type { CheckpointSource } from '../../src/formats/types.js';

const FIXTURE = join(import.meta.dirname, '..', '..', '..', 'test', 'fixtures', 'int4-pack.safetensors');

async function open(): Promise<{ view: CheckpointSource; ref: CheckpointSource }> {
  const all = await openCheckpoint(FIXTURE);
  const pick = (f: (n: string) => boolean): CheckpointSource => ({ ...all, tensors: new Map([...all.tensors].filter(([n]) => f(n))) });
  return { view: await withInt4Dequantized(pick((n) => !n.startsWith('ref.')), { groupSize: 32 }), ref: pick((n) => n.startsWith('ref.')) };
}

async function read(src: CheckpointSource, name: string, start?: number[], size?: number[]): Promise<Uint8Array> {
  const t = src.tensors.get(name)!;
  const box = { start: start ?? t.shape.map(() => 0), size: size ?? [...t.shape] };
  const item = t.dtype === 'F32' ? 4 : 2;
  const out = new Uint8Array(box.size.reduce((a, b) => a * b, 1) * item);
  await t.read(box, out);
  return out;
}

test('every INT4 value under every edge scale (bf16, fp16, fp32) decompresses to the package\'s bits', async () => {
  const { view, ref } = await open();
  const names = [...ref.tensors.keys()].map((n) => n.slice('ref.'.length));
  assert.equal(names.length, 6);
  for (const n of names) {
    assert.equal(view.tensors.get(n)!.dtype, ref.tensors.get(`ref.${n}`)!.dtype, n);
    assert.ok(Buffer.from(await read(view, n)).equals(Buffer.from(await read(ref, `ref.${n}`))), `${n}: differs from compressed-tensors' decompression`);
  }
  assert.ok(![...view.tensors.keys()].some((n) => /_(packed|scale|shape)$/.test(n)));
  await view.close();
});

test('boxes that cut through packed words and scale groups read the same bits as the whole', async () => {
  const { view } = await open();
  const t = view.tensors.get('bf16.weight')!;
  const [R, C] = t.shape as [number, number];
  const whole = new Uint16Array((await read(view, 'bf16.weight')).buffer);
  for (const [r0, c0, rn, cn] of [[0, 0, 1, 1], [3, 7, 2, 3], [5, 31, 4, 2], [0, 33, 16, 60], [15, 95, 1, 1]] as const) {
    const part = new Uint16Array((await read(view, 'bf16.weight', [r0, c0], [rn, cn])).buffer);
    for (let r = 0; r < rn; r++) for (let c = 0; c < cn; c++) assert.equal(part[r * cn + c], whole[(r0 + r) * C + c0 + c], `box ${r0},${c0}: [${r}, ${c}]`);
  }
  assert.equal(R, 16);
  await view.close();
});

test('compressed-tensors schemes other than symmetric per-group INT4 are refused by name', () => {
  const base = { quant_method: 'compressed-tensors', format: 'pack-quantized', quantization_status: 'compressed', config_groups: { group_0: { targets: ['Linear'], input_activations: null, weights: { num_bits: 4, type: 'int', symmetric: true, strategy: 'group', group_size: 32, dynamic: false, actorder: null } } } };
  assert.deepEqual(packQuantizedSchemeOf({ quantization_config: base }, 'config.json'), { groupSize: 32 });
  assert.deepEqual(packQuantizedSchemeOf({ text_config: { quantization_config: base } }, 'config.json'), { groupSize: 32 });
  const w = base.config_groups.group_0.weights;
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ ...base, format: 'float-quantized' }, /format "float-quantized"/],
    [{ ...base, config_groups: { group_0: { ...base.config_groups.group_0, weights: { ...w, symmetric: false } } } }, /weights\.symmetric false/],
    [{ ...base, config_groups: { group_0: { ...base.config_groups.group_0, weights: { ...w, num_bits: 8 } } } }, /weights\.num_bits 8/],
    [{ ...base, config_groups: { group_0: { ...base.config_groups.group_0, weights: { ...w, actorder: 'group' } } } }, /actorder "group"/],
    [{ ...base, config_groups: { group_0: { ...base.config_groups.group_0, input_activations: { num_bits: 8 } } } }, /quantizes input activations/],
  ];
  for (const [q, re] of cases) assert.throws(() => packQuantizedSchemeOf({ quantization_config: q }, 'config.json'), re);
  // compressed-tensors' defaults (type int, symmetric, static) apply to fields left out; a missing required one says so.
  const { type: _t, symmetric: _s, dynamic: _d, ...bare } = w;
  assert.deepEqual(packQuantizedSchemeOf({ quantization_config: { ...base, config_groups: { group_0: { ...base.config_groups.group_0, weights: bare } } } }, 'config.json'), { groupSize: 32 });
  const { num_bits: _n, ...noBits } = w;
  assert.throws(() => packQuantizedSchemeOf({ quantization_config: { ...base, config_groups: { group_0: { ...base.config_groups.group_0, weights: noBits } } } }, 'config.json'), /weights\.num_bits missing \(default 8\)/);
});

test('an INT4 triplet missing its scale, or a zero point, is refused naming the tensor', async () => {
  const all = await openCheckpoint(FIXTURE);
  const without = (drop: string): CheckpointSource => ({ ...all, tensors: new Map([...all.tensors].filter(([n]) => n !== drop && !n.startsWith('ref.'))) });
  await assert.rejects(withInt4Dequantized(without('bf16.weight_scale'), { groupSize: 32 }), /bf16\.weight_packed: INT4-packed weight without bf16\.weight_scale/);
  await assert.rejects(withInt4Dequantized(without('bf16.weight_packed'), { groupSize: 32 }), /bf16\.weight_(scale|shape): INT4 (scales|shape) without bf16\.weight_packed/);
  await assert.rejects(withInt4Dequantized(without('none'), undefined), /INT4-packed weights, but config\.json has no compressed-tensors pack-quantized quantization_config/);
  const zp = new Map(all.tensors);
  zp.set('bf16.weight_zero_point', all.tensors.get('bf16.weight_shape')!);
  await assert.rejects(withInt4Dequantized({ ...all, tensors: zp }, { groupSize: 32 }), /zero points \(an asymmetric scheme\) are not read/);
  await all.close();
});
