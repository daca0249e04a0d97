/**
 * Views of target tensors: the same bytes under another name or shape, a slice along one dim,
 * and row concatenations of whole targets.
 *
 * Always fresh objects with exactly the fields of their node kind — never an object spread of
 * the original. A view of a cast is a cast of the view wherever the view only re-indexes (casts
 * are elementwise), so the executor still casts it in its arena on the worker pool.
 */
import { byteLength, numelOf } from '../tensor/dtype.js';
import { produceBox } from './expr.js';
import type { TargetTensor } from './types.js';
import type { Box } from '../tensor/layout.js';

export function targetView(
  t: TargetTensor,
  change: { name?: string; shape?: readonly number[]; produce?: (box: Box, out: Uint8Array) => Promise<void>; describe?: string },
): TargetTensor {
  const shape = change.shape ?? t.shape;
  const head = {
    name: change.name ?? t.name,
    dtype: t.dtype,
    shape,
    byteLength: change.shape ? byteLength(t.dtype, numelOf(shape)) : t.byteLength,
    describe: change.describe ?? t.describe,
  };
  if (change.produce) return { kind: 'produced', ...head, produce: change.produce };
  // Same bytes (renamed, or reshaped without reordering): a cast stays a cast of the renamed inner.
  if (t.kind === 'cast') return { kind: 'cast', ...head, inner: targetView(t.inner, { name: change.name, shape: change.shape }) };
  return { kind: 'produced', ...head, produce: t.produce };
}

/** `t` restricted to [start, start+size) along `dim`. */
export function sliceTarget(t: TargetTensor, dim: number, start: number, size: number): TargetTensor {
  const shape = t.shape.map((d, i) => (i === dim ? size : d));
  const head = { name: t.name, shape, describe: `${t.describe}[dim ${dim}: ${start}..${start + size}]` };
  if (t.kind === 'cast') {
    const inner = sliceTarget(t.inner, dim, start, size);
    return { kind: 'cast', ...head, dtype: t.dtype, byteLength: byteLength(t.dtype, numelOf(shape)), inner };
  }
  return {
    kind: 'produced',
    ...head,
    dtype: t.dtype,
    byteLength: byteLength(t.dtype, numelOf(shape)),
    produce: (box, out) => t.produce({ start: box.start.map((s, i) => (i === dim ? s + start : s)), size: box.size }, out),
  };
}

/** `t` with `n` leading dims of 1 (a layer's — or a layer's expert's — chunk of a stacked tensor). */
export function withLeadingOnes(t: TargetTensor, n: number): TargetTensor {
  if (n === 0) return t;
  const shape = [...Array<number>(n).fill(1), ...t.shape];
  if (t.kind === 'cast') return { kind: 'cast', name: t.name, dtype: t.dtype, shape, byteLength: t.byteLength, describe: t.describe, inner: withLeadingOnes(t.inner, n) };
  return { kind: 'produced', name: t.name, dtype: t.dtype, shape, byteLength: t.byteLength, describe: t.describe, produce: (box, out) => t.produce({ start: box.start.slice(n), size: box.size.slice(n) }, out) };
}

/** Targets stacked along dim 0 (e.g. a rank's `[gate_r; up_r]`). */
export function concatRows(name: string, parts: readonly TargetTensor[]): TargetTensor {
  const first = parts[0]!;
  const shape = [parts.reduce((n, p) => n + p.shape[0]!, 0), ...first.shape.slice(1)];
  return {
    kind: 'produced',
    name,
    dtype: first.dtype,
    shape,
    byteLength: byteLength(first.dtype, numelOf(shape)),
    describe: parts.map((p) => p.describe).join(' ; '),
    produce: async (box, out) => {
      const boxRow = byteLength(first.dtype, numelOf(box.size.slice(1)));
      let at = 0;
      const a = box.start[0]!;
      const n = box.size[0]!;
      for (const p of parts) {
        const lo = Math.max(a, at);
        const hi = Math.min(a + n, at + p.shape[0]!);
        if (lo < hi) await produceBox(p, { start: [lo - at, ...box.start.slice(1)], size: [hi - lo, ...box.size.slice(1)] }, out.subarray((lo - a) * boxRow, (hi - a) * boxRow));
        at += p.shape[0]!;
      }
    },
  };
}
