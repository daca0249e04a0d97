/**
 * The boundary between on-disk formats and everything else.
 *
 * A format module opens a path as a `CheckpointSource` — an index of tensors (name, dtype, shape,
 * where its bytes are) plus non-tensor entries and side files — reading only headers and
 * metadata. Tensor bytes are read later, box by box, through `SourceTensor.read`. Writing goes the
 * other way: a format's writer turns a complete list of target tensors into `OutputFile`s, each
 * an ordered list of parts the executor streams to disk.
 */
import type { OutputFile, SourceTensor } from '../lazy/types.js';
import type { PyValue } from '../pickle/values.js';

/** On-disk formats: the first three are written by `convert --to`; megatron is read here (and written by the model conversion). */
export type FormatName = 'safetensors' | 'torch' | 'dcp' | 'megatron' | 'nxd';

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
  /**
   * Called once every read is done, before an output made from it is committed (a source
   * streamed from the hub verifies the bytes it fetched by range here).
   */
  settle?(): Promise<void>;
  close(): Promise<void>;
}

/** Non-tensor entries a target format could not hold, reported to the user. */
export interface WriteReport {
  readonly files: OutputFile[];
  readonly dropped: ReadonlyArray<{ name: string; reason: string }>;
}
