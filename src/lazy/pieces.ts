/**
 * A source tensor assembled from pieces (`tensor/layout.ts`): boxes of the global tensor, each a
 * strided view over a file — how legacy Megatron rank files and NxD shards become one global
 * tensor. Optionally with replicas: other piece lists that must hold the same bytes (NxD's KV
 * heads tiled `kv_size_multiplier` times); a read checks every replica against the first and
 * names the one that differs.
 */
import type { SourceTensor } from './types.js';
import { byteLength, numelOf, type DType } from '../tensor/dtype.js';
import { readBox, type Box, type Piece } from '../tensor/layout.js';
import { badInput } from '../util/errors.js';

export interface Replicas {
  /** What a replica is, for the message (e.g. `KV replica`). */
  readonly what: string;
  /** Why they must agree, for the message. */
  readonly why: string;
  readonly copies: ReadonlyArray<{ readonly pieces: readonly Piece[]; readonly where: string }>;
}

export class PieceTensor implements SourceTensor {
  readonly byteLength: number;
  constructor(
    readonly name: string,
    readonly dtype: DType,
    readonly shape: readonly number[],
    readonly pieces: readonly Piece[],
    readonly where: string,
    readonly replicas?: Replicas,
  ) {
    this.byteLength = byteLength(dtype, numelOf(shape));
  }

  async read(box: Box, out: Uint8Array): Promise<void> {
    await readBox(this.name, this.dtype, this.shape, this.pieces, box, out);
    if (!this.replicas) return;
    const tmp = new Uint8Array(out.length);
    for (const [k, rep] of this.replicas.copies.entries()) {
      await readBox(this.name, this.dtype, this.shape, rep.pieces, box, tmp);
      if (Buffer.compare(tmp, out) !== 0) {
        throw badInput(`${this.name}: ${this.replicas.what} ${k + 1} (${rep.where}) differs from replica 0 (${this.where}) in rows ${box.start[0]}..${box.start[0]! + box.size[0]!} — ${this.replicas.why}`, undefined, this.name);
      }
    }
  }
}
