/**
 * NeMo RL policy checkpoints → Hugging Face (what `examples/converters/convert_dcp_to_hf.py`
 * does, without torch): a run writes `results/<algo>/step_N/` with `config.yaml`,
 * `policy/weights/`, `policy/optimizer/` and `policy/tokenizer/`. The weights come in three
 * layouts, all read here:
 *
 * - DTensor v1 (NeMo RL ≤ 0.7): a DCP checkpoint saved as `dcp.save({"model": ModelState})`, so
 *   every key is the HF state-dict key under a `model` wrapper (`planner_data` path
 *   `("model", "model.layers.0…")`);
 * - DTensor v2 (Automodel): a DCP checkpoint under `policy/weights/model/` with the HF keys flat;
 * - the Megatron backend: `policy/weights/iter_0000000/`, a torch_dist checkpoint (exported
 *   through the model map).
 *
 * The model name (for config.json) comes from `--hf-model-name` or `policy.model_name` in
 * config.yaml; the tokenizer from the run's `policy/tokenizer/` when present, else the model's.
 * Optimizer state is skipped by name; every weight must fit the model's config.
 */
import { stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { openDcp } from '../formats/dcp.js';
import { isMegatronPath } from '../megatron/run-dir.js';
import { writeSafetensors } from '../formats/safetensors.js';
import { listSideFiles } from '../formats/side-files.js';
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import { PyTuple } from '../pickle/values.js';
import type { DType } from '../tensor/dtype.js';
import { badInput, usage } from '../util/errors.js';
import { buildImport } from '../bridge/map.js';
import { castTo, copyOf } from '../lazy/expr.js';
import { checkComplete, filePlan, type ConvertPlan, type ConvertResult, finish } from './convert.js';
import { convertMegatronToHf } from './model-convert.js';
import { configFromHfDir, withHfLayout } from '../bridge/megatron-config.js';
import { writeOutput } from '../exec/output.js';
import type { ProgressEvent } from '../exec/executor.js';
import { readTextFile } from '../io/file.js';
import { resolveModel } from '../hub/download.js';

export interface DcpToHfOptions {
  /** NeMo RL's config.yaml (for policy.model_name). */
  config?: string;
  /** Overrides the model name from config.yaml. */
  hfModelName?: string;
  /** Resolves a model id or directory to a local directory (config and tokenizer); default: the hub client's (a local directory as is, a hub id downloaded into the cache). */
  resolveModel?: (idOrPath: string) => Promise<string>;
  dtype?: DType;
  /** Skip weights the model map has no place for (listed) instead of failing. */
  allowUnmapped?: boolean;
  maxMemory?: number;
  maxShardSize?: number;
  overwrite?: boolean;
  dryRun?: boolean;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run; a directory output keeps its finished files for a resume (as after Ctrl-C). */
  signal?: AbortSignal;
}

const exists = (p: string): Promise<boolean> =>
  stat(p).then(
    () => true,
    () => false,
  );

async function modelNameFromConfig(path: string): Promise<string> {
  let doc: unknown;
  try {
    doc = parseYaml(await readTextFile(path));
  } catch (e) {
    throw badInput(`${path}: cannot read it as YAML (${(e as Error).message})`, path);
  }
  const name = (doc as { policy?: { model_name?: unknown } } | null)?.policy?.model_name;
  if (typeof name !== 'string' || !name) throw badInput(`${path}: has no policy.model_name; pass --hf-model-name`, path);
  return name;
}


const OPTIMIZER = /^(optim|optimizer)(\.|$)/;

export async function convertDcpToHf(dcpPath: string, out: string, opts: DcpToHfOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  if (!(await exists(dcpPath))) throw usage(`${dcpPath}: no such directory`);
  const stepDir = basename(dcpPath) === 'weights' ? dirname(dirname(dcpPath)) : dirname(dcpPath);
  const configPath = opts.config ?? ((await exists(join(stepDir, 'config.yaml'))) ? join(stepDir, 'config.yaml') : undefined);
  const modelName = opts.hfModelName ?? (configPath ? await modelNameFromConfig(configPath) : undefined);
  if (!modelName) throw usage(`${dcpPath}: no model name: pass --config <run's config.yaml> or --hf-model-name`);
  const modelDir = await (opts.resolveModel ?? ((id: string) => resolveModel(id, 'config')))(modelName);
  const tokenizerDir = (await exists(join(dcpPath, '..', 'tokenizer'))) ? join(dcpPath, '..', 'tokenizer') : undefined;

  // Megatron-backend runs: policy/weights/iter_0000000 (torch_dist).
  const megCandidates = [dcpPath, ...(await exists(join(dcpPath, 'iter_0000000')) ? [join(dcpPath, 'iter_0000000')] : [])];
  for (const c of megCandidates) {
    if ((await isMegatronPath(c)) && !(await exists(join(c, 'model', '.metadata')))) {
      const r = await convertMegatronToHf(c, out, { hfModel: modelDir, dtype: opts.dtype, maxMemory: opts.maxMemory, maxShardSize: opts.maxShardSize, overwrite: opts.overwrite, dryRun: opts.dryRun, onProgress: opts.onProgress });
      return { ...r, plan: { ...r.plan, notes: [...(r.plan.notes ?? []), 'NeMo RL Megatron-backend weights (torch_dist)'] } };
    }
  }
  const v2 = await exists(join(dcpPath, 'model', '.metadata'));
  const weightsDir = v2 ? join(dcpPath, 'model') : dcpPath;
  if (!(await exists(join(weightsDir, '.metadata')))) {
    throw badInput(`${dcpPath}: no weights: neither ${join(dcpPath, '.metadata')} (DTensor v1) nor ${join(dcpPath, 'model', '.metadata')} (DTensor v2) nor an iter_* Megatron checkpoint`, dcpPath);
  }
  const src = await openDcp(weightsDir);
  try {
    const names = [...src.tensors.keys()];
    const optimizer = names.filter((n) => OPTIMIZER.test(n));
    const weights = names.filter((n) => !OPTIMIZER.test(n));
    if (weights.length === 0) {
      throw badInput(`${weightsDir}: holds no model weights${optimizer.length ? ` — only optimizer state (${optimizer.slice(0, 3).join(', ')}, …); point at policy/weights, not policy/optimizer` : ''}`, weightsDir);
    }
    // v1 wraps under "model": planner_data paths ("model", key), or every key prefixed "model.".
    const wrapped = !v2 && weights.every((n) => n.startsWith('model.')) && (isWrapped(src) || weights.some((n) => n.startsWith('model.model.') || n === 'model.lm_head.weight'));
    const cfg = await configFromHfDir(modelDir);
    // HF-named view of the weights, checked against the config by the model map.
    const view = new Map<string, SourceTensor>();
    for (const n of weights) {
      const t = src.tensors.get(n)!;
      const key = wrapped ? n.slice('model.'.length) : n;
      view.set(key, { name: key, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, where: t.where, read: (b, o) => t.read(b, o) });
    }
    const hfView: CheckpointSource = { ...src, tensors: view };
    const { skipped } = buildImport(withHfLayout(cfg, hfView), hfView, { tp: 1, makeVocabSizeDivisibleBy: 1, dtype: 'BF16', allowUnmapped: opts.allowUnmapped });
    const targets: TargetTensor[] = [...view.values()].filter((t) => !skipped.some((s) => s.name === t.name)).map((t) => (opts.dtype ? castTo(copyOf(t.name, t), opts.dtype) : copyOf(t.name, t)));
    const report = writeSafetensors(targets, { maxShardSize: opts.maxShardSize });
    checkComplete(targets, report.files);
    const modelSide = await listSideFiles(modelDir, (n) => /\.(safetensors|bin|pt|pth)$|\.index\.json$/.test(n));
    const tokSide = tokenizerDir ? await listSideFiles(tokenizerDir, () => false) : [];
    const copies = [
      // The run's own tokenizer wins over the model's (provenance), config from the model.
      ...tokSide.map((s) => ({ from: join(tokenizerDir!, s), to: s })),
      ...modelSide.filter((s) => !tokSide.includes(s)).map((s) => ({ from: join(modelDir, s), to: s })),
    ];
    const plan: ConvertPlan = {
      source: { path: dcpPath, format: `NeMo RL DCP (${v2 ? 'DTensor v2, policy/weights/model' : wrapped ? 'DTensor v1, wrapped under "model"' : 'flat keys'})`, tensors: src.tensors.size, bytes: [...src.tensors.values()].reduce((n, t) => n + t.byteLength, 0) },
      target: { path: out, format: 'hf (safetensors)', kind: 'dir' },
      files: filePlan(report.files),
      dropped: [],
      skipped: [...optimizer.map((name) => ({ name, reason: 'optimizer state', carriesData: false })), ...skipped],
      sideFiles: copies.map((c) => c.to),
      totalBytes: report.files.reduce((n, f) => n + f.size, 0),
      notes: [`model ${modelName} (${cfg.family}) from ${opts.hfModelName ? '--hf-model-name' : configPath}`, tokenizerDir ? `tokenizer from ${tokenizerDir}` : `tokenizer from ${modelName}`],
    };
    return await finish(plan, t0, opts.dryRun, () =>
      writeOutput(dcpPath, out, 'dir', report.files, copies, {
        ...opts,
        manifest: { command: 'dcp-to-hf', sourceFormat: plan.source.format, targetFormat: 'hf (safetensors)', sourceDir: src.root, sourceFiles: src.dataFiles },
      }),
    );
  } finally {
    await src.close();
  }
}

/** DTensor v1: the planner recorded each key's path as ("model", "<HF key>"). */
function isWrapped(src: CheckpointSource): boolean {
  // The DCP reader rebuilt planner_data into a tree: a single top-level "model" dict.
  const tree = src.tree;
  if (!tree || !(typeof tree === 'object')) return false;
  const d = tree as { size?: number; get?: (k: string) => unknown };
  return d.size === 1 && d.get?.('model') !== undefined && !(d.get?.('model') instanceof PyTuple);
}
