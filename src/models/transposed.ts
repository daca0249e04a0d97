/**
 * Layout moves that swap a weight's rows and columns (HF checkpoints that store experts
 * input-major: GPT-OSS's fused `gate_up_proj` / `down_proj`, Qwen3-VL-MoE's), written by hand
 * because they are the mapping kernel itself: a lazy target that reads only the source rectangle
 * each output box needs, a bounded slice at a time.
 */
import { unsupported } from '../util/errors.js';
import type { TargetTensor } from '../lazy/types.js';
import type { Box } from '../tensor/layout.js';
import { byteLength, itemSize, numelOf } from '../tensor/dtype.js';
import type { CustomKind, SourcePart } from './spec.js';

/** Copies element `from` of `src` to element `to` of `dst` (both `k`-byte items). */
export function copyItem(src: Uint8Array, from: number, dst: Uint8Array, to: number, k: number): void {
  for (let b = 0; b < k; b++) dst[to * k + b] = src[from * k + b]!;
}

/** Staging per slice of a transposing move (see `swapped`). */
const SLICE_BYTES = 4 << 20;

/**
 * A lazy 2-D target over the trailing 2-D sub-tensor of `part` with rows and columns swapped and
 * permuted: `out[r, c] = src[rowOf(c), colOf(r)]`.
 */
export function swapped(name: string, part: SourcePart, shape: readonly [number, number], rowOf: (c: number) => number, colOf: (r: number) => number, describe: string): TargetTensor {
  const t = part.src;
  const k = itemSize(t.dtype);
  if (k === undefined) throw unsupported(`${t.name}: ${t.dtype} cannot be transposed element-wise`, undefined, t.name);
  return { kind: 'produced',
    name,
    dtype: t.dtype,
    shape,
    byteLength: byteLength(t.dtype, numelOf(shape)),
    describe,
    produce: async (box: Box, out: Uint8Array) => {
      const [a, b] = box.start as [number, number];
      const [n, m] = box.size as [number, number];
      if (n === 0 || m === 0) return;
      // Only the source rectangle the box needs: rows rowOf(b … b+m), columns colOf(a … a+n). The
      // whole source row range would make every row box of a transposed expert read the expert
      // again (and a lazy MXFP4 source dequantise it again): quadratic time, memory of a tensor.
      const span = (lo0: number, len: number, f: (x: number) => number): [number, number] => {
        let lo = Infinity;
        let hi = -1;
        for (let x = lo0; x < lo0 + len; x++) {
          lo = Math.min(lo, f(x));
          hi = Math.max(hi, f(x));
        }
        return [lo, hi - lo + 1];
      };
      const [c0, cn] = span(a, n, colOf);
      // Target columns are taken a slice at a time so that the staging buffer stays small
      // (SLICE_BYTES, not the box: the executor has several boxes in flight and counts only their
      // outputs); the source rows a slice needs are read as runs of consecutive rows — for the
      // [gate; up] ↔ interleaved moves, two runs.
      const ms = Math.max(1, Math.min(m, Math.floor(SLICE_BYTES / (cn * k))));
      const buf = new Uint8Array(ms * cn * k);
      const order = new Int32Array(ms);
      const bufRow = new Int32Array(ms);
      const wide = k === 2 || k === 4;
      const d = wide && out.byteOffset % k === 0 ? (k === 2 ? new Uint16Array(out.buffer, out.byteOffset, n * m) : new Uint32Array(out.buffer, out.byteOffset, n * m)) : undefined;
      const s = d && k === 2 ? new Uint16Array(buf.buffer) : d ? new Uint32Array(buf.buffer) : undefined;
      for (let cs = b; cs < b + m; cs += ms) {
        const mm = Math.min(ms, b + m - cs);
        for (let j = 0; j < mm; j++) order[j] = j;
        const sorted = order.subarray(0, mm).sort((x, y) => rowOf(cs + x) - rowOf(cs + y));
        let i = 0;
        while (i < mm) {
          let j = i;
          while (j + 1 < mm && rowOf(cs + sorted[j + 1]!) === rowOf(cs + sorted[j]!) + 1) j++;
          const r0 = rowOf(cs + sorted[i]!);
          await t.read({ start: [...part.prefix, r0, c0], size: [...part.prefix.map(() => 1), j - i + 1, cn] }, buf.subarray(i * cn * k, (j + 1) * cn * k));
          for (let x = i; x <= j; x++) bufRow[sorted[x]!] = x;
          i = j + 1;
        }
        for (let r = 0; r < n; r++) {
          const col = colOf(a + r) - c0;
          const o = r * m + (cs - b);
          if (d && s) for (let c = 0; c < mm; c++) d[o + c] = s[bufRow[c]! * cn + col]!;
          else for (let c = 0; c < mm; c++) copyItem(buf, bufRow[c]! * cn + col, out, o + c, k);
        }
      }
    },
  };
}

const id = (x: number): number => x;
/** A source part as plans describe it: `name`, or `name[e]` for expert e of a stacked tensor. */
export const partName = (p: SourcePart): string => (p.prefix.length ? `${p.src.name}[${p.prefix.join(', ')}]` : p.src.name);

/**
 * A plain transpose between a stacked HF expert slice and its Megatron weight: HF `[in, out]` ↔
 * Megatron `[out, in]` (Qwen3-VL-MoE's `gate_up_proj[e]` [H, 2F] ↔ `linear_fc1` [2F, H] = [gate; up],
 * its columns' halves being gate and up; `down_proj[e]` [F, H] ↔ `linear_fc2` [H, F]).
 */
export const TRANSPOSE: CustomKind = {
  id: 'transpose',
  toMegatron: (name, [p], shape) => swapped(name, p!, [shape[0]!, shape[1]!], id, id, `transpose(${partName(p!)})`),
  toHf: ([name], src, [shape]) => [swapped(name!, src, [shape![0]!, shape![1]!], id, id, `transpose(${partName(src)})`)],
};
