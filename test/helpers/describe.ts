/** The TS side of the oracle's `describe`: per tensor dtype, shape and SHA-256 of its C-order bytes. */
import { createHash } from 'node:crypto';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import type { CheckpointSource, FormatName } from '../../src/formats/types.js';
import { wholeBox } from '../../src/tensor/layout.js';

export interface TensorDigest {
  dtype: string;
  shape: number[];
  sha256: string;
}

export async function digestSource(src: CheckpointSource): Promise<Record<string, TensorDigest>> {
  const out: Record<string, TensorDigest> = {};
  for (const t of src.tensors.values()) {
    const buf = new Uint8Array(t.byteLength);
    await t.read(wholeBox(t.shape), buf);
    out[t.name] = { dtype: t.dtype, shape: [...t.shape], sha256: createHash('sha256').update(buf).digest('hex') };
  }
  return out;
}

export async function digestPath(path: string, format?: FormatName): Promise<Record<string, TensorDigest>> {
  const src = await openCheckpoint(path, format);
  try {
    return await digestSource(src);
  } finally {
    await src.close();
  }
}

/** Sorted-key copy so deepEqual failures read well. */
export function sortKeys<T>(o: Record<string, T>): Record<string, T> {
  return Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : 1)));
}
