/**
 * What a path given as a model source is — the one detection the CLI routes on and the model
 * conversions start from: a Megatron run or iteration directory (any checkpoint format), NxD
 * shards, an HF model directory, a single checkpoint file, or nothing on disk (then a CLI caller
 * may take it as a hub model id).
 */
import { stat } from 'node:fs/promises';
import { isMegatronPath } from '../megatron/run-dir.js';
import { isNxdPath } from '../nxd/shards.js';
import { ioError, isErrno } from '../util/errors.js';

export type ModelSourceKind = 'megatron' | 'nxd' | 'hf' | 'file' | 'missing';

export async function modelSourceKind(path: string): Promise<ModelSourceKind> {
  const st = await stat(path).catch(() => undefined);
  if (!st) return 'missing';
  if (st.isFile()) return 'file';
  // A directory that cannot be read is said so, with its path: taking it for an HF model would
  // end in a misleading "config.json missing".
  const typed = (e: unknown): never => {
    throw isErrno(e) ? ioError(e, e.path ?? path) : e;
  };
  if (await isMegatronPath(path).catch(typed)) return 'megatron';
  if (await isNxdPath(path).catch(typed)) return 'nxd';
  return 'hf';
}
