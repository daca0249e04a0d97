// The reference forward's matmul kernel (WebAssembly SIMD) against its plain-JS statement, for
// every weight dtype it takes, ragged K (not a multiple of the 16-element step or the 8-element
// bf16 widening), and through the worker pool (bit-identical to inline).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { matmulRowsJs } from '../../src/tensor/matmul.js';
import { matmulWasm } from '../../src/tensor/matmul-kernel.js';
import { matmulRows, sharedF32 } from '../../src/tensor/matmul-pool.js';
import { castBytes } from '../../src/tensor/cast.js';
import { workerTuning } from '../../src/tensor/pool.js';
import type { DType } from '../../src/tensor/dtype.js';

function rand(n: number, seed: number): Float32Array {
  let s = seed >>> 0 || 1;
  return Float32Array.from({ length: n }, () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 31 - 1;
  });
}

function rowsIn(w: Float32Array, dtype: DType): { raw: Uint8Array; f32: Float32Array } {
  const raw = castBytes(new Uint8Array(w.buffer, w.byteOffset, w.byteLength), 'F32', dtype);
  const back = castBytes(raw, dtype, 'F32');
  return { raw, f32: new Float32Array(back.buffer, back.byteOffset, back.byteLength / 4) };
}

test('matmulWasm equals the JS statement (relative 1e-5) for F32, BF16, F16 and ragged K', () => {
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 9 }), fc.integer({ min: 1, max: 70 }), fc.integer({ min: 1, max: 33 }), fc.constantFrom<DType>('F32', 'BF16', 'F16'), fc.integer(), (T, K, N, dtype, seed) => {
      const x = rand(T * K, seed);
      const { raw, f32 } = rowsIn(rand(N * K, seed + 1), dtype);
      const want = new Float32Array(T * N);
      matmulRowsJs(x, T, K, f32, N, want, N, 0);
      const got = new Float32Array(T * (N + 3));
      matmulWasm(x, T, K, raw, dtype, N, got, N + 3, 2);
      for (let t = 0; t < T; t++) {
        for (let n = 0; n < N; n++) {
          const a = want[t * N + n]!;
          const b = got[t * (N + 3) + 2 + n]!;
          assert.ok(Math.abs(a - b) <= 1e-5 * Math.max(1, Math.sqrt(K)), `T ${T} K ${K} N ${N} ${dtype} [${t}, ${n}]: ${a} vs ${b}`);
        }
      }
    }),
    { numRuns: 200 },
  );
});

test('the pool path (shared operands, 2 worker shares of 150 rows: 2 tail rows each) gives the same bits as the inline kernel, and so does any split into blocks', async () => {
  const [T, K, N] = [8, 1024, 300];
  const x = rand(T * K, 3);
  const { raw } = rowsIn(rand(N * K, 4), 'BF16');
  const inline = new Float32Array(T * N);
  matmulWasm(x, T, K, raw, 'BF16', N, inline, N, 0);
  // Split at an odd row: each part ends in rows outside a group of four.
  const split = new Float32Array(T * N);
  matmulWasm(x, T, K, raw.subarray(0, 2 * 7 * K), 'BF16', 7, split, N, 0);
  matmulWasm(x, T, K, raw.subarray(2 * 7 * K), 'BF16', N - 7, split, N, 7);
  assert.deepEqual(split, inline);
  const saved = workerTuning.castThreads;
  workerTuning.castThreads = 2;
  try {
    const xs = sharedF32(T * K);
    xs.set(x);
    const ws = new Uint8Array(new SharedArrayBuffer(raw.byteLength));
    ws.set(raw);
    const pooled = sharedF32(T * N);
    await matmulRows(xs, T, K, ws, 'BF16', N, pooled, N, 0);
    assert.deepEqual(Float32Array.from(pooled), inline);
  } finally {
    workerTuning.castThreads = saved;
  }
});
