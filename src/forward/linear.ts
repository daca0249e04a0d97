/**
 * `y = x · Wᵀ` for a weight matrix read from the checkpoint in row blocks: each block is read
 * (into one of the store's two shared read slots) while the previous one is multiplied, so the
 * pass runs at the pace of the slower of disk and CPU, and memory holds two blocks whatever the
 * matrix's size. The multiplications (WebAssembly SIMD, `tensor/matmul-kernel.ts`) go to the
 * worker pool when it has threads (`tensor/matmul-pool.ts`), inline otherwise.
 */
import { matmulRows, sharedF32 } from '../tensor/matmul-pool.js';
import type { WeightRef, WeightStore } from './weights.js';

/**
 * x: [T, K]. Multiplies by rows [r0, r1) of matrix `w` ([N, K]); returns [T, r1 - r0].
 */
export async function linear(store: WeightStore, w: WeightRef, x: Float32Array, T: number, range?: readonly [number, number]): Promise<Float32Array> {
  const [N, K] = store.shape(w) as [number, number];
  if (x.length !== T * K) throw new Error(`internal: ${w.name} takes ${K} inputs, activations have ${x.length / T}`);
  const [r0, r1] = range ?? [0, N];
  const n = r1 - r0;
  const xs = sharedF32(T * K);
  xs.set(x);
  const out = sharedF32(T * n);
  const per = store.rowsPerBlock(K);
  const blocks: Array<[number, number]> = [];
  for (let s = r0; s < r1; s += per) blocks.push([s, Math.min(r1, s + per)]);
  const read = (b: number) => store.rawRows(w, blocks[b]![0], blocks[b]![1] - blocks[b]![0], (b % 2) as 0 | 1);
  let next = blocks.length ? read(0) : undefined;
  let inFlight: Promise<void> | undefined;
  for (let b = 0; b < blocks.length; b++) {
    const [s, e] = blocks[b]!;
    const rows = await next!;
    const job = matmulRows(xs, T, K, rows.bytes, rows.dtype, e - s, out, n, s - r0);
    // Awaited below; marked handled now so a failure while the next read is pending is reported
    // through that await, not as an unhandled rejection.
    job.catch(() => undefined);
    // Block b + 1 goes into the slot block b - 1 used: wait for that multiplication first.
    await inFlight;
    inFlight = job;
    next = b + 1 < blocks.length ? read(b + 1) : undefined;
  }
  await inFlight;
  return out;
}
