/**
 * Target tensors as expressions over source tensors — nothing is read until the executor asks
 * for a box. Every layout move the model maps need is a *row concatenation*: the target's rows
 * (dim 0) are a sequence of segments, each a run of rows of a source tensor (optionally at a fixed
 * leading index, e.g. layer i of a stacked `[L, …]` Megatron tensor) or rows of zeros. QKV
 * interleaving per query group, gate/up fusion, vocab padding, splitting fused tensors back, and
 * TP slicing along dim 0 are all such concatenations; casts wrap any target as their own node.
 */
import { byteLength, dtypeInfo, numelOf, type DType } from '../tensor/dtype.js';
import { canCast, castBytes } from '../tensor/cast.js';
import type { Box } from '../tensor/layout.js';
import type { CastTensor, ProducedTensor, SourceTensor, TargetTensor } from './types.js';
import { badInput, unsupported } from '../util/errors.js';
import { giveScratch, takeScratch } from './scratch.js';

/** A run of rows taken from a source tensor, or zero rows. */
export type RowSegment =
  | {
      readonly kind: 'rows';
      readonly src: SourceTensor;
      /** Fixed indices of the source's leading dims before its row dim (e.g. [layer]). */
      readonly prefix: readonly number[];
      readonly start: number;
      readonly count: number;
    }
  | { readonly kind: 'zeros'; readonly count: number };

export function rows(src: SourceTensor, start: number, count: number, prefix: readonly number[] = []): RowSegment {
  return { kind: 'rows', src, prefix, start, count };
}

export function zeroRows(count: number): RowSegment {
  return { kind: 'zeros', count };
}

/** All rows of `src` (at `prefix`). */
export function allRows(src: SourceTensor, prefix: readonly number[] = []): RowSegment {
  return rows(src, 0, src.shape[prefix.length] ?? 1, prefix);
}

/**
 * A target whose rows are the concatenation of `segments`; its trailing dims (`rest`) must equal
 * each source's dims after the row dim. A 1-D target has rows of one element and `rest = []`.
 */
export function rowConcat(name: string, dtype: DType, rest: readonly number[], segments: readonly RowSegment[], describe: string): TargetTensor {
  let total = 0;
  for (const s of segments) {
    if (s.kind === 'rows') {
      const srcRest = s.src.shape.slice(s.prefix.length + 1);
      if (s.src.dtype !== dtype) throw badInput(`${name}: source ${s.src.name} is ${s.src.dtype}, expected ${dtype}`, undefined, s.src.name);
      if (srcRest.length !== rest.length || srcRest.some((d, i) => d !== rest[i])) {
        throw badInput(`${name}: source ${s.src.name} has shape [${s.src.shape.join(', ')}], expected rows of [${rest.join(', ')}]`, undefined, s.src.name);
      }
      const rowDim = s.src.shape[s.prefix.length];
      if (rowDim === undefined || s.start < 0 || s.start + s.count > rowDim) {
        throw badInput(`${name}: needs rows ${s.start}..${s.start + s.count} of ${s.src.name} (shape [${s.src.shape.join(', ')}])`, undefined, s.src.name);
      }
      s.prefix.forEach((p, i) => {
        if (p < 0 || p >= s.src.shape[i]!) throw badInput(`${name}: index ${p} out of range for dim ${i} of ${s.src.name}`, undefined, s.src.name);
      });
    }
    total += s.count;
  }
  const shape = [total, ...rest];
  const bits = dtypeInfo(dtype).bits;
  return {
    kind: 'produced',
    name,
    dtype,
    shape,
    byteLength: byteLength(dtype, numelOf(shape)),
    describe,
    produce: async (box: Box, out: Uint8Array) => {
      const a = box.start[0]!;
      const n = box.size[0]!;
      const restStart = box.start.slice(1);
      const restSize = box.size.slice(1);
      const boxRowBytes = (numelOf(restSize) * bits) / 8;
      let at = 0; // first target row of the current segment
      const reads: Array<Promise<void>> = [];
      for (const s of segments) {
        const lo = Math.max(a, at);
        const hi = Math.min(a + n, at + s.count);
        if (lo < hi) {
          const dst = out.subarray((lo - a) * boxRowBytes, (hi - a) * boxRowBytes);
          if (s.kind === 'zeros') dst.fill(0);
          else {
            const srcBox: Box = {
              start: [...s.prefix, s.start + (lo - at), ...restStart],
              size: [...s.prefix.map(() => 1), hi - lo, ...restSize],
            };
            reads.push(s.src.read(srcBox, dst));
          }
        }
        at += s.count;
        if (at >= a + n) break;
      }
      await Promise.all(reads);
    },
  };
}

/** A whole source tensor (or the sub-tensor at `prefix`) as a target, optionally renamed. */
export function copyOf(name: string, src: SourceTensor, prefix: readonly number[] = []): TargetTensor {
  const shape = src.shape.slice(prefix.length);
  if (shape.length === 0) {
    // A 0-dim tensor (or a scalar slot of a stacked 1-D tensor) has no row dim to concatenate.
    return {
      kind: 'produced',
      name,
      dtype: src.dtype,
      shape,
      byteLength: src.byteLength / (prefix.length ? numelOf(src.shape.slice(0, prefix.length)) : 1),
      describe: `${src.name}${prefix.length ? `[${prefix.join(', ')}]` : ''}`,
      produce: (_box, out) => src.read({ start: [...prefix], size: prefix.map(() => 1) }, out),
    };
  }
  return rowConcat(name, src.dtype, shape.slice(1), [allRows(src, prefix)], `${src.name}${prefix.length ? `[${prefix.join(', ')}]` : ''}`);
}

/**
 * `t` cast to `to` (torch's rounding); `t` itself when the dtype already matches. The executor
 * casts a cast node in its own arena, on the worker pool; `produceBox` (used outside the
 * executor) stages the source bytes in a reused temporary.
 */
export function castTo(t: TargetTensor, to: DType): TargetTensor {
  if (t.dtype === to) return t;
  if (!canCast(t.dtype, to)) throw unsupported(`tensor ${t.name}: casting ${t.dtype} to ${to} is not supported`, undefined, t.name);
  // A cast of a cast is one cast from the innermost bytes only where that rounds the same: it
  // does not in general (f32 → bf16 → f16), so the nodes nest.
  const cast: CastTensor = { kind: 'cast', name: t.name, dtype: to, shape: t.shape, byteLength: byteLength(to, numelOf(t.shape)), describe: `cast(${t.dtype}→${to}) ${t.describe}`, inner: t };
  return cast;
}

/** Produces `box` of any target node as contiguous C-order bytes into `out`. */
export async function produceBox(t: TargetTensor, box: Box, out: Uint8Array): Promise<void> {
  switch (t.kind) {
    case 'produced':
      return t.produce(box, out);
    case 'cast': {
      const tmp = takeScratch((numelOf(box.size) * dtypeInfo(t.inner.dtype).bits) / 8);
      try {
        await produceBox(t.inner, box, tmp);
        castBytes(tmp, t.inner.dtype, t.dtype, out);
      } finally {
        giveScratch(tmp);
      }
      return;
    }
  }
}

/** `t` as a node that produces its own boxes (a cast becomes one that casts through a temporary). */
export function asProduced(t: TargetTensor): ProducedTensor {
  if (t.kind === 'produced') return t;
  return { kind: 'produced', name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, describe: t.describe, produce: (b, o) => produceBox(t, b, o) };
}
