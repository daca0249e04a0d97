/**
 * `--quantize mxfp4`'s quantizer against transformers' own (golden fixture made by
 * test/oracle/mxfp4_oracle.py with transformers 5.24 quantize_to_mxfp4 → triton_kernels'
 * downcast_to_mxfp_torch), and what an MXFP4 → bf16 → MXFP4 round trip changes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { withMxfp4Dequantized } from '../../src/formats/mxfp4.js';
import { mxfp4Pair, type Bf16Boxes } from '../../src/tensor/mxfp4-quantize.js';
import type { SourceTensor } from '../../src/lazy/types.js';
import { wholeBox } from '../../src/tensor/layout.js';

const FIXTURE = join(import.meta.dirname, '..', '..', '..', 'test', 'fixtures', 'mxfp4-quantize.safetensors');

function boxes(t: SourceTensor): Bf16Boxes {
  return { name: t.name, dtype: t.dtype, shape: t.shape, produce: (b, o) => t.read(b, o) };
}

async function whole(t: SourceTensor): Promise<Uint8Array> {
  const b = new Uint8Array(t.byteLength);
  await t.read(wholeBox(t.shape), b);
  return b;
}

test('MXFP4 quantizer: every block of the golden fixture bit for bit as transformers\' quantize_to_mxfp4', async (t) => {
  const src = await openCheckpoint(FIXTURE);
  try {
    const w = src.tensors.get('w')!;
    const pair = mxfp4Pair(boxes(w));
    const wantB = await whole(src.tensors.get('w_blocks')!);
    const wantS = await whole(src.tensors.get('w_scales')!);
    assert.deepEqual(pair.blocksShape, src.tensors.get('w_blocks')!.shape);
    assert.deepEqual(pair.scalesShape, src.tensors.get('w_scales')!.shape);
    const gotB = new Uint8Array(wantB.length);
    const gotS = new Uint8Array(wantS.length);
    await pair.blocks(wholeBox(pair.blocksShape), gotB);
    await pair.scales(wholeBox(pair.scalesShape), gotS);
    let badS = 0;
    let badB = 0;
    let first = '';
    for (let i = 0; i < wantS.length; i++) {
      if (gotS[i] !== wantS[i]) {
        badS++;
        first ||= `scale ${i}: ${gotS[i]} vs ${wantS[i]}`;
      }
    }
    for (let i = 0; i < wantB.length; i++) {
      if (gotB[i] !== wantB[i]) {
        badB++;
        first ||= `block byte ${i} (block ${Math.floor(i / 16)}): ${gotB[i]!.toString(16)} vs ${wantB[i]!.toString(16)}`;
      }
    }
    t.diagnostic(`${wantS.length} blocks compared`);
    assert.equal(badS + badB, 0, `${badS} scale(s) and ${badB} block byte(s) differ; first: ${first}`);
    // Boxes of any shape give the same bytes (the executor cuts tensors into row boxes).
    const N = pair.blocksShape[1]!;
    const part = new Uint8Array(5 * 3 * 7);
    await pair.blocks({ start: [0, N - 5, 2, 4], size: [1, 5, 3, 7] }, part);
    let o = 0;
    for (let r = N - 5; r < N; r++) for (let g = 2; g < 5; g++) for (let j = 4; j < 11; j++) assert.equal(part[o++], wantB[(r * 8 + g) * 16 + j]);
  } finally {
    await src.close();
  }
});

test('MXFP4 quantizer: a non-finite weight is refused naming the tensor and index', async () => {
  const bits = new Uint16Array(32 * 2).fill(0x3f80);
  bits[32 + 5] = 0x7fc0; // NaN at input 5 of output row 1 … laid out input-major below
  const K = 32;
  const N = 2;
  const hf = new Uint16Array(K * N);
  for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) hf[k * N + n] = bits[n * K + k]!;
  const w: Bf16Boxes = {
    name: 'model.layers.0.mlp.experts.down_proj',
    dtype: 'BF16',
    shape: [1, K, N],
    produce: async (box, out) => {
      const o16 = new Uint16Array(out.buffer, out.byteOffset, out.byteLength / 2);
      const [, k0, n0] = box.start as [number, number, number];
      const [, kn, nn] = box.size as [number, number, number];
      for (let k = 0; k < kn; k++) for (let n = 0; n < nn; n++) o16[k * nn + n] = hf[(k0 + k) * N + n0 + n]!;
    },
  };
  const pair = mxfp4Pair(w);
  await assert.rejects(pair.scales(wholeBox(pair.scalesShape), new Uint8Array(2)), /down_proj: \[0, 5, 1\] is not finite; MXFP4 cannot encode it/);
});

test('MXFP4 → bf16 → MXFP4: only blocks whose largest code is ±3 (or all-zero blocks) change bytes, and never a value', async (t) => {
  // Hub-like blocks: random nibbles and scales, plus blocks built to have max code 3 or to be zero.
  const E = 2;
  const R = 48;
  const G = 12;
  let seed = 7;
  const rnd = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) & 0xff;
  const blocks = new Uint8Array(E * R * G * 16);
  const scales = new Uint8Array(E * R * G);
  for (let b = 0; b < E * R * G; b++) {
    scales[b] = 100 + (rnd() % 50);
    const kind = b % 7;
    for (let j = 0; j < 16; j++) {
      let byte = rnd();
      if (kind === 3) byte = (byte & 0x55) | 0x05; // codes ≤ 5 (3.0): scale one too high for the rounding-up rule
      if (kind === 5) byte = rnd() & 0x88; // ±0 only
      blocks[b * 16 + j] = byte;
    }
  }
  const dir = await mkdtemp(join(tmpdir(), 'ss-mxq-'));
  try {
    const header = JSON.stringify({ w_blocks: { dtype: 'U8', shape: [E, R, G, 16], data_offsets: [0, blocks.length] }, w_scales: { dtype: 'U8', shape: [E, R, G], data_offsets: [blocks.length, blocks.length + scales.length] } });
    const h = Buffer.from(header.padEnd(Math.ceil(header.length / 8) * 8, ' '));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(h.length));
    await writeFile(join(dir, 'm.safetensors'), Buffer.concat([len, h, blocks, scales]));
    const src = withMxfp4Dequantized(await openCheckpoint(join(dir, 'm.safetensors')));
    try {
      const w = src.tensors.get('w')!;
      const deq = await whole(w);
      const pair = mxfp4Pair(boxes(w));
      const b2 = new Uint8Array(blocks.length);
      const s2 = new Uint8Array(scales.length);
      await pair.blocks(wholeBox(pair.blocksShape), b2);
      await pair.scales(wholeBox(pair.scalesShape), s2);
      const counts = { same: 0, maxCode3: 0, zero: 0, other: 0 };
      for (let b = 0; b < E * R * G; b++) {
        const a = blocks.subarray(b * 16, b * 16 + 16);
        const c = b2.subarray(b * 16, b * 16 + 16);
        if (s2[b] === scales[b] && a.every((x, i) => x === c[i])) counts.same++;
        else {
          let maxCode = 0;
          for (const x of a) maxCode = Math.max(maxCode, x & 7, (x >> 4) & 7);
          if (maxCode === 0) counts.zero++;
          else if (maxCode <= 5) counts.maxCode3++;
          else counts.other++;
        }
      }
      t.diagnostic(`${E * R * G} blocks: ${counts.same} identical, ${counts.maxCode3} with largest |code| ≤ 3.0 re-scaled (same values), ${counts.zero} all-zero (scale byte 0), ${counts.other} other`);
      assert.equal(counts.other, 0);
      assert.ok(counts.maxCode3 > 0 && counts.zero > 0 && counts.same > 0);
      // The re-quantized tensor dequantises to exactly the same bf16 values.
      await writeFile(join(dir, 'm.safetensors'), Buffer.concat([len, h, b2, s2]));
      const back = withMxfp4Dequantized(await openCheckpoint(join(dir, 'm.safetensors')));
      try {
        assert.ok(Buffer.from(await whole(back.tensors.get('w')!)).equals(Buffer.from(deq)), 'values changed');
      } finally {
        await back.close();
      }
    } finally {
      await src.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
