/**
 * A Megatron run directory, whatever its checkpoint format: `latest_checkpointed_iteration.txt`
 * (the tracker) and `iter_XXXXXXX/` (or `release/`) directories; which iteration a path names;
 * and the globals Megatron pickles beyond plain torch (the args namespace's enums, numpy RNG state,
 * megatron-core's DCP metadata classes). Shared by the torch_dist, legacy and fsdp_dtensor readers.
 */
import { readdir, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { badInput, usage } from '../util/errors.js';
import { PyObject } from '../pickle/values.js';
import type { AllowList, ClassEntry, FunctionEntry } from '../pickle/index.js';
import { dataclass, enumClass } from '../pickle/index.js';
import { readTextFile } from '../io/file.js';

export const TRACKER = 'latest_checkpointed_iteration.txt';

/**
 * The checkpoint formats of a Megatron iteration directory (`--ckpt-format`): megatron-core's
 * `torch_dist` (DCP + metadata.json + common.pt), the legacy per-rank `torch` files
 * (`mp_rank_*\/model_optim_rng.pt`) and Megatron-FSDP's `fsdp_dtensor`. The one list the CLI,
 * the steps and the plans take their choices and types from.
 */
export const CKPT_FORMATS = ['torch_dist', 'torch', 'fsdp_dtensor'] as const;
export type CkptFormat = (typeof CKPT_FORMATS)[number];

/**
 * numpy arrays and dtypes as pickled inside Megatron's RNG state (`np.random.get_state()`):
 * `_reconstruct(ndarray, (0,), b'b')` then BUILD with `(version, shape, dtype, fortran, bytes)`,
 * and `dtype('u4', False, True)` then BUILD. Kept as inert records (they are never used as
 * weights), so reading a training checkpoint does not fail on its RNG state.
 */
const numpyRecord: ClassEntry = {
  kind: 'class',
  call: (args, ctx) => new PyObject(ctx.global.module, ctx.global.name, null, args, 'call'),
  build: (obj, state) => {
    obj.state = state;
  },
};
const numpyReconstruct: FunctionEntry = {
  kind: 'function',
  call: (args) => new PyObject('numpy', 'ndarray', null, args, 'call'),
};

/**
 * Globals Megatron checkpoints pickle beyond plain torch/DCP ones: the args namespace's enums,
 * and the metadata classes some megatron-core versions attach to DCP's `.metadata`.
 */
export const MEGATRON_GLOBALS: AllowList = {
  'numpy.core.multiarray._reconstruct': numpyReconstruct,
  'numpy._core.multiarray._reconstruct': numpyReconstruct,
  'numpy.ndarray': numpyRecord,
  'numpy.dtype': numpyRecord,
  'numpy.core.multiarray.scalar': numpyReconstruct,
  'numpy._core.multiarray.scalar': numpyReconstruct,
  'megatron.core.enums.ModelType': enumClass(),
  'megatron.core.transformer.enums.AttnBackend': enumClass(),
  'megatron.core.transformer.enums.AttnMaskType': enumClass(),
  'megatron.core.transformer.enums.AttnType': enumClass(),
  'megatron.core.transformer.enums.LayerType': enumClass(),
  'megatron.core.transformer.enums.CudaGraphScope': enumClass(),
  'megatron.core.transformer.enums.CudaGraphModule': enumClass(),
  'megatron.core.transformer.enums.InferenceCudaGraphScope': enumClass(),
  'megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata': dataclass(),
  'megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan': dataclass(),
};

export interface ResolvedIteration {
  /** The directory holding `.metadata` etc. */
  readonly iterDir: string;
  readonly iteration: number | 'release';
  /** How it was chosen, for the plan printout. */
  readonly how: string;
}

async function isDir(p: string): Promise<boolean> {
  return stat(p).then(
    (s) => s.isDirectory(),
    () => false,
  );
}
export async function isFile(p: string): Promise<boolean> {
  return stat(p).then(
    (s) => s.isFile(),
    () => false,
  );
}

/** `iter_0000100` → 100; `release` → 'release'. */
function iterationOf(dirName: string): number | 'release' | undefined {
  if (dirName === 'release') return 'release';
  const m = /^iter_(\d{7,})$/.exec(dirName);
  return m ? Number(m[1]) : undefined;
}

export function iterDirName(iteration: number | 'release'): string {
  return iteration === 'release' ? 'release' : `iter_${String(iteration).padStart(7, '0')}`;
}

/** A concrete iteration directory, or a run directory resolved through its tracker file. */
/** An iteration directory: torch_dist (`.metadata`) or legacy (`mp_rank_*` directories). */
export async function holdsCheckpoint(dir: string): Promise<boolean> {
  if (await isFile(join(dir, '.metadata'))) return true;
  return (await readdir(dir).catch(() => [] as string[])).some((n) => /^mp_rank_\d{2}/.test(n));
}

export async function resolveIteration(path: string): Promise<ResolvedIteration> {
  const own = iterationOf(basename(path));
  if (own !== undefined && (await holdsCheckpoint(path))) return { iterDir: path, iteration: own, how: `iteration directory ${basename(path)}` };
  if (await holdsCheckpoint(path)) return { iterDir: path, iteration: 0, how: 'checkpoint directory' };
  const tracker = join(path, TRACKER);
  const iters = (await readdir(path).catch(() => [] as string[])).filter((n) => iterationOf(n) !== undefined).sort();
  if (await isFile(tracker)) {
    const text = (await readTextFile(tracker)).trim();
    const it: number | 'release' | undefined = text === 'release' ? 'release' : /^\d+$/.test(text) ? Number(text) : undefined;
    if (it === undefined) throw badInput(`${tracker}: expected an iteration number or "release", found ${JSON.stringify(text.slice(0, 40))}`, tracker);
    const dir = join(path, iterDirName(it));
    if (!(await isDir(dir))) throw badInput(`${tracker}: names iteration ${text} but ${dir} does not exist`, tracker);
    return { iterDir: dir, iteration: it, how: `${TRACKER} → ${iterDirName(it)}` };
  }
  if (iters.length === 1) return { iterDir: join(path, iters[0]!), iteration: iterationOf(iters[0]!)!, how: `the only iteration directory, ${iters[0]}` };
  if (iters.length > 1) {
    throw usage(`${path}: has no ${TRACKER} and ${iters.length} iteration directories (${iters.slice(0, 4).join(', ')}${iters.length > 4 ? ', …' : ''}); name one of them`);
  }
  throw badInput(`${path}: not a Megatron checkpoint (no ${TRACKER}, no iter_* directory, no .metadata)`, path);
}

export async function isMegatronPath(path: string): Promise<boolean> {
  if (!(await isDir(path))) return false;
  if (await isFile(join(path, TRACKER))) return true;
  if (await isFile(join(path, 'metadata.json')) && (await isFile(join(path, '.metadata')))) return true;
  const names = await readdir(path);
  if (names.some((n) => /^mp_rank_\d{2}/.test(n))) return true;
  return names.some((n) => iterationOf(n) !== undefined);
}

