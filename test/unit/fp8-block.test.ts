/**
 * FP8 block-scaled dequantisation against the committed golden table (test/fixtures/
 * fp8-block.safetensors, made by test/oracle/deepseek_oracle.py fp8_table with torch 2.13): every
 * e4m3 byte value (NaNs and ±0 included) in every 128×128 block of a ragged [300, 260] weight under
 * edge scales (1, negative, 2⁻⁶, 1/448, ones that make float32 and bf16 subnormals, one that
 * overflows bf16 to ±Inf, the smallest float32 subnormal), and a [128, 256] weight with
 * log-uniform random scales — each must equal Megatron-Bridge's dequantize_fp8_blockwise bit for
 * bit; reads of boxes that cut through blocks must equal the same rows and columns of the whole.
 * (test/interop/deepseek.test.ts re-derives the table from torch on every run.)
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { withFp8Dequantized } from '../../src/formats/fp8-block.js';
import type { CheckpointSource } from '../../src/formats/types.js';

const FIXTURE = join(import.meta.dirname, '..', '..', '..', 'test', 'fixtures', 'fp8-block.safetensors');

/** The fixture's X / X_scale_inv pairs as a source, and its X_ref tensors. */
async function open(): Promise<{ view: CheckpointSource; ref: CheckpointSource }> {
  const all = await openCheckpoint(FIXTURE);
  const pick = (f: (n: string) => boolean): CheckpointSource => ({ ...all, tensors: new Map([...all.tensors].filter(([n]) => f(n))) });
  return { view: withFp8Dequantized(pick((n) => !n.endsWith('_ref')), { blockRows: 128, blockCols: 128 }), ref: pick((n) => n.endsWith('_ref')) };
}

async function bytes(src: CheckpointSource, name: string, start?: number[], size?: number[]): Promise<Uint16Array> {
  const t = src.tensors.get(name)!;
  const box = { start: start ?? t.shape.map(() => 0), size: size ?? [...t.shape] };
  const out = new Uint8Array(box.size.reduce((a, b) => a * b, 1) * 2);
  await t.read(box, out);
  return new Uint16Array(out.buffer);
}

test('every e4m3 value under every edge scale dequantises to the reference bf16 bits (78,000 + 32,768 values)', async () => {
  const { view, ref } = await open();
  for (const n of ['w', 'v']) {
    assert.equal(view.tensors.get(n)!.dtype, 'BF16');
    assert.ok(!view.tensors.has(`${n}_scale_inv`));
    const got = await bytes(view, n);
    const want = await bytes(ref, `${n}_ref`);
    let diff = 0;
    for (let i = 0; i < want.length; i++) if (got[i] !== want[i]) diff++;
    assert.equal(diff, 0, `${n}: ${diff} of ${want.length} values differ`);
  }
  await view.close();
});

test('boxes that cut through blocks read the same bits as the whole tensor', async () => {
  const { view } = await open();
  const whole = await bytes(view, 'w');
  for (const [r0, c0, rn, cn] of [[0, 0, 1, 1], [127, 127, 2, 2], [100, 30, 150, 200], [299, 0, 1, 260], [5, 255, 290, 5]] as const) {
    const part = await bytes(view, 'w', [r0, c0], [rn, cn]);
    for (let r = 0; r < rn; r++) for (let c = 0; c < cn; c++) assert.equal(part[r * cn + c], whole[(r0 + r) * 260 + c0 + c], `box at ${r0},${c0}: [${r}, ${c}]`);
  }
  await view.close();
});
