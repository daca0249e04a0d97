/**
 * A new target built from another by changing its name, shape or how boxes are produced.
 *
 * Always a fresh object with exactly the TargetTensor fields — never an object spread, which
 * would also copy private tags (e.g. the executor's cast marker) that no longer describe the view.
 */
import { byteLength, numelOf } from '../tensor/dtype.js';
import type { TargetTensor } from '../formats/types.js';

export function targetView(
  t: TargetTensor,
  change: { name?: string; shape?: readonly number[]; produce?: TargetTensor['produce']; describe?: string },
): TargetTensor {
  const shape = change.shape ?? t.shape;
  return {
    name: change.name ?? t.name,
    dtype: t.dtype,
    shape,
    byteLength: change.shape ? byteLength(t.dtype, numelOf(shape)) : t.byteLength,
    describe: change.describe ?? t.describe,
    produce: change.produce ?? ((b, o) => t.produce(b, o)),
  };
}
