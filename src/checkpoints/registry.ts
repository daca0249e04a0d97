/**
 * The format registry: detect a path's format, open it as a source, write targets in a format.
 * A new format is one module plus one entry here.
 */
import { stat } from 'node:fs/promises';
import { badInput, usage } from '../util/errors.js';
import type { CheckpointSource, FormatName, WriteReport } from '../formats/types.js';
import type { TargetTensor } from '../lazy/types.js';
import type { PyValue } from '../pickle/values.js';
import { isSafetensorsPath, openSafetensors, writeSafetensors } from '../formats/safetensors.js';
import { isTorchPath, openTorch, writeTorch } from '../formats/torch.js';
import { isDcpPath, openDcp, writeDcp } from '../formats/dcp.js';
import { openMegatron } from '../megatron/checkpoint.js';
import { isMegatronPath } from '../megatron/run-dir.js';

export interface FormatModule {
  readonly name: FormatName;
  readonly description: string;
  detect(path: string): Promise<boolean>;
  open(path: string): Promise<CheckpointSource>;
  /** Lays out targets in this format (formats `convert --to` writes tensor for tensor). */
  readonly write?: (tensors: readonly TargetTensor[], opts: WriteOptions) => WriteReport;
}

export interface WriteOptions {
  maxShardSize?: number;
  /** Single-file output with this name (safetensors, torch). */
  singleFile?: string;
  /** DCP: number of .distcp files. */
  dcpFiles?: number;
  /** Nesting of a torch/DCP source, for torch output. */
  tree?: PyValue;
  /** Non-tensor entries, for formats that can hold them. */
  objects?: ReadonlyMap<string, PyValue>;
  /** safetensors __metadata__. */
  metadata?: ReadonlyMap<string, string>;
}

const dropAll = (objects: ReadonlyMap<string, PyValue> | undefined, reason: string): WriteReport['dropped'] => [...(objects ?? new Map()).keys()].map((name) => ({ name, reason }));

/** Every format, in detection order. A new format is one module plus one entry here. */
export const FORMATS = [
  {
    name: 'megatron',
    description: 'Megatron-Core torch_dist (run dir with latest_checkpointed_iteration.txt, or iter_* dir)',
    detect: isMegatronPath,
    open: async (p) => {
      const m = await openMegatron(p);
      const metadata = new Map([['iteration', m.resolved.how], ...m.source.metadata]);
      return { ...m.source, format: 'megatron' as const, metadata };
    },
  },
  {
    name: 'dcp',
    description: 'PyTorch Distributed Checkpoint (.metadata + *.distcp)',
    detect: isDcpPath,
    open: openDcp,
    write: (tensors, o) => writeDcp(tensors, { files: o.dcpFiles, objects: o.objects }),
  },
  {
    name: 'safetensors',
    description: 'safetensors, single file or sharded with model.safetensors.index.json',
    detect: isSafetensorsPath,
    open: openSafetensors,
    write: (tensors, o) => ({ files: writeSafetensors(tensors, { maxShardSize: o.maxShardSize, singleFile: o.singleFile, metadata: o.metadata }).files, dropped: dropAll(o.objects, 'safetensors holds only tensors') }),
  },
  {
    name: 'torch',
    description: 'torch.save zip archive (pytorch_model.bin, *.pt), single or sharded with .bin.index.json',
    detect: isTorchPath,
    open: openTorch,
    write: (tensors, o) => writeTorch(tensors, { maxShardSize: o.maxShardSize, singleFile: o.singleFile, tree: o.tree, objects: o.objects }),
  },
] as const satisfies readonly FormatModule[];

type Writable = Extract<(typeof FORMATS)[number], { write: unknown }>;
/** Formats `convert --to` writes tensor-for-tensor. */
export const FORMAT_NAMES = ['safetensors', 'torch', 'dcp'] as const satisfies ReadonlyArray<Writable['name']>;
/** Formats a source can be read as (`--from`, `inspect --format`). */
export const READ_FORMAT_NAMES: readonly FormatName[] = FORMATS.map((f) => f.name);

export async function detectFormat(path: string): Promise<FormatModule> {
  let st;
  try {
    st = await stat(path);
  } catch {
    throw usage(`${path}: no such file or directory`);
  }
  if (!st.isFile() && !st.isDirectory()) throw badInput(`${path} is ${st.isFIFO() ? 'a named pipe' : 'not a regular file'}, not a checkpoint`, path);
  for (const f of FORMATS) if (await f.detect(path)) return f;
  throw badInput(`${path}: not a checkpoint shardshift recognises (${FORMATS.map((f) => f.name).join(', ')})`, path);
}

export async function openCheckpoint(path: string, format?: FormatName): Promise<CheckpointSource> {
  const mod = format ? FORMATS.find((f) => f.name === format)! : await detectFormat(path);
  return mod.open(path);
}

/** Lays out `tensors` in `format`; reports non-tensor entries the format cannot hold. */
export function writeFormat(format: (typeof FORMAT_NAMES)[number], tensors: readonly TargetTensor[], opts: WriteOptions): WriteReport {
  const mod = FORMATS.find((f): f is Writable => f.name === format && 'write' in f);
  if (!mod) throw new Error(`internal: no writer for ${format}`);
  return mod.write(tensors, opts);
}

export type { CheckpointSource, FormatName, WriteReport } from '../formats/types.js';
export type { TargetTensor } from '../lazy/types.js';
