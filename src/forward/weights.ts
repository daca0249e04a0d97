/**
 * Weights for a reference forward pass, read from an opened checkpoint a piece at a time and
 * upcast to fp32: a whole small vector (a norm, a bias), the rows of a matrix in blocks no larger
 * than the budget, or a few gathered rows (the embedding rows of the prompt's tokens). Nothing
 * holds a whole tensor unless it is smaller than the budget, so a 70B model runs in the memory a
 * single row block needs.
 *
 * A `WeightRef` names a tensor and, for layer- or expert-stacked tensors (Megatron torch_dist
 * keeps `decoder.layers.*` as one tensor with a leading layer axis, experts with a further expert
 * axis), the leading indices that select one matrix or vector of the stack.
 */
import { castBytes } from '../tensor/cast.js';
import { byteLength, numelOf, type DType } from '../tensor/dtype.js';
import { badInput, unsupported } from '../util/errors.js';
import type { SourceTensor } from '../lazy/types.js';

export interface WeightRef {
  readonly name: string;
  /** Leading indices into a stacked tensor (layer, expert …); empty for a plain tensor. */
  readonly lead: readonly number[];
}

export const ref = (name: string, ...lead: number[]): WeightRef => ({ name, lead });

/** Where weights come from: an opened checkpoint, or an index over several (NxD's rank files). */
export interface WeightSource {
  /** The path the user named (for messages). */
  readonly path: string;
  /** The directory side files (tokenizer.json) are looked for in. */
  readonly root: string;
  readonly tensors: ReadonlyMap<string, SourceTensor>;
}

const READABLE: readonly DType[] = ['F32', 'F16', 'BF16', 'F8_E4M3', 'F8_E5M2'];

export class WeightStore {
  /** Bytes read so far (the bench reports them). */
  bytesRead = 0;
  constructor(
    readonly source: WeightSource,
    /** Largest fp32 block (bytes) one read may produce. */
    readonly blockBytes: number,
  ) {}

  has(name: string): boolean {
    return this.source.tensors.has(name);
  }

  tensor(name: string): SourceTensor {
    const t = this.source.tensors.get(name);
    if (!t) throw badInput(`${this.source.path}: no tensor ${name} (the reference forward needs it)`, this.source.path, name);
    if (!READABLE.includes(t.dtype)) throw unsupported(`${this.source.path}: ${name} is ${t.dtype}; the reference forward reads ${READABLE.join(', ')}`, this.source.path, name);
    return t;
  }

  /** The shape of one matrix / vector of the stack (the dims after the leading indices). */
  shape(r: WeightRef): number[] {
    const t = this.tensor(r.name);
    if (t.shape.length < r.lead.length) throw badInput(`${this.source.path}: ${r.name} has shape [${t.shape.join(', ')}], expected ${r.lead.length} leading axes`, this.source.path, r.name);
    r.lead.forEach((i, d) => {
      if (i >= t.shape[d]!) throw badInput(`${this.source.path}: ${r.name} has ${t.shape[d]} entries on axis ${d}, index ${i} asked for`, this.source.path, r.name);
    });
    return t.shape.slice(r.lead.length);
  }

  /** Rows [r0, r0 + n) of the matrix (or elements of the vector) `r`, as fp32. */
  async rows(r: WeightRef, r0: number, n: number): Promise<Float32Array> {
    const { bytes, dtype } = await this.rawRows(r, r0, n);
    return toF32(bytes, dtype);
  }

  /**
   * Two reusable shared read buffers for matrix blocks (`linear` alternates them), so a pass
   * allocates nothing per block: a 70B pass would otherwise leave gigabytes of garbage buffers
   * for a garbage collector that sees only a few megabytes of heap.
   */
  private readonly slots: Array<SharedArrayBuffer | undefined> = [undefined, undefined];

  /**
   * The same rows as raw bytes in the checkpoint's dtype (the matmul kernel widens them itself);
   * with `slot`, read into that shared buffer (valid until the slot's next read).
   */
  async rawRows(r: WeightRef, r0: number, n: number, slot?: 0 | 1): Promise<{ bytes: Uint8Array; dtype: DType }> {
    const t = this.tensor(r.name);
    const inner = this.shape(r);
    const rest = inner.slice(1);
    const start = [...r.lead, r0, ...rest.map(() => 0)];
    const size = [...r.lead.map(() => 1), n, ...rest];
    const len = byteLength(t.dtype, numelOf(size));
    let raw: Uint8Array;
    if (slot === undefined) raw = new Uint8Array(len);
    else {
      let buf = this.slots[slot];
      if (!buf || buf.byteLength < len) this.slots[slot] = buf = new SharedArrayBuffer(Math.max(len, Math.min(this.blockBytes, 2 * len)));
      raw = new Uint8Array(buf, 0, len);
    }
    await t.read({ start, size }, raw);
    this.bytesRead += raw.byteLength;
    return { bytes: raw, dtype: t.dtype };
  }

  /** A whole vector (or small matrix) of the stack. */
  async whole(r: WeightRef): Promise<Float32Array> {
    const s = this.shape(r);
    return this.rows(r, 0, s[0] ?? 1);
  }

  /** The rows `ids` of matrix `r` (embedding lookup), each read on its own. */
  async gather(r: WeightRef, ids: readonly number[]): Promise<Float32Array> {
    const [rowsN, cols] = this.shape(r) as [number, number];
    const out = new Float32Array(ids.length * cols);
    const cache = new Map<number, Float32Array>();
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (id < 0 || id >= rowsN) throw badInput(`token id ${id} is outside ${r.name}'s ${rowsN} rows`, this.source.path, r.name);
      let row = cache.get(id);
      if (!row) cache.set(id, (row = await this.rows(r, id, 1)));
      out.set(row, i * cols);
    }
    return out;
  }

  /** How many rows of `cols` fp32 values fit one block. */
  rowsPerBlock(cols: number): number {
    return Math.max(1, Math.floor(this.blockBytes / (4 * cols)));
  }
}

function toF32(raw: Uint8Array, dtype: DType): Float32Array {
  if (dtype === 'F32') {
    return raw.byteOffset % 4 === 0 ? new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4) : new Float32Array(raw.slice().buffer);
  }
  const out = castBytes(raw, dtype, 'F32');
  return new Float32Array(out.buffer, out.byteOffset, out.byteLength / 4);
}
