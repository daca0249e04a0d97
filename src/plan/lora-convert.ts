/**
 * `merge-lora` (PEFT backend): a PEFT LoRA adapter merged into the exact HF base it was trained on,
 * written as an HF checkpoint (sharded safetensors as save_pretrained writes them, config and
 * tokenizer carried from the base).
 *
 * Plan first, as `convert` does: every adapter tensor must be used (a LoRA factor of a module the
 * config targets, a DoRA magnitude, a lora_B bias, or a whole tensor replacing one the base has),
 * every module the config targets must carry LoRA tensors, every shape must fit the base — else one
 * error lists what is wrong — before a byte is written. The base's recorded identity
 * (`base_model_name_or_path`) is checked too; `--force-base` waives only that check.
 */
import { stat, realpath } from 'node:fs/promises';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { openCheckpoint } from '../checkpoints/registry.js';
import { openPeftAdapter, PEFT_PREFIX, type LoraModuleTensors, type PeftAdapter } from '../formats/peft.js';
import { writeSafetensors } from '../formats/safetensors.js';
import { listSideFiles } from '../formats/side-files.js';
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import { badInput, unsupported, usage } from '../util/errors.js';
import type { DType } from '../tensor/dtype.js';
import { moduleScaling, targetStatus } from '../lora/match.js';
import { mergedBias, mergedWeight, type MergeRounding, type WeightLayout } from '../lora/merge.js';
import { castTo } from '../lazy/expr.js';
import { ADAPTER_RECORD, baseFingerprint, checkRecordedBase } from '../lora/base-identity.js';
import { checkComplete, type ConvertPlan, type ConvertResult, finish } from './convert.js';
import { writeOutput } from '../exec/output.js';
import { loraManifest } from './lora-mb.js';
import type { ProgressEvent } from '../exec/executor.js';
import { readTextFile } from '../io/file.js';

export interface MergeLoraOptions {
  /** Waive the base_model_name_or_path identity check (never the shape checks). */
  forceBase?: boolean;
  /** Merge into the base loaded in this dtype (as `from_pretrained(dtype=…)`); default: as stored. */
  dtype?: DType;
  /** Emulate `merge_and_unload(safe_merge=True)`: ΔW rounded to the base dtype before the add. */
  safeMerge?: boolean;
  maxMemory?: number;
  maxShardSize?: number;
  overwrite?: boolean;
  dryRun?: boolean;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run; a directory output keeps its finished files for a resume (as after Ctrl-C). */
  signal?: AbortSignal;
}

/** transformers models whose projections are GPT-2 `Conv1D` (weight stored [in, out]). */
const CONV1D_MODEL_TYPES = new Set(['gpt2', 'openai-gpt', 'imagegpt', 'decision_transformer']);
const CONV1D_NAMES = new Set(['c_attn', 'q_attn', 'c_proj', 'c_fc']);

function isFloat(d: DType): boolean {
  return d === 'F32' || d === 'F16' || d === 'BF16';
}

function sourceTarget(t: SourceTensor, name = t.name): TargetTensor {
  return { kind: 'produced', name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, produce: (b, o) => t.read(b, o), describe: t.where };
}

const shapeStr = (s: readonly number[]): string => `[${s.join(', ')}]`;

async function readBaseConfig(dir: string): Promise<Record<string, unknown>> {
  const file = join(dir, 'config.json');
  let text: string;
  try {
    text = await readTextFile(file);
  } catch {
    throw badInput(`${dir}: no config.json; --base must be the HF model directory the adapter was trained on`, file);
  }
  try {
    const j = JSON.parse(text) as unknown;
    if (typeof j !== 'object' || j === null || Array.isArray(j)) throw new Error('not an object');
    return j as Record<string, unknown>;
  } catch (e) {
    throw badInput(`${file}: not a JSON object (${(e as Error).message})`, file);
  }
}

/** The last component of a path or hub id, for identity comparison. */
function idName(s: string): string {
  return basename(s.replace(/[\\/]+$/, '')).toLowerCase();
}

/**
 * A local directory as `base_model_name_or_path` (what peft records when the base was loaded
 * from disk, relative to the working directory as peft resolves it): compare contents, not
 * names — two fine-tunes saved as `…/base` must not pass for each other. Undefined when it does
 * not apply: no such directory, no weights to compare, or an adapter shardshift exported (its
 * base checksum is checked file by file by `checkRecordedBase`).
 */
async function checkLocalBase(adapter: PeftAdapter, want: string, baseDir: string, force: boolean): Promise<string | undefined> {
  if (await stat(join(dirname(adapter.config.file), ADAPTER_RECORD)).then(() => true, () => false)) return undefined;
  if (!(await stat(want).then((st) => st.isDirectory(), () => false))) return undefined;
  if ((await realpath(want)) === (await realpath(baseDir))) return `base identity: base_model_name_or_path "${want}" is the base directory itself`;
  const [a, b] = [await baseFingerprint(want), await baseFingerprint(baseDir)];
  if (!a || !b) return undefined;
  const same = a.files.length === b.files.length && a.files.every((f, i) => f.path === b.files[i]!.path && f.size === b.files[i]!.size && f.hash === b.files[i]!.hash);
  if (same) return `base identity: the base's weight files equal those of base_model_name_or_path "${want}" (size and ${a.files[0]?.hashKind ?? 'hash'})`;
  if (force) return `base identity: the base's weight files differ from those of base_model_name_or_path "${want}"; merged anyway (--force-base)`;
  throw badInput(
    `${adapter.config.file}: the adapter was trained on the local base "${want}", and ${baseDir} holds other weights (${a.files.length} vs ${b.files.length} files, or other sizes / contents); pass --force-base if it is the same model stored differently (shapes are checked regardless)`,
    adapter.config.file,
  );
}

/** Checks the adapter's recorded base against the base directory; returns a note for the plan. */
async function checkIdentity(adapter: PeftAdapter, baseDir: string, baseCfg: Record<string, unknown>, force: boolean): Promise<string> {
  const want = adapter.config.baseModelNameOrPath;
  if (want === null) return 'base identity: the adapter records no base_model_name_or_path (shapes checked only)';
  const local = await checkLocalBase(adapter, want, baseDir, force);
  if (local) return local;
  const names = new Map<string, string>();
  for (const p of [await realpath(baseDir), resolve(baseDir)]) {
    names.set(idName(p), 'directory name');
    // a Hugging Face cache snapshot: …/models--<org>--<name>/snapshots/<revision>
    const cache = /(?:^|[\\/])models--[^\\/]*?--([^\\/]+)[\\/]snapshots[\\/][^\\/]+[\\/]?$/.exec(p);
    if (cache) names.set(cache[1]!.toLowerCase(), 'Hugging Face cache directory');
  }
  const np = baseCfg._name_or_path;
  if (typeof np === 'string' && np) names.set(idName(np), 'config.json _name_or_path');
  const hit = names.get(idName(want));
  if (hit) return `base identity: base_model_name_or_path "${want}" matches the base's ${hit}`;
  if (force) return `base identity: base_model_name_or_path "${want}" does not match the base (${[...names.keys()].join(', ')}); merged anyway (--force-base)`;
  throw badInput(
    `${adapter.config.file}: the adapter was trained on base_model_name_or_path "${want}", but the base ${baseDir} is named ${[...new Set(names.keys())].map((n) => `"${n}"`).join(' / ')} (${[...new Set(names.values())].join(', ')}); if it is the same model under another name, pass --force-base (shapes are checked regardless)`,
    adapter.config.file,
  );
}

interface Resolved {
  readonly module: LoraModuleTensors;
  readonly weight: string;
  readonly layout: WeightLayout;
  readonly scaling: number;
  readonly r: number;
  readonly alpha: number;
}

/** Works out, for every LoRA module, the base weight it merges into, its layout and scaling; collects every problem. */
function resolveModules(adapter: PeftAdapter, base: CheckpointSource, modelType: string, problems: { shapes: string[]; notFound: string[]; other: string[] }): Resolved[] {
  const cfg = adapter.config;
  const out: Resolved[] = [];
  const conv1dModel = CONV1D_MODEL_TYPES.has(modelType);
  for (const m of adapter.modules.values()) {
    const status = targetStatus(cfg, m.name);
    if (status !== true) {
      problems.other.push(`${PEFT_PREFIX}${m.name}: LoRA tensors for a module adapter_config.json does not target (${status})`);
      continue;
    }
    const weight = `${m.name}.weight`;
    const w = base.tensors.get(weight);
    if (!w) {
      problems.notFound.push(m.name);
      continue;
    }
    const { r, alpha, scaling } = moduleScaling(cfg, m.name);
    const [ra, inA] = m.a.shape as [number, number];
    const [outB, rb] = m.b.shape as [number, number];
    if (m.a.shape.length !== 2 || m.b.shape.length !== 2) {
      problems.shapes.push(`${m.name}: LoRA factors must be 2-D (A ${shapeStr(m.a.shape)}, B ${shapeStr(m.b.shape)})`);
      continue;
    }
    if (ra !== rb) {
      problems.shapes.push(`${m.name}: rank mismatch: ${m.kind === 'linear' ? 'lora_A' : 'lora_embedding_A'} ${shapeStr(m.a.shape)} has rank ${ra} but ${m.kind === 'linear' ? 'lora_B' : 'lora_embedding_B'} ${shapeStr(m.b.shape)} has rank ${rb}`);
      continue;
    }
    if (ra !== r) {
      problems.shapes.push(`${m.name}: adapter_config.json gives rank ${r} (r / rank_pattern) but the LoRA tensors have rank ${ra}`);
      continue;
    }
    for (const [t, what] of [
      [m.a, 'A'],
      [m.b, 'B'],
    ] as const) {
      if (!isFloat(t.dtype)) problems.other.push(`${t.name}: lora_${what} is ${t.dtype}; LoRA factors must be F32, BF16 or F16`);
    }
    if (!isFloat(w.dtype)) {
      problems.other.push(`${weight}: base weight is ${w.dtype}; only F32/BF16/F16 bases can be merged into (a quantized base needs dequantizing first)`);
      continue;
    }
    let layout: WeightLayout;
    let need: [number, number];
    if (m.kind === 'embedding') {
      layout = 'in-out';
      need = [inA, outB];
    } else {
      const last = m.name.slice(m.name.lastIndexOf('.') + 1);
      let conv1d = conv1dModel && CONV1D_NAMES.has(last);
      if (!conv1dModel && cfg.fanInFanOut) {
        // An architecture shardshift does not know: only the shape can tell a Conv1D from a Linear.
        const asLinear = w.shape[0] === outB && w.shape[1] === inA;
        const asConv = w.shape[0] === inA && w.shape[1] === outB;
        if (asLinear && asConv) {
          problems.other.push(`${m.name}: fan_in_fan_out is set and the weight is square ${shapeStr(w.shape)}; shardshift cannot tell whether model_type "${modelType}" stores it as a Conv1D`);
          continue;
        }
        conv1d = asConv;
      }
      layout = conv1d ? 'in-out' : 'out-in';
      need = conv1d ? [inA, outB] : [outB, inA];
    }
    if (w.shape.length !== 2 || w.shape[0] !== need[0] || w.shape[1] !== need[1]) {
      problems.shapes.push(
        `${weight}: the adapter's ${m.kind === 'linear' ? `lora_A ${shapeStr(m.a.shape)} / lora_B ${shapeStr(m.b.shape)}` : `lora_embedding_A ${shapeStr(m.a.shape)} / lora_embedding_B ${shapeStr(m.b.shape)}`} need a base weight ${shapeStr(need)}${layout === 'in-out' && m.kind === 'linear' ? ' (Conv1D layout)' : ''}, the base has ${shapeStr(w.shape)}`,
      );
      continue;
    }
    const outFeatures = m.kind === 'linear' ? outB : inA;
    if (m.magnitude) {
      if (!cfg.useDora) problems.other.push(`${m.magnitude.name}: a DoRA magnitude, but adapter_config.json has use_dora false`);
      else if (m.kind === 'embedding') problems.other.push(`${m.name}: DoRA on an embedding layer is not supported`);
      else if (m.magnitude.shape.length !== 1 || m.magnitude.shape[0] !== outFeatures) problems.shapes.push(`${m.magnitude.name}: DoRA magnitude ${shapeStr(m.magnitude.shape)}, expected [${outFeatures}]`);
      else if (!isFloat(m.magnitude.dtype)) problems.other.push(`${m.magnitude.name}: DoRA magnitude is ${m.magnitude.dtype}`);
    } else if (cfg.useDora) {
      problems.other.push(`${PEFT_PREFIX}${m.name}: use_dora is true but the module has no lora_magnitude_vector`);
    }
    if (m.bBias) {
      if (!cfg.loraBias) problems.other.push(`${m.bBias.name}: a lora_B bias, but adapter_config.json has lora_bias false`);
      else if (!base.tensors.has(`${m.name}.bias`)) problems.other.push(`${m.bBias.name}: lora_bias needs a base bias, and the base has no ${m.name}.bias`);
      else if (m.bBias.shape.length !== 1 || m.bBias.shape[0] !== outB) problems.shapes.push(`${m.bBias.name}: ${shapeStr(m.bBias.shape)}, expected [${outB}]`);
    } else if (cfg.loraBias && m.kind === 'linear') {
      problems.other.push(`${PEFT_PREFIX}${m.name}: lora_bias is true but the module has no lora_B.bias`);
    }
    out.push({ module: m, weight, layout, scaling, r, alpha });
  }
  return out;
}

/** Base modules the config targets (explicitly) that carry no LoRA tensors in the adapter. */
function targetedWithoutTensors(adapter: PeftAdapter, base: CheckpointSource): string[] {
  const cfg = adapter.config;
  if (cfg.targetModules === 'all-linear' || cfg.targetModules === null) return [];
  const out: string[] = [];
  for (const t of base.tensors.values()) {
    if (!t.name.endsWith('.weight') || t.shape.length !== 2) continue;
    const mod = t.name.slice(0, -'.weight'.length);
    if (adapter.modules.has(mod)) continue;
    if (targetStatus(cfg, mod) === true) out.push(mod);
  }
  return out;
}

function listed(xs: readonly string[], n = 8): string {
  return xs.length <= n ? xs.join(', ') : `${xs.slice(0, n).join(', ')} … (${xs.length} in all)`;
}

async function within(child: string, parent: string): Promise<boolean> {
  const c = resolve(child);
  const p = await realpath(parent).catch(() => resolve(parent));
  return c === p || c.startsWith(p.endsWith(sep) ? p : p + sep);
}

export async function mergeLora(baseDir: string, adapterPath: string, out: string, opts: MergeLoraOptions = {}): Promise<ConvertResult> {
  const t0 = performance.now();
  let st;
  try {
    st = await stat(baseDir);
  } catch {
    throw usage(`--base ${baseDir}: no such directory`);
  }
  if (!st.isDirectory()) throw usage(`--base ${baseDir}: give the HF model directory (with config.json), not a file`);
  const adapter = await openPeftAdapter(adapterPath);
  try {
    if (await within(out, adapter.dir)) throw usage(`output ${out} is inside the adapter directory ${adapter.dir}; choose a path outside it`);
    const baseCfg = await readBaseConfig(baseDir);
    const base = await openCheckpoint(baseDir);
    try {
      if (base.format === 'megatron' || base.format === 'dcp') {
        throw usage(`--base ${baseDir} is a ${base.format} checkpoint; the PEFT backend merges into a Hugging Face model directory`);
      }
      const cfg = adapter.config;
      const modelType = typeof baseCfg.model_type === 'string' ? baseCfg.model_type : '';
      const problems = { shapes: [] as string[], notFound: [] as string[], other: [] as string[] };
      const resolved = resolveModules(adapter, base, modelType, problems);
      for (const [name, t] of adapter.replacements) {
        const b = base.tensors.get(name);
        if (!b) problems.notFound.push(`${name} (whole tensor ${t.name})`);
        else if (b.shape.length !== t.shape.length || b.shape.some((d, i) => d !== t.shape[i])) problems.shapes.push(`${name}: the adapter's ${t.name} is ${shapeStr(t.shape)}, the base has ${shapeStr(b.shape)}`);
        else if (b.dtype !== t.dtype && !(isFloat(b.dtype) && isFloat(t.dtype))) problems.other.push(`${name}: the adapter's ${t.name} is ${t.dtype}, the base's is ${b.dtype}`);
      }
      if (problems.shapes.length) {
        throw badInput(`${adapter.weightsFile}: adapter does not fit the base ${baseDir} (a different base model?): ${listed(problems.shapes, 5)}`, adapter.weightsFile);
      }
      if (problems.notFound.length) {
        throw badInput(`${adapter.weightsFile}: the base ${baseDir} has no ${listed(problems.notFound.map((n) => (n.includes(' ') ? n : `${n}.weight`)))} (target module${problems.notFound.length > 1 ? 's' : ''} not found in the base)`, adapter.weightsFile);
      }
      if (problems.other.length) throw badInput(`${adapter.weightsFile}: ${listed(problems.other, 5)}`, adapter.weightsFile);
      const missing = targetedWithoutTensors(adapter, base);
      if (missing.length) {
        throw badInput(`${adapter.weightsFile}: adapter_config.json targets ${listed(missing)} but the adapter has no LoRA tensors for ${missing.length > 1 ? 'them' : 'it'} (incomplete adapter, or an adapter for another base?)`, adapter.weightsFile);
      }
      const identity = await checkIdentity(adapter, baseDir, baseCfg, opts.forceBase ?? false);
      const recorded = await checkRecordedBase(adapter.dir, baseDir, opts.forceBase ?? false);

      // Tied input/output embeddings stored twice would come apart if only one were changed.
      const touched = new Set([...resolved.map((r) => r.weight), ...adapter.replacements.keys()]);
      if (baseCfg.tie_word_embeddings === true && base.tensors.has('lm_head.weight')) {
        const emb = [...base.tensors.keys()].find((n) => /(^|\.)(embed_tokens|wte|word_embeddings)\.weight$/.test(n));
        if (emb && (touched.has(emb) || touched.has('lm_head.weight')) && !(touched.has(emb) && touched.has('lm_head.weight'))) {
          throw unsupported(`${baseDir}: the base ties ${emb} and lm_head.weight but stores both; merging changes only one of them`);
        }
      }

      const outDtype = (d: DType): DType => (opts.dtype && isFloat(d) ? opts.dtype : d);
      const byWeight = new Map(resolved.map((r) => [r.weight, r]));
      const byBias = new Map(resolved.filter((r) => r.module.bBias).map((r) => [`${r.module.name}.bias`, r]));
      const targets: TargetTensor[] = [];
      for (const t of base.tensors.values()) {
        const rep = adapter.replacements.get(t.name);
        const dt = outDtype(t.dtype);
        // The base as the merge sees it: the adapter's whole tensor if it replaces this one, cast to the base's dtype.
        const b0 = castTo(rep ? sourceTarget(rep, t.name) : sourceTarget(t), dt);
        const lora = byWeight.get(t.name);
        const lb = byBias.get(t.name);
        if (lora) {
          const m = lora.module;
          const rounding: MergeRounding = { roundDelta: m.kind === 'embedding' || (opts.safeMerge ?? false) };
          targets.push(
            mergedWeight({
              name: t.name,
              base: b0,
              module: m,
              layout: lora.layout,
              scaling: lora.scaling,
              rounding,
              dora: m.magnitude !== undefined,
              describe: `${rep ? `${rep.name} (replaces base)` : t.where} + lora(${m.a.name}, ${m.b.name}${m.magnitude ? `, dora ${m.magnitude.name}` : ''}) r=${lora.r} alpha=${lora.alpha} scaling=${lora.scaling} ${lora.layout}${rounding.roundDelta ? ' delta-rounded' : ''}`,
            }),
          );
        } else if (lb) {
          const bb = lb.module.bBias!;
          targets.push(mergedBias(t.name, b0, bb, lb.scaling, `${rep ? rep.name : t.where} + ${bb.name} × ${lb.scaling}`));
        } else {
          targets.push(b0);
        }
      }
      const report = writeSafetensors(targets, { maxShardSize: opts.maxShardSize });
      checkComplete(targets, report.files);
      const side = await listSideFiles(baseDir, (n) => n.endsWith('.safetensors') || n.endsWith('.index.json') || n.endsWith('.bin') || n.endsWith('.pt') || n.endsWith('.pth'));

      const kinds = { linear: 0, conv1d: 0, embedding: 0, dora: 0 };
      for (const r of resolved) {
        if (r.module.kind === 'embedding') kinds.embedding++;
        else if (r.layout === 'in-out') kinds.conv1d++;
        else kinds.linear++;
        if (r.module.magnitude) kinds.dora++;
      }
      const scalings = new Map<string, number>();
      for (const r of resolved) {
        const k = `${r.scaling} (alpha ${r.alpha} / ${cfg.useRslora ? `√${r.r}` : r.r})`;
        scalings.set(k, (scalings.get(k) ?? 0) + 1);
      }
      const dtypes = [...new Set(targets.map((t) => t.dtype))].join(', ');
      const notes = [
        `adapter ${adapter.dir}: LoRA, ${resolved.length} module${resolved.length === 1 ? '' : 's'} (${Object.entries(kinds).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(', ')})${cfg.useRslora ? ', rsLoRA' : ''}`,
        `scaling: ${[...scalings].map(([k, n]) => `${k} ×${n}`).join('; ')}`,
        identity,
        ...(recorded ? [recorded] : []),
        `rounding as peft's merge_and_unload(${opts.safeMerge ? 'safe_merge=True' : ''}): ΔW = B @ A × scaling in fp32${opts.safeMerge ? ', rounded to the base dtype, then' : ','} added to the base in fp32 and rounded once to ${dtypes}; embedding ΔW rounded to the base dtype before the add`,
      ];
      if (adapter.replacements.size) notes.push(`whole tensors from the adapter (modules_to_save, biases, saved embeddings): ${listed([...adapter.replacements.keys()], 6)}`);
      if (opts.dtype) notes.push(`base loaded as ${opts.dtype} (--dtype)`);
      const plan: ConvertPlan = {
        source: { path: baseDir, format: `hf (${base.format}) + peft adapter`, tensors: base.tensors.size, bytes: [...base.tensors.values()].reduce((s, t) => s + t.byteLength, 0) },
        target: { path: out, format: 'hf (safetensors)', kind: 'dir' },
        files: report.files.map((f) => ({ path: f.relPath, bytes: f.size, tensors: f.parts.filter((p) => typeof p === 'object' && 'kind' in p).length })),
        dropped: [],
        sideFiles: side,
        totalBytes: report.files.reduce((s, f) => s + f.size, 0),
        notes,
      };
      return await finish(plan, t0, opts.dryRun, () =>
        writeOutput(baseDir, out, 'dir', report.files, side.map((s) => ({ from: join(baseDir, s), to: s })), {
          overwrite: opts.overwrite,
          maxMemory: opts.maxMemory,
          onProgress: opts.onProgress,
          signal: opts.signal,
          manifest: loraManifest('merge-lora', plan.source.format, plan.target.format, base, adapter.source),
        }),
      );
    } finally {
      await base.close();
    }
  } finally {
    await adapter.close();
  }
}

