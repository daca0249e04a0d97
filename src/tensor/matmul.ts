/**
 * The reference forward pass's one heavy kernel: `out[t, n] = Σ_k x[t, k] · w[n, k]` for a block
 * of weight rows against every prompt position at once (so each weight row is read from memory
 * once per layer, whatever the number of positions). Accumulates in float64 (JS numbers), so the
 * result is at least as accurate as torch's fp32 GEMM it is compared with; the WASM SIMD kernel
 * (`matmul-kernel.ts`) is the fast path with four fp32 lanes and a float64 final sum.
 */

/**
 * x: [T, K] row-major; w: [N, K] row-major (N rows of this block); out[t * outStride + outCol + n].
 */
export function matmulRowsJs(x: Float32Array, T: number, K: number, w: Float32Array, N: number, out: Float32Array, outStride: number, outCol: number): void {
  for (let n = 0; n < N; n++) {
    const wo = n * K;
    for (let t = 0; t < T; t++) {
      const xo = t * K;
      let a0 = 0;
      let a1 = 0;
      let a2 = 0;
      let a3 = 0;
      let k = 0;
      for (; k + 4 <= K; k += 4) {
        a0 += x[xo + k]! * w[wo + k]!;
        a1 += x[xo + k + 1]! * w[wo + k + 1]!;
        a2 += x[xo + k + 2]! * w[wo + k + 2]!;
        a3 += x[xo + k + 3]! * w[wo + k + 3]!;
      }
      for (; k < K; k++) a0 += x[xo + k]! * w[wo + k]!;
      out[t * outStride + outCol + n] = a0 + a1 + (a2 + a3);
    }
  }
}
