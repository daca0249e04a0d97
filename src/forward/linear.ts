/**
 * `y = x · Wᵀ` for a weight matrix read from the checkpoint in row blocks: each block is read while
 * the previous one is multiplied, so the pass runs at the pace of the slower of disk and CPU, and
 * memory holds two blocks whatever the matrix's size. The multiplications go to the worker pool
 * when it has threads (`tensor/matmul-pool.ts`), inline otherwise.
 */
import { matmulRows } from '../tensor/matmul-pool.js';
import type { WeightRef, WeightStore } from './weights.js';

/**
 * x: [T, K]. Multiplies by rows [r0, r1) of matrix `w` ([N, K]); returns [T, r1 - r0].
 */
export async function linear(store: WeightStore, w: WeightRef, x: Float32Array, T: number, range?: readonly [number, number]): Promise<Float32Array> {
  const [N, K] = store.shape(w) as [number, number];
  if (x.length !== T * K) throw new Error(`internal: ${w.name} takes ${K} inputs, activations have ${x.length / T}`);
  const [r0, r1] = range ?? [0, N];
  const n = r1 - r0;
  const out = new Float32Array(T * n);
  const per = store.rowsPerBlock(K);
  const blocks: Array<[number, number]> = [];
  for (let s = r0; s < r1; s += per) blocks.push([s, Math.min(r1, s + per)]);
  let next = blocks.length ? store.rows(w, blocks[0]![0], blocks[0]![1] - blocks[0]![0]) : undefined;
  const pending: Array<Promise<void>> = [];
  for (let b = 0; b < blocks.length; b++) {
    const [s, e] = blocks[b]!;
    const rows = await next!;
    next = b + 1 < blocks.length ? store.rows(w, blocks[b + 1]![0], blocks[b + 1]![1] - blocks[b + 1]![0]) : undefined;
    pending.push(matmulRows(x, T, K, rows, e - s, out, n, s - r0));
    // At most two blocks in flight on the pool beside the one being read.
    if (pending.length >= 2) await pending.shift();
  }
  await Promise.all(pending);
  return out;
}
