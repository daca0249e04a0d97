/**
 * A tinypool task: casts one chunk in place in the executor's shared buffer arena (the source
 * bytes and the destination are two disjoint ranges of the same SharedArrayBuffer). See
 * `workers.ts`.
 */
import { castBytes } from '../tensor/cast.js';
import type { CastTask } from './workers.js';

export default function cast(t: CastTask): number {
  castBytes(new Uint8Array(t.arena, t.src, t.srcLength), t.from, t.to, new Uint8Array(t.arena, t.dst, t.dstLength));
  return t.dstLength;
}
