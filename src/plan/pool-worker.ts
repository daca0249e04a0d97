/**
 * The tinypool task runner (see `workers.ts`): casts one chunk in place in the executor's shared
 * buffer arena (source and destination are two disjoint ranges of the same SharedArrayBuffer), or
 * merges one block of a LoRA weight in place (`lora/merge-task.ts`), or dequantises MXFP4 rows
 * into it (`tensor/mxfp4.ts`).
 */
import { castBytes } from '../tensor/cast.js';
import { runLoraMerge } from '../lora/merge-task.js';
import { runMxfp4Rows } from '../tensor/mxfp4.js';
import type { PoolTask } from './workers.js';

export default function run(t: PoolTask): number {
  if (t.kind === 'lora') return runLoraMerge(t);
  if (t.kind === 'mxfp4') return runMxfp4Rows(t);
  castBytes(new Uint8Array(t.arena, t.src, t.srcLength), t.from, t.to, new Uint8Array(t.arena, t.dst, t.dstLength));
  return t.dstLength;
}
