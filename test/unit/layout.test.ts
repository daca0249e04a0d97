/**
 * readBox (the gather kernel every reader uses) against a plain element-by-element reference:
 * random shapes, random tilings into chunks (DCP-like), random strided views (torch-like), random
 * boxes; plus the tiling checks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemorySource } from '../../src/io/file.js';
import { readBox, checkTiling, contiguousStrides, boxNumel, type Box, type Piece } from '../../src/tensor/layout.js';

/** Deterministic PRNG (mulberry32). */
function rng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = seed;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const int = (r: () => number, lo: number, hi: number): number => lo + Math.floor(r() * (hi - lo + 1));

/** Value of global element `flat` (as 2 bytes, little-endian). */
const val = (flat: number): [number, number] => [flat & 255, (flat >> 8) & 255];

function* indices(size: readonly number[]): Generator<number[]> {
  const n = size.reduce((a, b) => a * b, 1);
  const idx = size.map(() => 0);
  for (let e = 0; e < n; e++) {
    yield [...idx];
    for (let d = size.length - 1; d >= 0; d--) {
      if (++idx[d]! < size[d]!) break;
      idx[d] = 0;
    }
  }
}

/** Splits the shape into a grid of chunks, each stored in its own strided layout in one buffer. */
function makePieces(r: () => number, shape: number[]): Piece[] {
  const cuts = shape.map((s) => {
    const c = new Set([0, s]);
    const k = int(r, 0, 2);
    for (let i = 0; i < k; i++) c.add(int(r, 0, s));
    return [...c].sort((a, b) => a - b).filter((x, i, arr) => i === 0 || x !== arr[i - 1]);
  });
  const boxes: Box[] = [];
  const rec = (d: number, start: number[], size: number[]): void => {
    if (d === shape.length) {
      boxes.push({ start, size });
      return;
    }
    const c = cuts[d]!;
    for (let i = 0; i + 1 < c.length; i++) rec(d + 1, [...start, c[i]!], [...size, c[i + 1]! - c[i]!]);
  };
  rec(0, [], []);
  const gstrides = contiguousStrides(shape);
  const pieces: Piece[] = [];
  for (const b of boxes) {
    // A random permutation of dims (a transposed storage) plus padding and an offset.
    const order = b.size.map((_, i) => i).sort(() => r() - 0.5);
    const strides = new Array<number>(b.size.length);
    let acc = 1;
    for (let j = order.length - 1; j >= 0; j--) {
      const d = order[j]!;
      strides[d] = acc;
      acc *= b.size[d]! + (r() < 0.3 ? 1 : 0);
    }
    const offset = int(r, 0, 5);
    const storage = new Uint8Array((offset + acc + 1) * 2).fill(0xee);
    for (const li of indices(b.size)) {
      const flat = li.reduce((a, x, d) => a + (b.start[d]! + x) * gstrides[d]!, 0);
      const at = (offset + li.reduce((a, x, d) => a + x * strides[d]!, 0)) * 2;
      [storage[at], storage[at + 1]] = val(flat);
    }
    pieces.push({ box: b, file: new MemorySource(storage, 'mem'), byteOffset: offset * 2, strides });
  }
  return pieces;
}

test('readBox equals the element-by-element reference on random strided tilings', async () => {
  const r = rng(42);
  for (let iter = 0; iter < 300; iter++) {
    const nd = int(r, 0, 4);
    const shape = Array.from({ length: nd }, () => int(r, 1, 6));
    const pieces = makePieces(r, shape);
    checkTiling('t', shape, pieces.map((p) => p.box), 'mem');
    const start = shape.map((s) => int(r, 0, s - 1));
    const box: Box = { start, size: shape.map((s, d) => int(r, 1, s - start[d]!)) };
    const out = new Uint8Array(boxNumel(box) * 2);
    await readBox('t', 'BF16', shape, pieces, box, out, { maxStage: r() < 0.5 ? 0 : 1 << 20 });
    const gstrides = contiguousStrides(shape);
    let e = 0;
    for (const li of indices(box.size)) {
      const flat = li.reduce((a, x, d) => a + (box.start[d]! + x) * gstrides[d]!, 0);
      assert.deepEqual([out[e * 2], out[e * 2 + 1]], val(flat), `iter ${iter} shape [${shape}] element ${e}`);
      e++;
    }
  }
});

test('checkTiling names overlaps, gaps and out-of-range chunks', () => {
  assert.throws(() => checkTiling('w', [4], [{ start: [0], size: [3] }, { start: [2], size: [2] }], 'f'), /w: chunks at \[0\] and \[2\] overlap/);
  assert.throws(() => checkTiling('w', [4], [{ start: [0], size: [2] }], 'f'), /chunks cover 2 of the tensor's 4 elements/);
  assert.throws(() => checkTiling('w', [4], [{ start: [3], size: [2] }], 'f'), /lies outside the tensor's shape/);
});

test('sub-byte dtypes move only as whole bytes', async () => {
  const src = new MemorySource(Uint8Array.from([1, 2, 3, 4]), 'f4');
  const pieces: Piece[] = [{ box: { start: [0, 0], size: [2, 4] }, file: src, byteOffset: 0, strides: [4, 1] }];
  const out = new Uint8Array(2);
  await readBox('q', 'F4', [2, 4], pieces, { start: [1, 0], size: [1, 4] }, out);
  assert.deepEqual([...out], [3, 4]);
  await assert.rejects(readBox('q', 'F4', [2, 4], pieces, { start: [0, 1], size: [1, 2] }, out), /only whole rows|split a byte/);
});
