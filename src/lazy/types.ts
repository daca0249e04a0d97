/**
 * The tensors everything above the file formats passes around: a source tensor (bytes read box
 * by box from where they are) and a target tensor (bytes produced box by box on demand), and the
 * output files the executor streams, made of literal bytes and target tensors.
 *
 * A target is one of a closed set of node kinds, each a plain object with a `kind` tag, so that
 * every consumer must handle each kind and no node can carry a meaning that is not in its type.
 * Casts are their own node, not a `produce` function with a marker on it: the executor casts a
 * `cast` node in its arena on the worker pool, and a copy of a node (an object spread) is still
 * exactly the node it says it is.
 */
import type { DType } from '../tensor/dtype.js';
import type { Box } from '../tensor/layout.js';

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

/** What every target tensor has. */
interface TargetHead {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly byteLength: number;
  /** For plans and messages: what the bytes are made from. */
  readonly describe: string;
}

/** A target whose bytes a function produces, box by box, as contiguous C-order bytes. */
export interface ProducedTensor extends TargetHead {
  readonly kind: 'produced';
  produce(box: Box, out: Uint8Array): Promise<void>;
}

/** `inner` cast to `dtype` with torch's rounding (`castTo` makes these; `inner.dtype` ≠ `dtype`). */
export interface CastTensor extends TargetHead {
  readonly kind: 'cast';
  readonly inner: TargetTensor;
}

/** A tensor the output will hold: its name, dtype, shape and how to get each box of its bytes. */
export type TargetTensor = ProducedTensor | CastTensor;

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

