/**
 * What a checkpoint holds, without reading tensor data: format, tensors, bytes, dtypes, the
 * non-tensor entries and the side files.
 */
import { openCheckpoint, type FormatName } from '../checkpoints/registry.js';
import { describe } from '../pickle/values.js';
import { toPlain } from '../pickle/index.js';

export interface InspectReport {
  readonly path: string;
  readonly format: FormatName;
  readonly tensorCount: number;
  readonly totalBytes: number;
  readonly dtypes: Record<string, { tensors: number; bytes: number }>;
  readonly dataFiles: readonly string[];
  readonly sideFiles: readonly string[];
  readonly metadata: Record<string, string>;
  readonly objects: ReadonlyArray<{ name: string; value: unknown; summary: string }>;
  readonly tensors: ReadonlyArray<{ name: string; dtype: string; shape: readonly number[]; bytes: number; where: string }>;
}

export async function inspectCheckpoint(path: string, format?: FormatName): Promise<InspectReport> {
  const src = await openCheckpoint(path, format);
  try {
    const dtypes: Record<string, { tensors: number; bytes: number }> = {};
    let total = 0;
    const tensors = [...src.tensors.values()].map((t) => {
      const h = (dtypes[t.dtype] ??= { tensors: 0, bytes: 0 });
      h.tensors++;
      h.bytes += t.byteLength;
      total += t.byteLength;
      return { name: t.name, dtype: t.dtype, shape: t.shape, bytes: t.byteLength, where: t.where };
    });
    return {
      path,
      format: src.format,
      tensorCount: tensors.length,
      totalBytes: total,
      dtypes,
      dataFiles: src.dataFiles,
      sideFiles: src.sideFiles,
      metadata: Object.fromEntries(src.metadata),
      objects: [...src.objects.values()].map((o) => ({ name: o.name, value: toPlain(o.value), summary: describe(o.value) })),
      tensors,
    };
  } finally {
    await src.close();
  }
}
