/**
 * Megatron-Core `torch_dist` checkpoints: a run directory with `latest_checkpointed_iteration.txt`
 * and `iter_XXXXXXX/` directories, each a DCP checkpoint (`.metadata`, `__R_N.distcp`) plus
 * `metadata.json` (written last by Megatron: the completeness marker) and, up to megatron-core
 * 0.18, `common.pt` (the non-tensor state: iteration, checkpoint_version, training args).
 *
 * Reading resolves the iteration (a concrete `iter_*` dir, or the run dir through its tracker
 * file), then reads the DCP part with the DCP reader — chunks saved under any TP/PP/EP are
 * reassembled lazily into the global tensors. Writing lays out the same directory.
 */
import { join } from 'node:path';
import { badInput } from '../util/errors.js';
import { openDcp, writeDcpChunked, type DcpTensorEntry } from '../formats/dcp.js';
import { openTorchArchive } from '../formats/torch-archive.js';
import { ReadOnlyFile, readTextFile } from '../io/file.js';
import { PyDict, PyFloat, PyObject, type PyValue } from '../pickle/values.js';
import type { CheckpointSource } from '../formats/types.js';
import type { OutputFile } from '../lazy/types.js';
import { torchArchiveParts } from '../formats/torch-archive.js';
import { MEGATRON_GLOBALS, type ResolvedIteration, TRACKER, holdsCheckpoint, isFile, iterDirName, resolveIteration } from './run-dir.js';
import { openMegatronLegacy } from './legacy.js';
import { fsdpPrefix, fsdpView } from './fsdp.js';

export interface MegatronCheckpoint {
  readonly source: CheckpointSource;
  readonly resolved: ResolvedIteration;
  /** `common.pt` (or undefined when the checkpoint has none). */
  readonly common?: PyValue;
  /** `metadata.json` content. */
  readonly backend: Record<string, unknown>;
}

export async function openMegatron(path: string): Promise<MegatronCheckpoint> {
  const resolved = await resolveIteration(path);
  const dir = resolved.iterDir;
  if (!(await isFile(join(dir, '.metadata'))) && (await holdsCheckpoint(dir))) {
    // Legacy per-rank files (--ckpt-format torch): assembled into the same global view.
    const l = await openMegatronLegacy(path);
    const common = PyDict.from([...l.source.objects.values()].map((o): [PyValue, PyValue] => [o.name, o.value]));
    return { source: l.source, resolved: l.resolved, common, backend: { sharded_backend: 'torch (legacy)' } };
  }
  const metaJson = join(dir, 'metadata.json');
  if (!(await isFile(metaJson))) {
    // Megatron-FSDP's fsdp_dtensor is plain DCP (no metadata.json, no common.pt) with the model
    // under a module prefix; anything else without metadata.json is an unfinished torch_dist save.
    if (await isFile(join(dir, '.metadata'))) {
      const dcp = await openDcp(dir, { extraGlobals: MEGATRON_GLOBALS });
      const prefix = fsdpPrefix([...dcp.tensors.keys()]);
      if (prefix) {
        const common = PyDict.from([...dcp.objects.values()].filter((o) => !o.opaque).map((o): [PyValue, PyValue] => [o.name, o.value]));
        const view = fsdpView(dcp, prefix);
        return { source: { ...view, metadata: new Map([...view.metadata, ['layout', `fsdp_dtensor (prefix ${prefix})`]]) }, resolved, common, backend: { sharded_backend: 'fsdp_dtensor' } };
      }
      await dcp.close();
    }
    throw badInput(`${dir}: no metadata.json — Megatron writes it last, so this checkpoint is incomplete (or not torch_dist)`, dir);
  }
  let backend: Record<string, unknown>;
  try {
    backend = JSON.parse(await readTextFile(metaJson)) as Record<string, unknown>;
  } catch (e) {
    throw badInput(`${metaJson}: not valid JSON (${(e as Error).message})`, metaJson);
  }
  if (backend.sharded_backend !== 'torch_dist') {
    throw badInput(`${metaJson}: sharded_backend is ${JSON.stringify(backend.sharded_backend)}; shardshift reads torch_dist`, metaJson);
  }
  const source = await openDcp(dir, { extraGlobals: MEGATRON_GLOBALS });
  let common: PyValue | undefined;
  const commonPath = join(dir, 'common.pt');
  if (await isFile(commonPath)) {
    const f = await ReadOnlyFile.open(commonPath);
    try {
      common = (await openTorchArchive(f, { extraGlobals: MEGATRON_GLOBALS })).root;
    } finally {
      await f.close();
    }
  } else if (source.objects.has('common_state/shard_0_1')) {
    const v = source.objects.get('common_state/shard_0_1')!.value;
    common = Array.isArray(v) ? v[0] : v;
  }
  return { source: { ...source, format: 'dcp' }, resolved, common, backend };
}

/** `args` from common.pt as a plain attribute dict (MLM checkpoints), or undefined. */
export function commonArgs(common: PyValue | undefined): PyDict | undefined {
  if (!(common instanceof PyDict)) return undefined;
  const args = common.get('args');
  if (args instanceof PyObject && args.state instanceof PyDict) return args.state;
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface MegatronWriteOptions {
  readonly iteration: number;
  readonly files?: number;
  /** Training-args fields recorded in common.pt (an argparse.Namespace, as MLM writes). */
  readonly args: Record<string, PyValue>;
  /** ShardedObjects to store (e.g. the empty `_extra_state` entries megatron-core expects), by unique key. */
  readonly objects?: ReadonlyMap<string, PyValue>;
}

/** The files of a run directory: the tracker and `iter_XXXXXXX/` (paths relative to the run dir). */
export function writeMegatron(entries: readonly DcpTensorEntry[], opts: MegatronWriteOptions): OutputFile[] {
  const iterDir = iterDirName(opts.iteration);
  const objects = new Map<string, PyValue>(opts.objects ?? []);
  const dcp = writeDcpChunked(entries, { files: opts.files, noPlannerData: true, objects });
  const files: OutputFile[] = dcp.files.map((f) => ({ ...f, relPath: `${iterDir}/${f.relPath}` }));
  const args = new PyObject('argparse', 'Namespace', PyDict.from(opts.args));
  const common = PyDict.from({ args, checkpoint_version: new PyFloat(3.0), iteration: opts.iteration });
  const c = torchArchiveParts('common', common, []);
  files.push({ relPath: `${iterDir}/common.pt`, size: c.size, parts: c.parts });
  // Four-field form: megatron-core ≤ 0.18 needs the common backend fields, later versions ignore them.
  const meta = Buffer.from(JSON.stringify({ sharded_backend: 'torch_dist', sharded_backend_version: 1, common_backend: 'torch', common_backend_version: 1 }));
  files.push({ relPath: `${iterDir}/metadata.json`, size: meta.length, parts: [meta] });
  const tracker = Buffer.from(String(opts.iteration));
  files.push({ relPath: TRACKER, size: tracker.length, parts: [tracker] });
  return files;
}
