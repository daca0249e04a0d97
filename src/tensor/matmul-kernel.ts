/**
 * The reference forward pass's x · Wᵀ in WebAssembly SIMD (`matmul-kernel.wasm.ts`, WAT in
 * `scripts/build-wasm.mjs`): four weight rows against one position at a time, an f32x4 accumulator each, bf16 weight rows widened
 * to fp32 inside the kernel (exact: a bf16 is the high half of an fp32), other dtypes cast to fp32
 * first. One instance per thread, its memory grown to the largest block seen.
 *
 * Hand-written because the shape is narrow (a few positions against many weight rows, rows in the
 * checkpoint's own dtype) and no library does that without a native build.
 */
import { castBytes } from './cast.js';
import type { DType } from './dtype.js';
import { MATMUL_KERNEL_WASM } from './matmul-kernel.wasm.js';

// @types/node 20 does not declare WebAssembly; the little used here, typed locally.
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { exports: unknown };
};

interface MatmulExports {
  memory: { readonly buffer: ArrayBuffer; grow(pages: number): number };
  matmul(x: number, w: number, out: number, T: number, K: number, N: number, bf16: number, scratch: number): void;
}

let kernel: MatmulExports | undefined;

function instance(): MatmulExports {
  kernel ??= new WebAssembly.Instance(new WebAssembly.Module(Buffer.from(MATMUL_KERNEL_WASM, 'base64')), {}).exports as MatmulExports;
  return kernel;
}

/** Rounds up to 16 bytes (arithmetic, not bitwise: offsets may pass 2^31). */
const align = (n: number) => Math.ceil(n / 16) * 16;

/**
 * out[t * outStride + outCol + n] = Σ_k x[t, k] · w[n, k]; `w` holds N rows of K elements of
 * `dtype` as raw little-endian bytes.
 */
export function matmulWasm(x: Float32Array, T: number, K: number, w: Uint8Array, dtype: DType, N: number, out: Float32Array, outStride: number, outCol: number): void {
  let raw = w;
  let bf16 = dtype === 'BF16';
  if (dtype !== 'F32' && dtype !== 'BF16') {
    raw = castBytes(w, dtype, 'F32');
    bf16 = false;
  }
  const k = instance();
  const xOff = 0;
  const wOff = align(xOff + T * K * 4);
  const oOff = align(wOff + raw.byteLength);
  const sOff = align(oOff + T * N * 4);
  const need = sOff + (4 * K + 4) * 4;
  if (need > 4 * 2 ** 30 - 65536) throw new RangeError(`matmul block of ${need} bytes exceeds WebAssembly's 4 GiB memory (internal: blocks are capped below that)`);
  const have = k.memory.buffer.byteLength;
  if (need > have) k.memory.grow(Math.ceil((need - have) / 65536));
  const mem = k.memory.buffer;
  new Float32Array(mem, xOff, T * K).set(x.subarray(0, T * K));
  new Uint8Array(mem, wOff, raw.byteLength).set(raw);
  k.matmul(xOff, wOff, oOff, T, K, N, bf16 ? 1 : 0, sOff);
  const r = new Float32Array(k.memory.buffer, oOff, T * N);
  if (outStride === N && outCol === 0) out.set(r);
  else for (let t = 0; t < T; t++) out.set(r.subarray(t * N, (t + 1) * N), t * outStride + outCol);
}
