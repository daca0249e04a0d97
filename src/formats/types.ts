/**
 * The boundary between on-disk formats and everything else.
 *
 * A format module opens a path as a `CheckpointSource` — an index of tensors (name, dtype, shape,
 * where its bytes are) plus non-tensor entries and side files — reading only headers and
 * metadata. Tensor bytes are read later, box by box, through `SourceTensor.read`. Writing goes the
 * other way: a format's writer turns a complete list of target tensors into `OutputFile`s, each
 * an ordered list of parts the executor streams to disk.
 */
import type { DType } from '../tensor/dtype.js';
import type { Box } from '../tensor/layout.js';
import type { PyValue } from '../pickle/values.js';

/** On-disk formats: the first three are written by `convert --to`; megatron is read here (and written by the model conversion). */
export type FormatName = 'safetensors' | 'torch' | 'dcp' | 'megatron' | 'nxd';

export interface SourceTensor {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** numel × itemsize. */
  readonly byteLength: number;
  /** Where the bytes are, for display and messages (file, and record or offset). */
  readonly where: string;
  /** Gathers `box` into `out` as contiguous C-order bytes. */
  read(box: Box, out: Uint8Array): Promise<void>;
}

/** A non-tensor leaf of a checkpoint (an int, a string, nested metadata ...). */
export interface SourceObject {
  readonly name: string;
  readonly value: PyValue;
  readonly where: string;
  /**
   * Set when the entry could not be decoded safely (its pickle names a global outside the
   * allow-list, e.g. numpy RNG state): `value` then holds the raw bytes and this says why.
   * Such entries are never carried into outputs.
   */
  readonly opaque?: string;
}

export interface CheckpointSource {
  readonly format: FormatName;
  /** The path the user named. */
  readonly path: string;
  /** Tensors by flattened name, in the order the source lists them. */
  readonly tensors: ReadonlyMap<string, SourceTensor>;
  /** Non-tensor leaves by flattened name. */
  readonly objects: ReadonlyMap<string, SourceObject>;
  /**
   * The nesting of a torch.save file (dicts, lists, tuples, with tensors and objects as leaves),
   * so that torch → torch keeps it; undefined for flat formats.
   */
  readonly tree?: PyValue;
  /** Format-level metadata (safetensors `__metadata__`, DCP version ...), as strings. */
  readonly metadata: ReadonlyMap<string, string>;
  /** The directory `dataFiles` and `sideFiles` are relative to. */
  readonly root: string;
  /** Data files the tensors live in (relative to `root`). */
  readonly dataFiles: readonly string[];
  /** Other files beside the weights (config.json, tokenizer files, args ...), relative paths. */
  readonly sideFiles: readonly string[];
  close(): Promise<void>;
}

/** A tensor the output will hold: its name, dtype, shape and how to get each box of its bytes. */
export interface TargetTensor {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly byteLength: number;
  /** Produces `box` of this tensor as contiguous bytes into `out`. */
  produce(box: Box, out: Uint8Array): Promise<void>;
  /** For plans and messages: what the bytes are made from. */
  readonly describe: string;
}

/** Filled in by the executor while a tensor part streams. */
export interface TensorSlot {
  readonly kind: 'tensor';
  readonly tensor: TargetTensor;
  /** Set when the part's bytes need a CRC-32 (zip records). */
  readonly wantCrc: boolean;
  crc: number;
}

/** Literal bytes, a tensor's data, or bytes computed once the earlier parts are written. */
export type Part = Uint8Array | TensorSlot | (() => Uint8Array);

export interface OutputFile {
  /** Path relative to the output directory. */
  readonly relPath: string;
  /** Total size, known before writing (for plans and progress). */
  readonly size: number;
  readonly parts: readonly Part[];
}

export function tensorSlot(tensor: TargetTensor, wantCrc = false): TensorSlot {
  return { kind: 'tensor', tensor, wantCrc, crc: 0 };
}

/** Non-tensor entries a target format could not hold, reported to the user. */
export interface WriteReport {
  readonly files: OutputFile[];
  readonly dropped: ReadonlyArray<{ name: string; reason: string }>;
}
