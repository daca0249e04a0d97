/**
 * The tinypool task runner (see `pool.ts`): casts one chunk in place in the executor's shared
 * buffer arena (source and destination are two disjoint ranges of the same SharedArrayBuffer), or
 * merges one block of a LoRA weight in place (`lora-merge-task.ts`), or dequantises MXFP4 rows
 * into it (`mxfp4.ts`), or multiplies a block of a reference forward pass (`matmul-pool.ts`). The one place that knows every task kind.
 */
import { castBytes } from './cast.js';
import { runLoraMerge } from './lora-merge-task.js';
import { runMxfp4Rows } from './mxfp4.js';
import type { LoraMergeTask } from './lora-merge-task.js';
import type { Mxfp4RowsTask } from './mxfp4.js';
import type { CastTask } from './pool.js';
import { runMatmulTask, type MatmulTask } from './matmul-pool.js';

export default function run(t: CastTask | LoraMergeTask | Mxfp4RowsTask | MatmulTask): number {
  if (t.kind === 'matmul') return runMatmulTask(t);
  if (t.kind === 'lora') return runLoraMerge(t);
  if (t.kind === 'mxfp4') return runMxfp4Rows(t);
  castBytes(new Uint8Array(t.arena, t.src, t.srcLength), t.from, t.to, new Uint8Array(t.arena, t.dst, t.dstLength));
  return t.dstLength;
}
