/**
 * The plain-JavaScript statement of the reference forward's matmul, `out[t, n] = Σ_k x[t, k] ·
 * w[n, k]` (float64 sums): what the WebAssembly kernel (`matmul-kernel.ts`) computes, kept as the
 * specification its unit test checks it against.
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
