/**
 * HF (or Megatron, through its HF names) → NxD / NxD Training shards, and NxD shards → HF
 * safetensors or the converter's full-state `checkpoint.pt`: the use cases of `convert --to nxd`,
 * NxD sources, `nxd-convert` and the `convert/nxd` step. The layout itself is `nxd/layout.ts`.
 */
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { openCheckpoint } from '../checkpoints/registry.js';
import { modelSourceKind } from './sources.js';
import { openMegatronAsHf } from '../bridge/megatron-config.js';
import { openNxdShards, writeNxdShards } from '../nxd/shards.js';
import { writeSafetensors } from '../formats/safetensors.js';
import { writeTorch } from '../formats/torch.js';
import { listSideFiles } from '../formats/side-files.js';
import type { CheckpointSource } from '../formats/types.js';
import type { OutputFile, TargetTensor } from '../lazy/types.js';
import { badInput, usage } from '../util/errors.js';
import type { DType } from '../tensor/dtype.js';
import { castTo, copyOf } from '../lazy/expr.js';
import { checkComplete, filePlan, type ConvertPlan, type ConvertResult, finish } from './convert.js';
import { writeOutput } from '../exec/output.js';
import type { ProgressEvent } from '../exec/executor.js';
import { familyForHfConfig } from '../models/registry.js';
import type { ModelConfig } from '../models/config.js';
import { readNxdConfig, checkLayout, requireHwBackend, LAYER, nxdRoles, nxdRankTargets, assembleHf, hfOrder, type ModelStyle, type NxdLayout, type NxdHeads, type NxdRole } from '../nxd/layout.js';
// ---------------------------------------------------------------------------------------------
// Plans

/** The heads and the family's NxD roles of the model `configPath` describes (or `cfg`, already read). */
async function nxdModel(configPath: string, cfg?: ModelConfig): Promise<{ heads: NxdHeads; roles: Map<string, NxdRole> }> {
  const { heads, json } = await readNxdConfig(configPath);
  return { heads, roles: nxdRoles(cfg ?? familyForHfConfig(json, configPath).fromHf(json, configPath), configPath) };
}

export interface NxdConvertOptions {
  /** config.json (the converter's --config); default: the HF source's own. */
  config?: string;
  modelStyle?: ModelStyle;
  tp?: number;
  pp?: number;
  nLayers?: number;
  kvSizeMultiplier?: number;
  qkvLinear?: boolean;
  fuseQkv?: boolean;
  xser?: boolean;
  hwBackend?: string;
  dtype?: DType;
  /** NxD → HF: a reference HF directory whose config, generation config and tokenizer files are carried. */
  hfModel?: string;
  /** NxD → full state: `checkpoint.pt` (the converter's output) or an HF safetensors directory. */
  fullStateAs?: 'checkpoint.pt' | 'hf';
  /** Recorded in the manifest (the command line as given). */
  command?: string;
  maxMemory?: number;
  maxShardSize?: number;
  overwrite?: boolean;
  hashSource?: boolean;
  dryRun?: boolean;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run; a directory output keeps its finished files for a resume (as after Ctrl-C). */
  signal?: AbortSignal;
}

async function configPathFor(src: string, given: string | undefined): Promise<string> {
  if (given) return given;
  const isDir = await stat(src).then((s) => s.isDirectory(), () => false);
  const c = isDir ? join(src, 'config.json') : join(src, '..', 'config.json');
  if (await stat(c).then((s) => s.isFile(), () => false)) return c;
  throw usage(`${src}: no config.json beside the weights; give the model config (--config / --hf-model)`);
}

/** A directory holding only the converter's full-state `checkpoint.pt` (its --convert_to_full_state output) reads as that file. */
async function fullStatePath(src: string): Promise<string> {
  const names = await readdir(src).catch(() => undefined);
  if (!names || !names.includes('checkpoint.pt')) return src;
  if (names.some((n) => /\.safetensors$|^pytorch_model.*\.bin$|\.index\.json$|\.distcp$/.test(n))) return src;
  return join(src, 'checkpoint.pt');
}

/** HF full state (a directory, one file such as pytorch_model.bin, or the converter's checkpoint.pt) → NxD shards. */
export async function convertHfToNxd(srcPath: string, out: string, opts: NxdConvertOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  // A Megatron source is read through its HF names (lazily); its hf/ (or --hf-model) gives the config.
  const meg = (await modelSourceKind(srcPath)) === 'megatron' ? await openMegatronAsHf(srcPath, { hfModel: opts.hfModel }) : undefined;
  const configPath = meg && !opts.config ? meg.configPath : await configPathFor(srcPath, opts.config);
  const { heads, roles } = await nxdModel(configPath, meg?.cfg).catch(async (e: unknown) => {
    await meg?.source.close();
    throw e;
  });
  const layout: NxdLayout = {
    modelStyle: opts.modelStyle ?? 'hf',
    tp: opts.tp ?? 1,
    pp: opts.pp ?? 1,
    kvSizeMultiplier: opts.kvSizeMultiplier ?? 1,
    qkvLinear: opts.qkvLinear ?? false,
    fuseQkv: opts.fuseQkv ?? false,
    hwBackend: opts.hwBackend ?? 'trn1',
  };
  try {
    requireHwBackend(opts.hwBackend, layout, heads);
    checkLayout(layout, heads);
  } catch (e) {
    await meg?.source.close();
    throw e;
  }
  const src: CheckpointSource = meg ? meg.source : await openCheckpoint(await fullStatePath(srcPath));
  try {
    const targets = new Map<string, TargetTensor>();
    for (const [n, s] of src.tensors) {
      targets.set(n, opts.dtype ? castTo(copyOf(n, s), opts.dtype) : copyOf(n, s));
    }
    const layerCount = new Set([...targets.keys()].map((k) => LAYER.exec(k)?.[1]).filter((x) => x !== undefined)).size;
    if (layerCount !== heads.layers) throw badInput(`${srcPath}: holds ${layerCount} layers, ${configPath} says num_hidden_layers ${heads.layers}`, srcPath);
    if (opts.nLayers && opts.nLayers !== heads.layers) throw usage(`--n_layers ${opts.nLayers} disagrees with num_hidden_layers ${heads.layers} in ${configPath}`);
    if (layerCount < layout.pp) throw usage(`--pp_size ${layout.pp} is larger than the ${layerCount} layers`);
    const ranks: Array<{ tp: number; pp: number; tensors: TargetTensor[] }> = [];
    for (let t = 0; t < layout.tp; t++) for (let p = 0; p < layout.pp; p++) ranks.push({ tp: t, pp: p, tensors: nxdRankTargets(targets, roles, layout, heads, t, p) });
    const files = writeNxdShards(ranks, { xser: !!opts.xser });
    const plan: ConvertPlan = {
      source: { path: srcPath, format: meg ? 'megatron (through its HF names)' : `hf (${src.format})`, tensors: src.tensors.size, bytes: [...src.tensors.values()].reduce((n, x) => n + x.byteLength, 0) },
      target: { path: out, format: `nxd ${layout.modelStyle} style${opts.xser ? ' (xser)' : ''}, tp_size ${layout.tp} × pp_size ${layout.pp}`, kind: 'dir' },
      files: filePlan(files),
      dropped: [],
      skipped: [],
      sideFiles: [],
      totalBytes: files.reduce((n, f) => n + f.size, 0),
      notes: [
        `config ${configPath}: ${heads.q} heads / ${heads.kv} KV heads × ${heads.headDim}, ${heads.layers} layers`,
        layout.qkvLinear
          ? `qkv_linear${layout.fuseQkv ? ' + fuse_qkv' : ''}, kv_size_multiplier ${layout.kvSizeMultiplier}, hw_backend ${layout.hwBackend} (${layout.modelStyle === 'hf' && layout.hwBackend !== 'trn2' ? 'trn1 Q-head order' : 'contiguous Q heads'})`
          : `separate q/k/v (no qkv_linear); hw_backend ${layout.hwBackend} recorded, it changes nothing here`,
        `layers per pp rank: ${Array.from({ length: layout.pp }, (_, p) => ranks.find((r) => r.pp === p)!.tensors.filter((x) => /layers\.\d+\./.test(x.name)).map((x) => Number(/layers\.(\d+)\./.exec(x.name)![1])).filter((v, i, a) => a.indexOf(v) === i).join(',')).join(' | ')}`,
      ],
    };
    return await finish(plan, t0, opts.dryRun, () =>
      writeOutput(srcPath, out, 'dir', files, [], {
        ...opts,
        manifest: { command: opts.command ?? 'convert --to nxd', sourceFormat: plan.source.format, targetFormat: plan.target.format, sourceDir: src.root, sourceFiles: src.dataFiles },
      }),
    );
  } finally {
    await src.close();
  }
}

/** NxD shards as their HF-named full state (a lazy source; closing it closes the shards). */
export async function openNxdAsHf(srcPath: string, opts: NxdConvertOptions): Promise<CheckpointSource> {
  if (!opts.config) throw usage(`${srcPath}: an NxD checkpoint does not record its model config; give config.json (--config, or --hf-model <dir>)`);
  const { heads, roles } = await nxdModel(opts.config);
  const sh = await openNxdShards(srcPath, { tp: opts.tp, pp: opts.pp });
  try {
    const { tensors } = assembleHf(sh, heads, roles, { ...opts });
    return { format: 'nxd', path: srcPath, root: sh.dir, tensors, objects: new Map(), metadata: new Map(), dataFiles: sh.ranks.map((r) => r.file), sideFiles: [], close: () => sh.close() };
  } catch (e) {
    await sh.close();
    throw e;
  }
}

/** NxD shards (a tag directory or its model/) → HF safetensors directory, or the converter's checkpoint.pt. */
export async function convertNxdToHf(srcPath: string, out: string, opts: NxdConvertOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  if (!opts.config) throw usage(`${srcPath}: an NxD checkpoint does not record its model config; give config.json (--config, or --hf-model <dir>)`);
  const { heads, roles } = await nxdModel(opts.config);
  const sh = await openNxdShards(srcPath, { tp: opts.tp, pp: opts.pp });
  try {
    if (opts.xser === true && !sh.xser) throw usage(`${sh.dir}: --load_xser given but the shards have no .tensors folders (not xser)`);
    const { tensors, notes } = assembleHf(sh, heads, roles, { ...opts });
    const targets: TargetTensor[] = [...tensors.keys()].sort(hfOrder).map((n) => {
      const c = copyOf(n, tensors.get(n)!);
      return opts.dtype ? castTo(c, opts.dtype) : c;
    });
    const asCkpt = opts.fullStateAs === 'checkpoint.pt';
    const files: OutputFile[] = asCkpt ? writeTorch(targets, { singleFile: 'checkpoint.pt' }).files : writeSafetensors(targets, { maxShardSize: opts.maxShardSize }).files;
    checkComplete(targets, files);
    const side = asCkpt
      ? []
      : opts.hfModel
        ? (await listSideFiles(opts.hfModel, (n) => /\.(safetensors|bin|pt|pth|distcp)$|\.index\.json$/.test(n))).map((f) => ({ from: join(opts.hfModel!, f), to: f }))
        : [{ from: opts.config, to: 'config.json' }];
    const plan: ConvertPlan = {
      source: { path: srcPath, format: `nxd (${sh.xser ? 'xser' : 'torch.save'})`, tensors: sh.ranks.reduce((n, r) => n + r.tensors.size, 0), bytes: sh.ranks.reduce((n, r) => n + [...r.tensors.values()].reduce((s, x) => s + x.byteLength, 0), 0) },
      target: { path: out, format: asCkpt ? 'full state (checkpoint.pt)' : 'hf (safetensors)', kind: 'dir' },
      files: filePlan(files),
      dropped: [],
      skipped: [],
      sideFiles: side.map((s) => s.to),
      totalBytes: files.reduce((n, f) => n + f.size, 0),
      notes,
    };
    return await finish(plan, t0, opts.dryRun, () =>
      writeOutput(srcPath, out, 'dir', files, side, {
        ...opts,
        manifest: { command: opts.command ?? 'convert --to hf', sourceFormat: plan.source.format, targetFormat: plan.target.format, sourceDir: sh.dir, sourceFiles: sh.ranks.map((r) => r.file) },
      }),
    );
  } finally {
    await sh.close();
  }
}
