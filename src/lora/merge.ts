/**
 * LoRA merge targets: lazy tensors whose every box is the base's box plus the LoRA delta for it,
 * computed with the rounding peft 0.21 + torch 2.13 use on CPU, so the merged bytes equal
 * `PeftModel.from_pretrained(base, adapter).merge_and_unload()`'s.
 *
 * What peft does (`tuners/lora/layer.py`, `variants.py`, `dora.py`; the dtypes come from
 * `PeftModel.from_pretrained`'s default `autocast_adapter_dtype=True`, which upcasts every bf16/fp16
 * adapter parameter to fp32 after moving it to the base layer's dtype):
 *
 * - Linear (`Linear.get_delta_weight` + `merge`): ΔW = transpose(B @ A, fan_in_fan_out) × scaling in
 *   fp32 (B @ A an MKL sgemm: FMA chains over the rank, see fp32.ts; × scaling with the Python
 *   float rounded to fp32), then `base.weight.data += ΔW`: the in-place add promotes to fp32 and
 *   rounds once to the base dtype. `merge_and_unload(safe_merge=True)` (and adapters kept in the
 *   base dtype) round ΔW to the base dtype first (`roundDelta`).
 * - Embedding (`Embedding.get_delta_weight` + `merge`): ΔW = (B_e @ A_e)ᵀ × scaling in fp32,
 *   `.to(base dtype)`, then added (fp32 add of the two, rounded to the base dtype).
 * - DoRA on a Linear (`DoraLinearVariant.merge_unsafe`): V = W + ΔW (fp32);
 *   norm = ‖transpose(V, fan_in_fan_out)‖₂ per output feature (torch.linalg.norm, fp32);
 *   W' = (magnitude / norm) · V, rounded to the base dtype. The norm's summation order is torch's:
 *   for a row-major V (no fan_in_fan_out) the vectorised last-dim kernel (8 fp32 lanes, mul then
 *   add, lanes folded left to right, remainder added one by one, sqrt); for fan_in_fan_out
 *   (reduction over a strided dim) one sequential sum per output feature.
 * - lora_bias: bias' = bias + lora_B.bias × scaling (fp32), rounded to the base dtype.
 *
 * Memory: one box of the base (the executor's chunk) plus the module's LoRA factors as fp32, kept
 * while the tensor is produced. DoRA with fan_in_fan_out needs the per-column norms before the first
 * row, so it streams the tensor once more beforehand (same chunking).
 */
import type { TargetTensor } from '../lazy/types.js';
import type { LoraModuleTensors } from '../formats/peft.js';
import { wholeBox, type Box } from '../tensor/layout.js';
import { byteLength, numelOf, type DType } from '../tensor/dtype.js';
import { fromF32, mklBlock, roundThrough, toF32 } from '../tensor/fp32.js';
import { deltaBlock, runLoraMerge, type FactorMatrices, type LoraMergeTask } from '../tensor/lora-merge-task.js';
import { poolThreads, runOnPool } from '../tensor/pool.js';
import { fmaKernelChoice } from '../tensor/fma-kernel.js';
import { produceBox } from '../lazy/expr.js';

/** How the delta is rounded (see the module comment). */
export interface MergeRounding {
  /** Round ΔW to the base dtype before adding (peft's safe_merge; always for embeddings). */
  readonly roundDelta: boolean;
  /** Round the adapter's A and B to this dtype first (adapters loaded without autocast). */
  readonly factorDtype?: DType;
}

async function readAll(t: { shape: readonly number[]; byteLength: number; dtype: DType; read(b: Box, o: Uint8Array): Promise<void> }): Promise<Float32Array> {
  const buf = new Uint8Array(t.byteLength);
  await t.read(wholeBox(t.shape), buf);
  return toF32(buf, t.dtype);
}

/** A Float64Array on a SharedArrayBuffer (posted to pool workers without a copy). */
function sharedF64(n: number): Float64Array {
  return new Float64Array(new SharedArrayBuffer(n * 8));
}

/**
 * Loads a module's factors as the X and Y of W[R, C] = Σ_k X[R, k]·Y[k, C]: for `out-in`
 * (W[o, i], nn.Linear) X = B, Y = A; for `in-out` (W[i, o]) X = Aᵀ, Y = Bᵀ.
 */
export async function loadFactors(m: LoraModuleTensors, layout: WeightLayout, factorDtype?: DType): Promise<FactorMatrices> {
  const [a, b] = await Promise.all([readAll(m.a), readAll(m.b)]);
  if (factorDtype) {
    roundThrough(a, factorDtype);
    roundThrough(b, factorDtype);
  }
  const r = m.a.shape[0]!;
  const na = m.a.shape[1]!;
  const nb = m.b.shape[0]!;
  const kc = mklBlock(r);
  if (layout === 'out-in') {
    const x = sharedF64(nb * r);
    x.set(b);
    const y = sharedF64(r * na);
    y.set(a);
    return { r, kc, x, y, cols: na };
  }
  const x = sharedF64(na * r);
  for (let k = 0; k < r; k++) for (let j = 0; j < na; j++) x[j * r + k] = a[k * na + j]!;
  const y = sharedF64(r * nb);
  for (let o = 0; o < nb; o++) for (let k = 0; k < r; k++) y[k * nb + o] = b[o * r + k]!;
  return { r, kc, x, y, cols: nb };
}

/** A value computed on first use and dropped once the tensor has been fully produced. */
class Memo<T> {
  private p: Promise<T> | undefined;
  private done = 0;
  constructor(
    private readonly make: () => Promise<T>,
    private readonly total: number,
  ) {}
  get(): Promise<T> {
    return (this.p ??= this.make());
  }
  /** Counts produced elements; frees the value when all are done. */
  used(n: number): void {
    this.done += n;
    if (this.done >= this.total) {
      this.p = undefined;
      this.done = 0;
    }
  }
}

/**
 * How the base weight's axes relate to B and A: `out-in` — W[o, i] (nn.Linear); `in-out` —
 * W[i, o] (fan_in_fan_out: GPT-2 Conv1D; and embeddings, whose W[v, d] = (B_e A_e)ᵀ[v, d]).
 */
export type WeightLayout = 'out-in' | 'in-out';

export interface WeightMergeSpec {
  readonly name: string;
  /** The base weight (or its replacement from the adapter), already in the output dtype. */
  readonly base: TargetTensor;
  readonly module: LoraModuleTensors;
  readonly layout: WeightLayout;
  readonly scaling: number;
  readonly rounding: MergeRounding;
  /** DoRA magnitude tensor (Linear only). */
  readonly dora?: boolean;
  /** Text for plans (what the bytes are made from). */
  readonly describe: string;
}

/** sqrt(Σ v²) of one row as torch's vectorised last-dim norm kernel sums it (fp32, 8 lanes). */
export function laneNorm(v: Float32Array, off: number, n: number): number {
  let a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
  const f = Math.fround;
  let d = 0;
  for (; d + 8 <= n; d += 8) {
    const p = off + d;
    const x0 = v[p]!, x1 = v[p + 1]!, x2 = v[p + 2]!, x3 = v[p + 3]!, x4 = v[p + 4]!, x5 = v[p + 5]!, x6 = v[p + 6]!, x7 = v[p + 7]!;
    a0 = f(a0 + f(x0 * x0));
    a1 = f(a1 + f(x1 * x1));
    a2 = f(a2 + f(x2 * x2));
    a3 = f(a3 + f(x3 * x3));
    a4 = f(a4 + f(x4 * x4));
    a5 = f(a5 + f(x5 * x5));
    a6 = f(a6 + f(x6 * x6));
    a7 = f(a7 + f(x7 * x7));
  }
  let s = f(f(f(f(f(f(f(a0 + a1) + a2) + a3) + a4) + a5) + a6) + a7);
  for (; d < n; d++) {
    const x = v[off + d]!;
    s = f(s + f(x * x));
  }
  return f(Math.sqrt(s));
}

/** Boxes at least this many elements are merged on the worker pool (smaller ones inline). */
const POOL_MIN_ELEMENTS = 1 << 16;

/** A merged weight: base + LoRA delta (or DoRA), box by box. */
export function mergedWeight(spec: WeightMergeSpec): TargetTensor {
  const { base, module: m, layout } = spec;
  const dtype = base.dtype;
  const [rows, cols] = base.shape as [number, number];
  const s32 = Math.fround(spec.scaling);
  const total = rows * cols;
  const factors = new Memo(() => loadFactors(m, layout, spec.rounding.factorDtype), total);
  const magnitude = spec.dora && m.magnitude ? new Memo(() => readAll(m.magnitude!), total) : undefined;
  // Per output-feature DoRA norms computed in a pass of their own (fan_in_fan_out, or rows wider than a box).
  let norms: Promise<Float32Array> | undefined;

  /** V = W + ΔW in fp32 for a block (DoRA: ΔW is never rounded first). */
  const vBlock = async (f: FactorMatrices, box: Box): Promise<Float32Array> => {
    const raw = new Uint8Array(byteLength(dtype, numelOf(box.size)));
    await produceBox(base, box, raw);
    const w = toF32(raw, dtype);
    const d = deltaBlock(f, box.start[0]!, box.size[0]!, box.start[1]!, box.size[1]!, s32);
    for (let k = 0; k < w.length; k++) w[k] = Math.fround(w[k]! + d[k]!);
    return w;
  };

  /** DoRA norms per output feature, from a full pass over the tensor in row blocks. */
  const computeNorms = async (): Promise<Float32Array> => {
    const f = await factors.get();
    const rowBytes = byteLength('F32', cols);
    const step = Math.max(1, Math.floor((4 << 20) / rowBytes));
    if (layout === 'out-in') {
      const out = new Float32Array(rows);
      for (let a = 0; a < rows; a += step) {
        const n = Math.min(step, rows - a);
        const v = await vBlock(f, { start: [a, 0], size: [n, cols] });
        for (let i = 0; i < n; i++) out[a + i] = laneNorm(v, i * cols, cols);
      }
      return out;
    }
    // fan_in_fan_out: one norm per column, summed over rows in order (torch's strided reduction).
    const acc = new Float32Array(cols);
    for (let a = 0; a < rows; a += step) {
      const n = Math.min(step, rows - a);
      const v = await vBlock(f, { start: [a, 0], size: [n, cols] });
      for (let i = 0; i < n; i++) {
        for (let j = 0; j < cols; j++) {
          const x = v[i * cols + j]!;
          acc[j] = Math.fround(acc[j]! + Math.fround(x * x));
        }
      }
    }
    for (let j = 0; j < cols; j++) acc[j] = Math.fround(Math.sqrt(acc[j]!));
    return acc;
  };

  /** Plain LoRA: the base box into `out`, then merged in place — on the pool when it pays. */
  const mergeBox = async (f: FactorMatrices, box: Box, out: Uint8Array): Promise<void> => {
    const [r0, n] = [box.start[0]!, box.size[0]!];
    const [c0, w] = [box.start[1]!, box.size[1]!];
    const shared = out.buffer instanceof SharedArrayBuffer;
    const buf = shared ? out : new Uint8Array(new SharedArrayBuffer(out.length));
    await produceBox(base, box, buf);
    const task = (rr: number, nn: number): LoraMergeTask => ({
      kind: 'lora',
      buf: buf.buffer as SharedArrayBuffer,
      offset: buf.byteOffset + byteLength(dtype, (rr - r0) * w),
      dtype,
      r0: rr,
      n: nn,
      c0,
      w,
      factors: f,
      scale: s32,
      roundDelta: spec.rounding.roundDelta,
      kernel: fmaKernelChoice(),
    });
    const threads = poolThreads();
    if (threads > 0 && n * w >= POOL_MIN_ELEMENTS) {
      // Split into about two pieces per thread so a lone box still uses every core.
      const pieces = Math.min(n, threads * 2);
      const per = Math.ceil(n / pieces);
      const runs: Promise<number>[] = [];
      for (let i = 0; i < n; i += per) runs.push(runOnPool(task(r0 + i, Math.min(per, n - i))));
      // Every piece settles before the box is given back (a failed one must not leave others
      // writing into arena space the executor may reuse); then the first error is thrown.
      const settled = await Promise.allSettled(runs);
      const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
    } else runLoraMerge(task(r0, n));
    if (!shared) out.set(buf);
  };

  return { kind: 'produced',
    name: spec.name,
    dtype,
    shape: base.shape,
    byteLength: base.byteLength,
    describe: spec.describe,
    produce: async (box: Box, out: Uint8Array) => {
      const n = numelOf(box.size);
      try {
        const f = await factors.get();
        if (!magnitude) {
          await mergeBox(f, box, out);
          return;
        }
        const v = await vBlock(f, box);
        const mag = await magnitude.get();
        const [r0, nr] = [box.start[0]!, box.size[0]!];
        const [c0, nc] = [box.start[1]!, box.size[1]!];
        if (layout === 'out-in' && c0 === 0 && nc === cols) {
          for (let i = 0; i < nr; i++) {
            const fac = Math.fround(mag[r0 + i]! / laneNorm(v, i * cols, cols));
            for (let j = 0; j < cols; j++) v[i * cols + j] = Math.fround(fac * v[i * cols + j]!);
          }
        } else {
          const nv = await (norms ??= computeNorms());
          for (let i = 0; i < nr; i++) {
            for (let j = 0; j < nc; j++) {
              const feat = layout === 'out-in' ? r0 + i : c0 + j;
              const fac = Math.fround(mag[feat]! / nv[feat]!);
              v[i * nc + j] = Math.fround(fac * v[i * nc + j]!);
            }
          }
        }
        fromF32(v, dtype, out);
      } finally {
        factors.used(n);
        magnitude?.used(n);
      }
    },
  };
}

/** A bias plus lora_B.bias × scaling (lora_bias=True). */
export function mergedBias(name: string, base: TargetTensor, loraBias: TargetTensor | { read(b: Box, o: Uint8Array): Promise<void>; shape: readonly number[]; byteLength: number; dtype: DType }, scaling: number, describe: string): TargetTensor {
  const s32 = Math.fround(scaling);
  const dtype = base.dtype;
  return { kind: 'produced',
    name,
    dtype,
    shape: base.shape,
    byteLength: base.byteLength,
    describe,
    produce: async (box: Box, out: Uint8Array) => {
      const raw = new Uint8Array(byteLength(dtype, numelOf(box.size)));
      await produceBox(base, box, raw);
      const w = toF32(raw, dtype);
      const lb = new Uint8Array(byteLength(loraBias.dtype, numelOf(box.size)));
      if ('read' in loraBias) await loraBias.read(box, lb);
      else await produceBox(loraBias, box, lb);
      const d = toF32(lb, loraBias.dtype);
      for (let k = 0; k < w.length; k++) w[k] = Math.fround(w[k]! + Math.fround(d[k]! * s32));
      fromF32(w, dtype, out);
    },
  };
}
