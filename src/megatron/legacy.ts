/**
 * Legacy (non-distributed) Megatron checkpoints, `--ckpt-format torch`:
 * `iter_XXXXXXX/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt`, one torch.save dict per rank with
 * `model` (that rank's TP shard of the stage's layers, numbered locally), `args` (an
 * argparse.Namespace), `checkpoint_version`, `iteration`, optimizer and RNG state.
 *
 * Reading assembles the global tensors lazily: each rank's shard becomes a *piece* of the global
 * tensor at its offset (column-parallel rows, row-parallel columns, SwiGLU fc1's per-rank
 * `[gate_r; up_r]` as two pieces), layers are renumbered globally, and the result is exposed under
 * per-layer names (`decoder.layers.<global>.…`) that the model maps read. Writing lays out any
 * TP×PP split of global targets the same way (see `writeMegatronLegacy`).
 */
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ReadOnlyFile } from '../io/file.js';
import { badInput, unsupported } from '../util/errors.js';
import { openTorchArchive, tensorPiece, torchArchiveParts, contiguousTensorRef, type TorchArchive } from '../formats/torch-archive.js';
import { flattenTree } from '../formats/tree.js';
import { MEGATRON_GLOBALS, resolveIteration, type ResolvedIteration } from './run-dir.js';
import { PyDict, PyFloat, PyObject, TensorRef, asNumber, describe, type PyValue } from '../pickle/values.js';
import { itemSize, numelOf } from '../tensor/dtype.js';
import { isContiguous, type Piece } from '../tensor/layout.js';
import { SHARDED_NORMS_ARG, expertOf, rankDirName, stageLayers, tpSplitOf, ungroupedExpertName } from './parallel.js';
import type { CheckpointSource, SourceObject } from '../formats/types.js';
import type { OutputFile, SourceTensor, TargetTensor } from '../lazy/types.js';
import { targetView, sliceTarget, concatRows } from '../lazy/view.js';
import { PieceTensor } from '../lazy/pieces.js';

const RANK_DIR = /^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$/;
export const LEGACY_FILE = 'model_optim_rng.pt';

export async function isLegacyIterDir(dir: string): Promise<boolean> {
  const names = await readdir(dir).catch(() => [] as string[]);
  return names.some((n) => RANK_DIR.test(n));
}

interface RankFile {
  readonly tp: number;
  readonly pp: number;
  readonly ep: number;
  readonly dir: string;
  readonly file: ReadOnlyFile;
  readonly arc: TorchArchive;
}

export interface LegacyCheckpoint {
  readonly source: CheckpointSource;
  readonly resolved: ResolvedIteration;
  readonly tp: number;
  readonly pp: number;
  readonly args?: PyDict;
}

export async function openMegatronLegacy(path: string): Promise<LegacyCheckpoint> {
  const resolved = await resolveIteration(path);
  const dir = resolved.iterDir;
  const found: Array<{ nums: number[]; name: string }> = [];
  for (const n of await readdir(dir)) {
    const m = RANK_DIR.exec(n);
    if (m) found.push({ nums: [m[1], m[2], m[3]].filter((x) => x !== undefined).map(Number), name: n });
  }
  if (!found.length) throw badInput(`${dir}: no mp_rank_* directories (not a legacy Megatron checkpoint)`, dir);
  found.sort((a, b) => a.name.localeCompare(b.name));
  const files: RankFile[] = [];
  try {
    const open = async (name: string): Promise<{ file: ReadOnlyFile; arc: TorchArchive }> => {
      const p = join(dir, name, LEGACY_FILE);
      if (!(await stat(p).then((s) => s.isFile(), () => false))) throw badInput(`${p}: missing (every rank directory holds ${LEGACY_FILE})`, p);
      const f = await ReadOnlyFile.open(p);
      try {
        const arc = await openTorchArchive(f, { extraGlobals: MEGATRON_GLOBALS });
        // Megatron saves a dict ({args, model, checkpoint_version, …}); anything else is not a rank file.
        if (!(arc.root instanceof PyDict)) throw badInput(`${p}: holds ${describe(arc.root)}, not the dict a Megatron rank file holds (args, model, …)`, p);
        return { file: f, arc };
      } catch (e) {
        await f.close();
        throw e;
      }
    };
    // `mp_rank_TT_NNN` is a PP rank or an EP rank: the args of the first file tell which.
    const first = await open(found[0]!.name);
    files.push({ tp: found[0]!.nums[0]!, pp: 0, ep: 0, dir: found[0]!.name, ...first });
    const args0 = argsOf(first.arc);
    const epSize = asNumber(args0?.get('expert_model_parallel_size')) ?? 1;
    const ppSize = asNumber(args0?.get('pipeline_model_parallel_size'));
    const ranks = found.map((f) => {
      const [t, a, b] = f.nums;
      if (b !== undefined) return { tp: t!, pp: a!, ep: b, name: f.name };
      if (a !== undefined && epSize > 1 && (ppSize ?? 1) === 1) return { tp: t!, pp: 0, ep: a, name: f.name };
      return { tp: t!, pp: a ?? 0, ep: 0, name: f.name };
    });
    files[0] = { ...files[0]!, pp: ranks[0]!.pp, ep: ranks[0]!.ep };
    const tp = Math.max(...ranks.map((r) => r.tp)) + 1;
    const pp = Math.max(...ranks.map((r) => r.pp)) + 1;
    const ep = Math.max(...ranks.map((r) => r.ep)) + 1;
    const missing: string[] = [];
    for (let p = 0; p < pp; p++) for (let e = 0; e < ep; e++) for (let t = 0; t < tp; t++) if (!ranks.some((r) => r.tp === t && r.pp === p && r.ep === e)) missing.push(rankDirName(tp, pp, t, p, ep, e));
    if (missing.length) throw badInput(`${dir}: rank file(s) missing for a TP=${tp} PP=${pp}${ep > 1 ? ` EP=${ep}` : ''} checkpoint: ${missing.join(', ')}`, join(dir, missing[0]!));
    for (const r of ranks.slice(1)) files.push({ tp: r.tp, pp: r.pp, ep: r.ep, dir: r.name, ...(await open(r.name)) });
    files.sort((a, b) => a.pp - b.pp || a.ep - b.ep || a.tp - b.tp);
    return assemble(path, resolved, files, tp, pp, ep);
  } catch (e) {
    await Promise.all(files.map((f) => f.file.close()));
    throw e;
  }
}

function argsOf(arc: TorchArchive): PyDict | undefined {
  const root = arc.root;
  const a = root instanceof PyDict ? root.get('args') : undefined;
  return a instanceof PyObject && a.state instanceof PyDict ? a.state : undefined;
}

function modelDict(r: RankFile, path: string): PyDict {
  const root = r.arc.root;
  if (!(root instanceof PyDict)) throw badInput(`${path}: ${r.dir}/${LEGACY_FILE} does not hold a dict`, path);
  if (root.has('model0')) throw unsupported(`${path}: virtual-pipeline checkpoints (model0, model1, …) are not supported yet`, path);
  const m = root.get('model');
  if (!(m instanceof PyDict)) throw badInput(`${path}: ${r.dir}/${LEGACY_FILE} has no model state dict`, path);
  return m;
}

/**
 * Pre-megatron-core (`megatron/legacy/model`) names → megatron-core names:
 * `language_model.embedding.word_embeddings.weight`, `language_model.encoder.layers.<i>.…`
 * (`transformer` in older files) with `input_norm`, `self_attention.query_key_value`,
 * `self_attention.dense`, `post_attention_norm`, `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h`,
 * `final_norm`, and `language_model.output_layer.weight`. megatron-core names pass unchanged.
 */
const LEGACY_LAYER_NAMES: ReadonlyArray<[RegExp, string]> = [
  [/^(input_norm|input_layernorm)\.weight$/, 'input_layernorm.weight'],
  [/^self_attention\.query_key_value\.(weight|bias)$/, 'self_attention.linear_qkv.$1'],
  [/^self_attention\.dense\.(weight|bias)$/, 'self_attention.linear_proj.$1'],
  [/^(post_attention_norm|post_attention_layernorm)\.weight$/, 'pre_mlp_layernorm.weight'],
  [/^mlp\.dense_h_to_4h\.(weight|bias)$/, 'mlp.linear_fc1.$1'],
  [/^mlp\.dense_4h_to_h\.(weight|bias)$/, 'mlp.linear_fc2.$1'],
];

function mcoreName(name: string, version: number | undefined, path: string): string {
  if (!name.startsWith('language_model.')) return name;
  // QKV rows are grouped per query group only from checkpoint_version 2.0 on.
  if (version !== undefined && version < 2) {
    throw unsupported(`${path}: checkpoint_version ${version} stores QKV in an older order; re-save it with Megatron-LM ≥ 2.0 first`, path, name);
  }
  const n = name.slice('language_model.'.length);
  if (n === 'embedding.word_embeddings.weight' || n === 'output_layer.weight') return n;
  const layer = /^(?:encoder|transformer)\.layers\.(\d+)\.(.+)$/.exec(n);
  if (layer) {
    for (const [re, to] of LEGACY_LAYER_NAMES) if (re.test(layer[2]!)) return `decoder.layers.${layer[1]}.${layer[2]!.replace(re, to)}`;
    return `decoder.layers.${layer[1]}.${layer[2]}`;
  }
  const fin = /^(?:encoder|transformer)\.(final_norm|final_layernorm)\.weight$/.exec(n);
  if (fin) return 'decoder.final_layernorm.weight';
  return name;
}

function assemble(path: string, resolved: ResolvedIteration, files: RankFile[], tp: number, pp: number, ep: number): LegacyCheckpoint {
  const rank0 = files[0]!.arc.root as PyDict;
  const argsV = rank0.get('args');
  const args = argsV instanceof PyObject && argsV.state instanceof PyDict ? argsV.state : undefined;
  const gated = args?.get('swiglu') !== false;
  const sharded = args?.get(SHARDED_NORMS_ARG);
  const shardedNorms = Array.isArray(sharded) ? sharded.filter((x): x is string => typeof x === 'string') : [];
  const etp = asNumber(args?.get('expert_tensor_parallel_size')) ?? tp;
  if (etp !== tp && etp !== 1) throw unsupported(`${path}: expert_tensor_parallel_size ${etp} with TP ${tp}: only etp = tp or 1 are read from legacy rank files`, path);
  const version = asNumber(rank0.get('checkpoint_version'));
  // Local layer count per stage (uniform split), checked against args.num_layers.
  const perStage = new Map<number, number>();
  const leaves = new Map<RankFile, Array<{ name: string; value: PyValue }>>();
  for (const r of files) {
    const ls = flattenTree(modelDict(r, path)).map((l) => ({ name: ungroupedExpertName(mcoreName(l.name, version, path)), value: l.value }));
    leaves.set(r, ls);
    for (const l of ls) {
      const m = /^decoder\.layers\.(\d+)\./.exec(l.name);
      if (m) perStage.set(r.pp, Math.max(perStage.get(r.pp) ?? 0, Number(m[1]) + 1));
    }
  }
  const counts = [...perStage.values()];
  const stageCount = counts[0] ?? 0;
  if (counts.some((c) => c !== stageCount)) throw unsupported(`${path}: pipeline stages hold different numbers of layers (${counts.join(', ')}); only uniform stages are supported`, path);
  const numLayers = asNumber(args?.get('num_layers'));
  if (numLayers !== undefined && numLayers !== stageCount * pp) {
    throw badInput(`${path}: args.num_layers is ${numLayers} but the ${pp} stage(s) hold ${stageCount * pp} layers`, path);
  }
  // Group every rank's shard under its global name.
  const groups = new Map<string, Array<{ r: RankFile; ref: TensorRef; local: string }>>();
  // Local experts per EP rank, from the files themselves.
  const numExperts = asNumber(args?.get('num_experts'));
  const perEp = numExperts !== undefined ? numExperts / ep : Math.max(0, ...[...leaves.values()].flat().filter((l) => l.value instanceof TensorRef).map((l) => (expertOf(l.name)?.expert ?? -1) + 1));
  for (const r of files) {
    for (const l of leaves.get(r)!) {
      if (!(l.value instanceof TensorRef)) continue; // _extra_state and other non-tensors
      if (/_extra_state\d*$/.test(l.name)) continue;
      const ex = expertOf(l.name);
      // Non-expert weights are replicated over EP ranks, whole experts (etp 1) over TP ranks.
      if (!ex && r.ep !== 0) continue;
      if (ex && etp === 1 && r.tp !== 0) continue;
      // Experts by global index (the decoder's and the MTP layers' alike), then layers by global number.
      const byGlobalExpert = ex ? `${ex.before}${r.ep * perEp + ex.expert}${ex.after}` : l.name;
      const m = /^decoder\.layers\.(\d+)\.(.+)$/.exec(byGlobalExpert);
      const global = m ? `decoder.layers.${stageLayers(stageCount * pp, pp, r.pp).first + Number(m[1])}.${m[2]}` : byGlobalExpert;
      // Outside the layers, each stage may hold its own copy (e.g. a tied embedding on the last
      // stage): the first stage's wins, the others must agree in shape.
      if (!m && groups.has(global) && groups.get(global)!.some((g) => g.r.pp !== r.pp)) continue;
      groups.set(global, [...(groups.get(global) ?? []), { r, ref: l.value, local: l.name }]);
    }
  }
  const tensors = new Map<string, SourceTensor>();
  for (const [name, shards] of groups) {
    const split = expertOf(name) && etp === 1 ? 'replicated' : tpSplitOf(name, gated, shardedNorms);
    const first = shards[0]!;
    for (const s of shards) {
      if (s.ref.dtype !== first.ref.dtype || s.ref.shape.length !== first.ref.shape.length || s.ref.shape.some((d, i) => d !== first.ref.shape[i])) {
        throw badInput(
          `${path}: mismatched TP shards of ${name}: ${first.ref.dtype} [${first.ref.shape.join(', ')}] in ${first.r.dir} but ${s.ref.dtype} [${s.ref.shape.join(', ')}] in ${s.r.dir}`,
          join(path, s.r.dir),
          name,
        );
      }
    }
    const byTp = [...shards].sort((a, b) => a.r.tp - b.r.tp);
    if (split !== 'replicated' && byTp.length !== tp) throw badInput(`${path}: ${name} is held by ${byTp.length} of the ${tp} TP ranks`, path, name);
    const local = first.ref.shape;
    // The split says how many dims the weight has: a checkpoint that disagrees is refused here,
    // not turned into a NaN-sized tensor.
    if ((split === 'row' && local.length !== 2) || (split !== 'replicated' && local.length === 0)) {
      throw badInput(`${path}: ${name} in ${first.r.dir} is ${first.ref.dtype} [${local.join(', ')}], but a ${split}-parallel ${name.endsWith('bias') ? 'bias' : 'weight'} has ${split === 'row' ? '2 dims' : 'at least 1 dim'}`, join(path, first.r.dir), name);
    }
    const pieces: Piece[] = [];
    let shape: number[];
    if (split === 'replicated') {
      shape = [...local];
      pieces.push(tensorPiece(byTp[0]!.r.arc, byTp[0]!.ref, name));
    } else if (split === 'row') {
      shape = [local[0]!, local[1]! * tp];
      for (const s of byTp) {
        const p = tensorPiece(s.r.arc, s.ref, name);
        pieces.push({ ...p, box: { start: [0, s.r.tp * local[1]!], size: [...local] } });
      }
    } else if (split === 'column') {
      shape = [local[0]! * tp, ...local.slice(1)];
      for (const s of byTp) {
        const p = tensorPiece(s.r.arc, s.ref, name);
        pieces.push({ ...p, box: { start: [s.r.tp * local[0]!, ...local.slice(1).map(() => 0)], size: [...local] } });
      }
    } else {
      // SwiGLU fc1: rank r holds [gate_r; up_r], m rows each.
      if (local[0]! % 2 !== 0) throw badInput(`${path}: ${name} has an odd number of rows (${local[0]}) for a gated fc1 shard`, path, name);
      const m = local[0]! / 2;
      shape = [local[0]! * tp, ...local.slice(1)];
      for (const s of byTp) {
        const p = tensorPiece(s.r.arc, s.ref, name);
        if (!isContiguous(s.ref.shape, s.ref.stride)) throw unsupported(`${path}: ${name} in ${s.r.dir} is not contiguous`, path, name);
        const half = [m, ...local.slice(1)];
        const rowBytes = (numelOf(local.slice(1)) * itemSize(s.ref.dtype)!);
        pieces.push({ ...p, box: { start: [s.r.tp * m, ...half.slice(1).map(() => 0)], size: half } });
        pieces.push({ ...p, byteOffset: p.byteOffset + m * rowBytes, box: { start: [tp * m + s.r.tp * m, ...half.slice(1).map(() => 0)], size: half } });
      }
    }
    const where = `${byTp.map((s) => s.r.dir).join(',')}:${first.local}`;
    tensors.set(name, new PieceTensor(name, first.ref.dtype, shape, pieces, where));
  }
  const objects = new Map<string, SourceObject>();
  for (const [k, v] of rank0.stringEntries()) if (k !== 'model') objects.set(k, { name: k, value: v, where: `${files[0]!.dir}/${LEGACY_FILE}` });
  const source: CheckpointSource = {
    format: 'megatron',
    path,
    root: resolved.iterDir,
    tensors,
    objects,
    metadata: new Map([
      ['iteration', resolved.how],
      ['layout', `legacy torch format, TP=${tp} PP=${pp}${ep > 1 ? ` EP=${ep}` : ''}`],
    ]),
    dataFiles: files.map((f) => join(f.dir, LEGACY_FILE)),
    sideFiles: [],
    close: async () => {
      await Promise.all(files.map((f) => f.file.close()));
    },
  };
  return { source, resolved, tp, pp, args };
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface LegacyWriteOptions {
  readonly tp: number;
  readonly pp: number;
  /** Expert-parallel size: each EP rank's files hold its experts, numbered locally (default 1). */
  readonly ep?: number;
  /** Expert tensor-parallel size: tp (experts split like other linears) or 1 (whole experts in every TP rank's file). */
  readonly etp?: number;
  readonly numLayers: number;
  readonly iteration: number;
  /** Whether a tensor is SwiGLU's `[gate; up]` (each half split over TP): from the family table. */
  readonly gateUp: (name: string) => boolean;
  /** Norms split over TP like their heads (`Family.tpShardedNorms`); recorded in args.shardshift_tp_sharded_norms. */
  readonly shardedNorms?: readonly string[];
  readonly args: Record<string, PyValue>;
  /** Modules whose `_extra_state` entry (None) the live model expects, per layer. */
  readonly extraStateModules: (layer: number) => readonly string[];
  /** The same for the layer stacks beyond the decoder (MTP), by full name; on the last stage. */
  readonly blockExtraState?: readonly string[];
}

/**
 * Per-rank `model_optim_rng.pt` files for global targets named as torch_dist names them, but
 * per layer (`decoder.layers.<global>.<param>`), split over TP and PP with local layer numbers.
 */
export function writeMegatronLegacy(globals: ReadonlyMap<string, TargetTensor>, opts: LegacyWriteOptions): OutputFile[] {
  const { tp, pp } = opts;
  const ep = opts.ep ?? 1;
  const etp = opts.etp ?? tp;
  if (etp !== tp && etp !== 1) throw unsupported(`legacy rank files with --etp ${etp} and --tp ${tp}: only etp = tp or etp = 1 have a per-rank file layout shardshift writes; use torch_dist`);
  const numExperts = Math.max(0, ...[...globals.keys()].map((n) => (expertOf(n)?.expert ?? -1) + 1));
  if (numExperts % ep !== 0) throw unsupported(`--ep ${ep} does not divide the ${numExperts} experts`);
  const perRank = numExperts / ep;
  const hasMtp = [...globals.keys()].some((n) => n.startsWith('mtp.'));
  const iterDir = `iter_${String(opts.iteration).padStart(7, '0')}`;
  const files: OutputFile[] = [];
  for (let p = 0; p < pp; p++) {
    const { first, count } = stageLayers(opts.numLayers, pp, p);
    for (let e = 0; e < ep; e++)
    for (let t = 0; t < tp; t++) {
      const model = new PyDict('OrderedDict');
      const storages: Array<{ key: string; tensor: TargetTensor }> = [];
      const put = (name: string, target: TargetTensor): void => {
        const key = String(storages.length);
        storages.push({ key, tensor: target });
        model.set(name, contiguousTensorRef(key, target));
      };
      for (const [name, g] of globals) {
        const m = /^decoder\.layers\.(\d+)\.(.+)$/.exec(name);
        let local: string;
        const ex = expertOf(name);
        if (m) {
          const gl = Number(m[1]);
          if (gl < first || gl >= first + count) continue;
          local = `decoder.layers.${gl - first}.${m[2]}`;
          if (ex) {
            // This EP rank's experts, numbered from 0.
            if (Math.floor(ex.expert / perRank) !== e) continue;
            local = `decoder.layers.${gl - first}.${ex.before.slice(ex.before.indexOf('.', 'decoder.layers.'.length) + 1)}${ex.expert - e * perRank}${ex.after}`;
          }
        } else {
          // Embedding on the first stage, final norm and output layer on the last.
          // With MTP layers the last stage has its own embedding too (megatron-core's GPTModel
          // builds one when pre_process or mtp_process).
          const onFirst = name.startsWith('embedding.');
          if ((onFirst && p !== 0 && !(hasMtp && p === pp - 1)) || (!onFirst && p !== pp - 1)) continue;
          local = name;
          // The MTP layers' experts (last stage) are split over EP ranks like the decoder's.
          if (ex) {
            if (Math.floor(ex.expert / perRank) !== e) continue;
            local = `${ex.before}${ex.expert - e * perRank}${ex.after}`;
          }
        }
        const split = ex && etp === 1 ? 'replicated' : tpSplitOf(name, opts.gateUp(name), opts.shardedNorms);
        const renamed = targetView(g, { name: local });
        const along = split === 'row' ? g.shape[1]! : split === 'gated' ? g.shape[0]! / 2 : g.shape[0]!;
        if (split !== 'replicated' && along % tp !== 0) {
          throw unsupported(`${name} [${g.shape.join(', ')}]: TP ${tp} does not divide its ${along} ${split === 'row' ? 'columns' : split === 'gated' ? 'rows per half' : 'rows'}`, undefined, name);
        }
        if (split === 'replicated') put(local, renamed);
        else if (split === 'column') {
          const n = g.shape[0]! / tp;
          put(local, targetView(sliceTarget(g, 0, t * n, n), { name: local }));
        } else if (split === 'row') {
          const n = g.shape[1]! / tp;
          put(local, targetView(sliceTarget(g, 1, t * n, n), { name: local }));
        } else {
          const half = g.shape[0]! / 2;
          const n = half / tp;
          put(local, concatRows(local, [sliceTarget(g, 0, t * n, n), sliceTarget(g, 0, half + t * n, n)]));
        }
      }
      const extra = (full: string): void => {
        const ex = expertOf(full);
        if (ex && Math.floor(ex.expert / perRank) !== e) return;
        model.set(ex ? `${ex.before}${ex.expert - e * perRank}${ex.after}._extra_state` : `${full}._extra_state`, null);
      };
      for (let l = 0; l < count; l++) for (const mod of opts.extraStateModules(first + l)) extra(`decoder.layers.${l}.${mod}`);
      if (p === pp - 1) for (const full of opts.blockExtraState ?? []) extra(full);
      const args = new PyObject('argparse', 'Namespace', PyDict.from({ ...opts.args, tensor_model_parallel_size: tp, pipeline_model_parallel_size: pp, ...(numExperts ? { expert_model_parallel_size: ep, expert_tensor_parallel_size: etp } : {}) }));
      const root = PyDict.from({ args, checkpoint_version: new PyFloat(3.0), iteration: opts.iteration, model });
      const a = torchArchiveParts('model_optim_rng', root, storages);
      files.push({ relPath: `${iterDir}/${rankDirName(tp, pp, t, p, ep, e)}/${LEGACY_FILE}`, size: a.size, parts: a.parts });
    }
  }
  const tracker = Buffer.from(String(opts.iteration));
  files.push({ relPath: 'latest_checkpointed_iteration.txt', size: tracker.length, parts: [tracker] });
  return files;
}
