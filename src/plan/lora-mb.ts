/**
 * Megatron-Bridge LoRA checkpoints (see src/lora/megatron-bridge.ts):
 *
 * - `exportMbAdapterToPeft` — the adapter alone as a Hugging Face PEFT adapter
 *   (`AutoBridge.export_adapter_ckpt` / NeMo RL `convert_lora_to_hf.py --adapter-only`):
 *   `adapter_config.json` as `build_adapter_config_dict` writes it (json indent 2) and
 *   `adapter_model.safetensors` in fp32 (Megatron-Bridge exports at full precision).
 * - `mergeMbToHf` — base Megatron checkpoint + adapter → merged HF checkpoint (`convert_lora_to_hf.py`
 *   merged mode, `merge_lora backend=megatron_bridge export_hf`): the base is mapped to HF names
 *   and each split LoRA delta added as Megatron-Bridge's `_merge_single_adapter_weight` does —
 *   `(W.float() + alpha/dim · (B.float() @ A.float())).to(W.dtype)` — which is the same rounding
 *   as peft's merge, so the code path is shared with `merge-lora --backend peft`.
 * - `mergeMbToMegatron` — the same deltas added to the fused Megatron tensors (`linear_qkv`,
 *   `linear_fc1` …), written as a torch_dist checkpoint. Every element of a fused tensor gets the
 *   same arithmetic as its HF counterpart, so exporting the merged Megatron checkpoint to HF gives
 *   the merged HF checkpoint byte for byte.
 */
import { join, relative } from 'node:path';
import { stat } from 'node:fs/promises';
import { openMegatron, writeMegatron, commonArgs } from '../megatron/checkpoint.js';
import { iterDirName } from '../megatron/run-dir.js';
import { writeSafetensors } from '../formats/safetensors.js';
import { listSideFiles } from '../formats/side-files.js';
import type { DcpTensorEntry } from '../formats/dcp.js';
import type { OutputFile, TargetTensor } from '../lazy/types.js';
import type { CheckpointSource } from '../formats/types.js';
import { PEFT_PREFIX, type LoraModuleTensors } from '../formats/peft.js';
import { badInput, usage } from '../util/errors.js';
import type { DType } from '../tensor/dtype.js';
import type { PyValue } from '../pickle/values.js';
import { buildExport, type Skipped } from '../bridge/map.js';
import { torchDistExtraState } from '../bridge/megatron-keys.js';
import { familyOf } from '../models/registry.js';
import type { ModelConfig } from '../models/config.js';
import { mergedWeight } from '../lora/merge.js';
import { ADAPTER_RECORD, adapterRecord, baseFingerprint } from '../lora/base-identity.js';
import { MB_TARGETS, asSource, mbToPeftModules, openMbAdapter, type MbAdapter, type MbTarget } from '../lora/megatron-bridge.js';
import { allRows, castTo, rowConcat, produceBox } from '../lazy/expr.js';
import { configFromHfDir } from '../bridge/megatron-config.js';
import { checkComplete, filePlan, type ConvertPlan, type ConvertResult, finish } from './convert.js';
import { writeOutput, type WriteOutputOptions } from '../exec/output.js';
import type { ProgressEvent } from '../exec/executor.js';
import { targetView } from '../lazy/view.js';

export interface MbLoraOptions {
  /** HF model directory of the base (config, tokenizer); default: the base checkpoint's own `hf/`. */
  hfModel?: string;
  /** `base_model_name_or_path` recorded in an exported adapter (default: the --hf-model path as given). */
  baseModelName?: string;
  /** Output dtype (HF exports; default: the base's HF config dtype). */
  dtype?: DType;
  maxMemory?: number;
  maxShardSize?: number;
  overwrite?: boolean;
  /** Keep an output that already is this finished merge (see WriteOutputOptions.reuseComplete). */
  reuseComplete?: boolean;
  dryRun?: boolean;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run; a directory output keeps its finished files for a resume (as after Ctrl-C). */
  signal?: AbortSignal;
}

async function isDir(p: string): Promise<boolean> {
  return stat(p).then(
    (s) => s.isDirectory(),
    () => false,
  );
}

/** The HF reference directory: --hf-model, else `<iter>/hf` of the base checkpoint. */
async function hfDirFor(opts: MbLoraOptions, baseIterDir: string | undefined): Promise<string> {
  if (opts.hfModel) return opts.hfModel;
  if (baseIterDir && (await isDir(join(baseIterDir, 'hf')))) return join(baseIterDir, 'hf');
  throw usage('give --hf-model <HF model directory of the base> (its config.json decides how fused q/k/v and gate/up split)');
}

/**
 * The manifest of a LoRA output: the tensor files of every input (base and adapter), relative to
 * the first input's root. writeOutput stamps them before the run and checks them before the
 * commit, so a base or adapter rewritten while it is read commits nothing.
 */
export function loraManifest(command: string, sourceFormat: string, targetFormat: string, ...inputs: CheckpointSource[]): NonNullable<WriteOutputOptions['manifest']> {
  const sourceDir = inputs[0]!.root;
  return { command, sourceFormat, targetFormat, sourceDir, sourceFiles: inputs.flatMap((s) => s.dataFiles.map((f) => relative(sourceDir, join(s.root, f)))) };
}

/** Python `json.dumps(obj, indent=2)` for the adapter config (floats marked). */
class PyFloatValue {
  constructor(readonly v: number) {}
}
function pyJson(v: unknown, ind = ''): string {
  const next = `${ind}  `;
  if (v instanceof PyFloatValue) return Number.isInteger(v.v) ? `${v.v}.0` : String(v.v);
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'string' || typeof v === 'boolean' || typeof v === 'number') return JSON.stringify(v);
  if (Array.isArray(v)) return v.length ? `[\n${v.map((x) => next + pyJson(x, next)).join(',\n')}\n${ind}]` : '[]';
  const e = Object.entries(v as Record<string, unknown>);
  return e.length ? `{\n${e.map(([k, x]) => `${next}${JSON.stringify(k)}: ${pyJson(x, next)}`).join(',\n')}\n${ind}}` : '{}';
}

/** adapter_config.json as Megatron-Bridge's `build_adapter_config_dict` + `json.dump(indent=2)`. */
export function mbAdapterConfigJson(a: MbAdapter, targetModules: readonly string[], baseModelName: string): string {
  const alpha = a.config.alpha;
  return pyJson({
    peft_type: 'LORA',
    auto_mapping: null,
    base_model_name_or_path: baseModelName,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    lora_alpha: Number.isInteger(alpha) ? alpha : new PyFloatValue(alpha),
    lora_dropout: new PyFloatValue(a.config.dropout),
    modules_to_save: null,
    r: a.config.dim,
    rank_pattern: {},
    alpha_pattern: {},
    target_modules: [...targetModules],
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: false,
  });
}

function baseNotes(a: MbAdapter, c: ModelConfig): string[] {
  const byTarget = new Map<string, number>();
  for (const m of a.modules) byTarget.set(m.target, (byTarget.get(m.target) ?? 0) + 1);
  return [
    `adapter: Megatron-Bridge LoRA (${a.config.target}), dim ${a.config.dim}, alpha ${a.config.alpha} (scaling ${a.config.alpha / a.config.dim}), from ${a.runConfigPath}`,
    `adapted: ${[...byTarget].map(([t, n]) => `${t} ×${n}`).join(', ')} over ${c.numLayers} layers (${c.family})`,
  ];
}

/** Megatron-Bridge adapter → Hugging Face PEFT adapter directory. */
export async function exportMbAdapterToPeft(adapterPath: string, out: string, opts: MbLoraOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  const a = await openMbAdapter(adapterPath);
  try {
    const hfDir = await hfDirFor(opts, undefined);
    const c = await configFromHfDir(hfDir);
    const mods = mbToPeftModules(c, a);
    const tensors: TargetTensor[] = [];
    for (const m of mods) {
      for (const [t, what] of [
        [m.a, 'lora_A'],
        [m.b, 'lora_B'],
      ] as const) {
        const src: TargetTensor = { kind: 'produced', name: `${PEFT_PREFIX}${m.name}.${what}.weight`, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, produce: (b, o) => t.read(b, o), describe: t.where };
        tensors.push(castTo(src, 'F32'));
      }
    }
    const targetModules = [...new Set(mods.map((m) => m.name.slice(m.name.lastIndexOf('.') + 1)))].sort();
    const st = writeSafetensors(tensors, { singleFile: 'adapter_model.safetensors', metadata: new Map() });
    const baseName = opts.baseModelName ?? opts.hfModel ?? hfDir;
    const cfgBytes = Buffer.from(mbAdapterConfigJson(a, targetModules, baseName));
    const files: OutputFile[] = [{ relPath: 'adapter_config.json', size: cfgBytes.length, parts: [cfgBytes] }, ...st.files];
    const fp = await baseFingerprint(hfDir);
    if (fp) {
      const rec = adapterRecord(baseName, fp);
      files.push({ relPath: ADAPTER_RECORD, size: rec.length, parts: [rec] });
    }
    checkComplete(tensors, files);
    const plan: ConvertPlan = {
      source: { path: adapterPath, format: 'megatron-bridge lora (torch_dist)', tensors: a.checkpoint.source.tensors.size, bytes: [...a.checkpoint.source.tensors.values()].reduce((s, t) => s + t.byteLength, 0) },
      target: { path: out, format: 'peft lora adapter', kind: 'dir' },
      files: filePlan(files),
      dropped: [],
      skipped: a.skipped,
      sideFiles: [],
      totalBytes: files.reduce((s, f) => s + f.size, 0),
      notes: [
        ...baseNotes(a, c),
        `PEFT modules: ${targetModules.join(', ')} (fused linear_qkv / linear_fc1 split by linear_out rows; linear_in shared, written under each module's lora_A)`,
        'factors written as F32 (Megatron-Bridge exports at full precision)',
        fp ? `base checksum of ${hfDir}'s weight files recorded in ${ADAPTER_RECORD} (checked by merge-lora)` : `${hfDir} holds no weights: no base checksum recorded`,
      ],
    };
    return await finish(plan, t0, opts.dryRun, () =>
      writeOutput(a.checkpoint.resolved.iterDir, out, 'dir', files, [], { overwrite: opts.overwrite, maxMemory: opts.maxMemory, onProgress: opts.onProgress, signal: opts.signal, manifest: loraManifest('export-adapter', plan.source.format, plan.target.format, a.checkpoint.source) }),
    );
  } finally {
    await a.close();
  }
}

function hfDtype(cfg: Readonly<Record<string, unknown>> | undefined): DType {
  const s = (cfg?.torch_dtype ?? cfg?.dtype) as string | undefined;
  return s === 'float32' ? 'F32' : s === 'float16' ? 'F16' : 'BF16';
}

/** Base Megatron checkpoint + Megatron-Bridge adapter → merged HF checkpoint. */
export async function mergeMbToHf(basePath: string, adapterPath: string, out: string, opts: MbLoraOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  const a = await openMbAdapter(adapterPath);
  try {
    const meg = await openMegatron(basePath);
    try {
      const hfDir = await hfDirFor(opts, meg.resolved.iterDir);
      const c = await configFromHfDir(hfDir);
      const mods = new Map(mbToPeftModules(c, a).map((m) => [`${m.name}.weight`, m]));
      const qkv = meg.source.tensors.get('decoder.layers.self_attention.linear_qkv.weight') ?? meg.source.tensors.get('decoder.layers.0.self_attention.linear_qkv.weight');
      if (!qkv) throw badInput(`${basePath}: no decoder.layers.self_attention.linear_qkv.weight; --base must be the dense Megatron base the adapter was trained on`, basePath);
      const storedDtype = qkv.dtype;
      const outDtype = opts.dtype ?? hfDtype(c.hf);
      const { tensors: bases, skipped } = buildExport(c, meg.source, { dtype: storedDtype });
      const scaling = a.config.alpha / a.config.dim;
      const used = new Set<string>();
      const tensors = bases.map((t) => {
        const m = mods.get(t.name);
        if (!m) return castTo(t, outDtype);
        used.add(t.name);
        return castTo(mergedWeight({ name: t.name, base: t, module: m, layout: 'out-in', scaling, rounding: { roundDelta: false }, describe: `${t.describe} + lora(${m.a.where}, ${m.b.where}) × ${scaling}` }), outDtype);
      });
      const missing = [...mods.keys()].filter((n) => !used.has(n));
      if (missing.length) throw badInput(`${basePath}: the base has no ${missing.slice(0, 4).join(', ')} for the adapter`, basePath);
      const report = writeSafetensors(tensors, { maxShardSize: opts.maxShardSize });
      checkComplete(tensors, report.files);
      const side = await listSideFiles(hfDir, (n) => n.endsWith('.safetensors') || n.endsWith('.index.json') || n.endsWith('.bin') || n.endsWith('.pt'));
      const plan: ConvertPlan = {
        source: { path: basePath, format: 'megatron torch_dist + megatron-bridge lora', tensors: meg.source.tensors.size, bytes: [...meg.source.tensors.values()].reduce((s, t) => s + t.byteLength, 0) },
        target: { path: out, format: 'hf (safetensors)', kind: 'dir' },
        files: filePlan(report.files),
        dropped: [],
        skipped: [...skipped, ...a.skipped],
        sideFiles: side,
        totalBytes: report.files.reduce((s, f) => s + f.size, 0),
        notes: [
          ...baseNotes(a, c),
          `rounding as Megatron-Bridge's HF export (_merge_single_adapter_weight): (W.float() + ${scaling} · (B.float() @ A.float())) rounded once to ${storedDtype}${outDtype !== storedDtype ? `, then cast to ${outDtype}` : ''}`,
          `config and tokenizer from ${hfDir}`,
        ],
      };
      return await finish(plan, t0, opts.dryRun, () =>
        writeOutput(meg.resolved.iterDir, out, 'dir', report.files, side.map((s) => ({ from: join(hfDir, s), to: s })), { overwrite: opts.overwrite, maxMemory: opts.maxMemory, onProgress: opts.onProgress, signal: opts.signal, manifest: loraManifest('lora-to-hf', plan.source.format, plan.target.format, meg.source, a.checkpoint.source) }),
      );
    } finally {
      await meg.source.close();
    }
  } finally {
    await a.close();
  }
}

/** A target viewed with a leading dim of 1 (one layer's chunk of a stacked tensor). */
function withLeadingOne(t: TargetTensor): TargetTensor {
  return targetView(t, { shape: [1, ...t.shape], produce: (box, o) => produceBox(t, { start: box.start.slice(1), size: box.size.slice(1) }, o) });
}

/** Base Megatron checkpoint + Megatron-Bridge adapter → merged Megatron torch_dist checkpoint. */
export async function mergeMbToMegatron(basePath: string, adapterPath: string, out: string, opts: MbLoraOptions & { iteration?: number } = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  const a = await openMbAdapter(adapterPath);
  try {
    const meg = await openMegatron(basePath);
    try {
      const src = meg.source;
      const hfDir = await hfDirFor(opts, meg.resolved.iterDir);
      const c = await configFromHfDir(hfDir);
      mbToPeftModules(c, a); // shape checks against the model config
      const scaling = a.config.alpha / a.config.dim;
      const byKey = new Map(a.modules.map((m) => [`${m.layer}:${m.target}`, m]));
      const entries: DcpTensorEntry[] = [];
      const merged = new Set<string>();
      const skipped: Skipped[] = [];
      const fused = (layer: number, target: MbTarget, base: TargetTensor): TargetTensor => {
        const m = byKey.get(`${layer}:${target}`);
        if (!m) return base;
        merged.add(`${layer}:${target}`);
        const colsIn = base.shape[1]!;
        const at = (f: typeof m.linearIn, cols: number, nm: string): LoraModuleTensors['a'] =>
          asSource(rowConcat(nm, f.src.dtype, [cols], [allRows(f.src, [...f.prefix])], `${f.src.name}${f.prefix.length ? `[${layer}]` : ''}`));
        const mod: LoraModuleTensors = {
          name: `decoder.layers.${layer}.${target}`,
          kind: 'linear',
          a: at(m.linearIn, colsIn, `${m.linearIn.src.name}[${layer}]`),
          b: at(m.linearOut, a.config.dim, `${m.linearOut.src.name}[${layer}]`),
        };
        return mergedWeight({ name: base.name, base, module: mod, layout: 'out-in', scaling, rounding: { roundDelta: false }, describe: `${base.describe} + lora(${mod.a.where}, ${mod.b.where}) × ${scaling}` });
      };
      const TARGET_RE = new RegExp(`^decoder\\.layers\\.(?:(\\d+)\\.)?(${MB_TARGETS.map((x) => x.replace(/\./g, '\\.')).join('|')})\\.weight$`);
      for (const t of src.tensors.values()) {
        if (/_extra_state/.test(t.name) || /^optimizer\.|^rng_state|^chained_\d+\.optimizer\./.test(t.name)) {
          skipped.push({ name: t.name, reason: 'not model weights (regenerated or dropped)', carriesData: false });
          continue;
        }
        const m = TARGET_RE.exec(t.name);
        const copyWhole: TargetTensor = { kind: 'produced', name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, produce: (b, o) => t.read(b, o), describe: t.where };
        if (!m) {
          entries.push({ name: t.name, dtype: t.dtype, shape: t.shape, chunks: [{ offsets: t.shape.map(() => 0), tensor: copyWhole }] });
          continue;
        }
        const target = m[2] as MbTarget;
        if (m[1] !== undefined) {
          const layer = Number(m[1]);
          const base = rowConcat(t.name, t.dtype, t.shape.slice(1), [allRows(t)], t.where);
          entries.push({ name: t.name, dtype: t.dtype, shape: t.shape, chunks: [{ offsets: t.shape.map(() => 0), tensor: fused(layer, target, base) }] });
          continue;
        }
        const L = t.shape[0]!;
        const chunks = Array.from({ length: L }, (_, i) => {
          const base = rowConcat(t.name, t.dtype, t.shape.slice(2), [allRows(t, [i])], `${t.where}[${i}]`);
          return { offsets: [i, ...t.shape.slice(1).map(() => 0)], tensor: withLeadingOne(fused(i, target, base)) };
        });
        entries.push({ name: t.name, dtype: t.dtype, shape: t.shape, chunks });
      }
      const notMerged = a.modules.filter((m) => !merged.has(`${m.layer}:${m.target}`));
      if (notMerged.length) throw badInput(`${basePath}: the base has no ${notMerged.slice(0, 4).map((m) => `decoder.layers.${m.layer}.${m.target}.weight`).join(', ')} for the adapter`, basePath);
      const args: Record<string, PyValue> = {};
      const ca = commonArgs(meg.common);
      if (ca) for (const [k, v] of ca.entries) if (typeof k === 'string') args[k] = v;
      const iteration = opts.iteration ?? (typeof meg.resolved.iteration === 'number' ? meg.resolved.iteration : 0);
      const files = writeMegatron(entries, { iteration, args, objects: torchDistExtraState(familyOf(c), c) });
      checkComplete(entries.flatMap((e) => e.chunks.map((ch) => ch.tensor)), files);
      const iterDir = iterDirName(iteration);
      const side = await listSideFiles(hfDir, (n) => n.endsWith('.safetensors') || n.endsWith('.index.json') || n.endsWith('.bin') || n.endsWith('.pt'));
      const plan: ConvertPlan = {
        source: { path: basePath, format: 'megatron torch_dist + megatron-bridge lora', tensors: src.tensors.size, bytes: [...src.tensors.values()].reduce((s, t) => s + t.byteLength, 0) },
        target: { path: out, format: 'megatron torch_dist', kind: 'dir' },
        files: filePlan(files),
        dropped: [],
        skipped: [...skipped, ...a.skipped],
        sideFiles: side.map((s) => `${iterDir}/hf/${s}`),
        totalBytes: files.reduce((s, f) => s + f.size, 0),
        notes: [...baseNotes(a, c), `merged into the fused tensors in fp32, rounded once to each tensor's dtype; common.pt args carried from the base; HF config and tokenizer kept under ${iterDir}/hf/`],
      };
      return await finish(plan, t0, opts.dryRun, () =>
        writeOutput(meg.resolved.iterDir, out, 'dir', files, side.map((s) => ({ from: join(hfDir, s), to: `${iterDir}/hf/${s}` })), { overwrite: opts.overwrite, reuseComplete: opts.reuseComplete, maxMemory: opts.maxMemory, onProgress: opts.onProgress, signal: opts.signal, manifest: loraManifest('merge-lora --backend megatron-bridge', plan.source.format, plan.target.format, src, a.checkpoint.source) }),
      );
    } finally {
      await meg.source.close();
    }
  } finally {
    await a.close();
  }
}
