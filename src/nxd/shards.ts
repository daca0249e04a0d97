/**
 * AWS Neuron NxD / NxD Training checkpoint shards, as NxD's `trainer/checkpoint.py` and its
 * `scripts/checkpoint_converter.py` (which NxDT's converter wraps) write them:
 *
 *   <tag>/checkpoint, <tag>/done                  markers ("1"); NxD lists tags holding `checkpoint`
 *                                                 and resumes from the newest holding `done`
 *   <tag>/model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt            (`_ep_rank_EE_` before tp when EP > 1)
 *
 * Each shard is a `torch.save` of a flat dict of *global* parameter names (PP does not renumber
 * layers) → that rank's tensor. With xser (torch_xla `utils/serialization.py`, NxD's
 * `_xser_save_data`) each tensor is replaced by `torch_xla.utils.serialization.TensorReference`
 * with state `{'tid': N}` and saved alone as `<shard>.tensors/tensor_N.pt`; NxD also writes
 * `<shard>.info.pt` = `{N: {'dtype', 'shape', 'expert_model_parallel'}}`. torch_xla's own
 * `xser.save` externalises only XLA tensors, so the converter's `--save_xser` on CPU leaves the
 * tensors inline and `.tensors/` empty: both forms are read.
 *
 * This module is the file layer only (names in, rank tensors out; rank tensors in, files out);
 * the parameter layout (TP split, GQA, PP) is in `plan/nxd-convert.ts`.
 */
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ReadOnlyFile } from '../io/file.js';
import { badInput, unsupported } from '../util/errors.js';
import { openTorchArchive, tensorPiece, torchArchiveParts, contiguousTensorRef, type TorchArchive } from '../formats/torch-archive.js';
import type { AllowList } from '../pickle/index.js';
import { PyDict, PyGlobal, PyObject, TensorRef, TorchSize, asNumber, type PyValue } from '../pickle/values.js';
import { byteLength, dtypeInfo, numelOf, type DType } from '../tensor/dtype.js';
import { readBox, type Box, type Piece } from '../tensor/layout.js';
import type { OutputFile, SourceTensor, TargetTensor } from '../lazy/types.js';

/** The only classes an NxD shard may name beyond torch's: the xser reference (a plain object {tid}). */
export const NXD_GLOBALS: AllowList = {
  'torch_xla.utils.serialization.TensorReference': { kind: 'class' },
};

const SHARD = /^dp_rank_(\d{2})(?:_ep_rank_(\d{2}))?_tp_rank_(\d{2})_pp_rank_(\d{2})\.pt$/;

/** `dp_rank_00_tp_rank_01_pp_rank_00.pt` (NxD's `_get_path`: dp, [ep], tp, pp, two digits each). */
export function shardName(tp: number, pp: number, ep?: number): string {
  const d = (n: number): string => String(n).padStart(2, '0');
  return `dp_rank_00${ep === undefined ? '' : `_ep_rank_${d(ep)}`}_tp_rank_${d(tp)}_pp_rank_${d(pp)}.pt`;
}

/** The `model/` directory of a tag directory, or the directory itself when it holds the shards. */
export async function nxdModelDir(path: string): Promise<string | undefined> {
  for (const d of [join(path, 'model'), path]) {
    const names = await readdir(d).catch(() => [] as string[]);
    if (names.some((n) => SHARD.test(n))) return d;
  }
  return undefined;
}

export async function isNxdPath(path: string): Promise<boolean> {
  if (!(await stat(path).then((s) => s.isDirectory(), () => false))) return false;
  return (await nxdModelDir(path)) !== undefined;
}

/** One tensor of one rank file (inline, or an xser `tensor_N.pt`). */
export class RankTensor implements SourceTensor {
  readonly byteLength: number;
  constructor(
    readonly name: string,
    readonly dtype: DType,
    readonly shape: readonly number[],
    readonly piece: Piece,
    readonly where: string,
  ) {
    this.byteLength = byteLength(dtype, numelOf(shape));
  }
  read(box: Box, out: Uint8Array): Promise<void> {
    return readBox(this.name, this.dtype, this.shape, [this.piece], box, out);
  }
}

export interface NxdRank {
  readonly tp: number;
  readonly pp: number;
  readonly file: string;
  /** The rank's tensors by (global) name, in the shard's order. */
  readonly tensors: ReadonlyMap<string, RankTensor>;
}

export interface NxdShards {
  /** The model/ directory. */
  readonly dir: string;
  readonly tp: number;
  readonly pp: number;
  /** True when any shard has a `.tensors` folder (NxD's own test for xser). */
  readonly xser: boolean;
  readonly ranks: readonly NxdRank[];
  rank(tp: number, pp: number): NxdRank;
  close(): Promise<void>;
}

export interface OpenNxdOptions {
  /** Expected layout (the converter's --tp_size/--pp_size); detected from the file names when absent. */
  tp?: number;
  pp?: number;
}

export async function openNxdShards(path: string, opts: OpenNxdOptions = {}): Promise<NxdShards> {
  const dir = await nxdModelDir(path);
  if (!dir) {
    const v1 = (await readdir(path).catch(() => [] as string[])).some((n) => /^tp_rank_\d{2}_pp_rank_\d{2}$/.test(n));
    if (v1) throw unsupported(`${path}: NxD's pre-2.18 layout (tp_rank_XX_pp_rank_YY/checkpoint.pt) is not supported; re-save with a current NxD`, path);
    throw badInput(`${path}: no NxD shard files (model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt)`, path);
  }
  const found: Array<{ tp: number; pp: number; name: string }> = [];
  for (const n of await readdir(dir)) {
    const m = SHARD.exec(n);
    if (!m) continue;
    if (m[1] !== '00') continue; // model shards are written by dp rank 0 only
    if (m[2] !== undefined) throw unsupported(`${join(dir, n)}: expert-parallel (ep_rank) shards belong to MoE models; the supported NxD models are dense`, join(dir, n));
    found.push({ tp: Number(m[3]), pp: Number(m[4]), name: n });
  }
  const tp = opts.tp ?? Math.max(...found.map((r) => r.tp)) + 1;
  const pp = opts.pp ?? Math.max(...found.map((r) => r.pp)) + 1;
  const extra = found.filter((r) => r.tp >= tp || r.pp >= pp);
  if (extra.length) throw badInput(`${dir}: ${extra[0]!.name} is outside tp_size ${tp} × pp_size ${pp}`, join(dir, extra[0]!.name));
  const missing: string[] = [];
  for (let p = 0; p < pp; p++) for (let t = 0; t < tp; t++) if (!found.some((r) => r.tp === t && r.pp === p)) missing.push(shardName(t, p));
  if (missing.length) {
    throw badInput(`${dir}: rank file(s) missing for tp_size ${tp} × pp_size ${pp}: ${missing.join(', ')}`, join(dir, missing[0]!));
  }
  const open: ReadOnlyFile[] = [];
  const ranks: NxdRank[] = [];
  let xser = false;
  try {
    for (const r of found.sort((a, b) => a.pp - b.pp || a.tp - b.tp)) {
      const file = join(dir, r.name);
      const f = await ReadOnlyFile.open(file);
      open.push(f);
      const arc = await openTorchArchive(f, { extraGlobals: NXD_GLOBALS });
      if (!(arc.root instanceof PyDict)) throw badInput(`${file}: does not hold a dict of tensors`, file);
      const folder = `${file}.tensors`;
      if (await stat(folder).then((s) => s.isDirectory(), () => false)) xser = true;
      const tensors = new Map<string, RankTensor>();
      for (const [k, v] of arc.root.entries) {
        if (typeof k !== 'string') throw badInput(`${file}: a key of the state dict is not a string`, file);
        if (v instanceof TensorRef) {
          tensors.set(k, new RankTensor(k, v.dtype, v.shape, tensorPiece(arc, v, k), `${r.name}:${k}`));
        } else if (v instanceof PyObject && v.qualname === 'torch_xla.utils.serialization.TensorReference') {
          const tid = asNumber(v.attr('tid'));
          if (tid === undefined || !Number.isInteger(tid) || tid < 0) throw badInput(`${file}: tensor ${k} is a TensorReference without an integer tid`, file, k);
          const tfile = join(folder, `tensor_${tid}.pt`);
          if (!(await stat(tfile).then((s) => s.isFile(), () => false))) {
            throw badInput(`${file}: tensor ${k} is an xser TensorReference {'tid': ${tid}} but ${tfile} is missing`, tfile, k);
          }
          const tf = await ReadOnlyFile.open(tfile);
          open.push(tf);
          const targ: TorchArchive = await openTorchArchive(tf, { extraGlobals: NXD_GLOBALS });
          if (!(targ.root instanceof TensorRef)) throw badInput(`${tfile}: does not hold a tensor (referenced by ${k} in ${file})`, tfile, k);
          tensors.set(k, new RankTensor(k, targ.root.dtype, targ.root.shape, tensorPiece(targ, targ.root, k), `${r.name}.tensors/tensor_${tid}.pt`));
        } else if (v === null) {
          continue; // NxD prunes None entries of EP > 0 ranks the same way
        } else {
          throw badInput(`${file}: entry ${k} is neither a tensor nor an xser TensorReference`, file, k);
        }
      }
      ranks.push({ tp: r.tp, pp: r.pp, file: r.name, tensors });
    }
  } catch (e) {
    await Promise.all(open.map((f) => f.close()));
    throw e;
  }
  return {
    dir,
    tp,
    pp,
    xser,
    ranks,
    rank: (t, p) => ranks.find((r) => r.tp === t && r.pp === p)!,
    close: async () => {
      await Promise.all(open.map((f) => f.close()));
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Writing

export interface NxdWriteOptions {
  /** xser: every tensor in `<shard>.tensors/tensor_N.pt` (+ `.info.pt`), as NxD training saves. */
  readonly xser: boolean;
}

/**
 * The files of one checkpoint tag: `model/<shard>` per rank (in the order given), then the
 * `checkpoint` and `done` markers NxD's tag discovery reads.
 */
export function writeNxdShards(ranks: ReadonlyArray<{ tp: number; pp: number; tensors: readonly TargetTensor[] }>, opts: NxdWriteOptions): OutputFile[] {
  const files: OutputFile[] = [];
  const marker = Buffer.from('1');
  files.push({ relPath: 'checkpoint', size: marker.length, parts: [marker] });
  for (const r of ranks) {
    const name = shardName(r.tp, r.pp);
    const stem = name.replace(/\.pt$/, '');
    const root = new PyDict();
    if (!opts.xser) {
      const storages: Array<{ key: string; tensor: TargetTensor }> = [];
      for (const t of r.tensors) {
        const key = String(storages.length);
        storages.push({ key, tensor: t });
        root.set(t.name, contiguousTensorRef(key, t));
      }
      const a = torchArchiveParts(stem, root, storages);
      files.push({ relPath: `model/${name}`, size: a.size, parts: a.parts });
      continue;
    }
    const info = new PyDict();
    r.tensors.forEach((t, tid) => {
      root.set(t.name, new PyObject('torch_xla.utils.serialization', 'TensorReference', PyDict.from({ tid })));
      const torchDtype = dtypeInfo(t.dtype).torchDtype;
      if (!torchDtype) throw unsupported(`tensor ${t.name}: torch has no dtype for ${t.dtype}`, undefined, t.name);
      info.set(tid, PyDict.from({ dtype: new PyGlobal('torch', torchDtype), shape: new TorchSize([...t.shape]), expert_model_parallel: false }));
      const a = torchArchiveParts(`tensor_${tid}`, contiguousTensorRef('0', t), [{ key: '0', tensor: t }]);
      files.push({ relPath: `model/${name}.tensors/tensor_${tid}.pt`, size: a.size, parts: a.parts });
    });
    const main = torchArchiveParts(stem, root, []);
    files.push({ relPath: `model/${name}`, size: main.size, parts: main.parts });
    const inf = torchArchiveParts(`${name}.info`, info, []);
    files.push({ relPath: `model/${name}.info.pt`, size: inf.size, parts: inf.parts });
  }
  files.push({ relPath: 'done', size: marker.length, parts: [marker] });
  return files;
}

export type { PyValue };
