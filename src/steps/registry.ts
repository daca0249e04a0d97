/**
 * The Nemotron-steps-style interface: `shardshift steps run <step> [-c config] [-d] key=value …`.
 *
 * A step is a typed parameter schema (dotted keys, so `parallel.tp=4` works), a `default.yaml`
 * shipped with the package, and a runner that calls the same plan builders as `shardshift
 * convert` — no logic of its own. Parameter names follow the reference docs' vocabulary.
 */
import type { ConvertResult } from '../plan/convert.js';
import type { ProgressEvent } from '../exec/executor.js';
import { convertHfToMegatron, convertMegatronToHf } from '../plan/model-convert.js';
import { dtypeFromTorch, type DType } from '../tensor/dtype.js';
import { join, resolve } from 'node:path';
import { stat } from 'node:fs/promises';
import { openHubSource, type HubSource } from '../plan/hub-source.js';
import { iterationTarget, pushOutput } from '../plan/push.js';
import { verifyLogits } from '../plan/logits.js';
import { looksLikeModelId } from '../hub/repo.js';
import { ShardshiftError, badInput, ioError, isErrno, usage } from '../util/errors.js';
import { UnpicklingError } from '../pickle/index.js';
import { selectIterations, parseIterations } from '../plan/iterations.js';
import { parseSize } from '../util/size.js';
import { CKPT_FORMATS, type CkptFormat } from '../megatron/run-dir.js';

export type ParamType = 'string' | 'int' | 'bool' | 'size';

export interface ParamSpec {
  readonly type: ParamType;
  readonly description: string;
  readonly default?: string | number | boolean | null;
  readonly choices?: readonly string[];
  readonly required?: boolean;
  /** Other spellings accepted for this key (e.g. `tp` for `parallel.tp`, as the reference docs write it). */
  readonly aliases?: readonly string[];
}

export type StepParams = Readonly<Record<string, string | number | boolean | null>>;

export interface StepContext {
  readonly dryRun: boolean;
  readonly onProgress?: (e: ProgressEvent) => void;
  readonly env: NodeJS.ProcessEnv;
  /** Turns an `hf_model_id` (local dir or hub id) into a local directory. */
  readonly resolveModel: (idOrPath: string, what: 'config' | 'all') => Promise<string>;
  /** Where hub downloads report what they fetch. */
  readonly log?: (message: string) => void;
}

/** One checkpoint of a batch conversion (`iterations=`) and what happened to it. */
export interface BatchItem {
  readonly name: string;
  readonly source: string;
  readonly out: string;
  /** The conversion (written, reused = already this finished output: skipped, or dry-run), or why it failed. */
  readonly result: { readonly ok: true; readonly convert: ConvertResult } | { readonly ok: false; readonly error: string; readonly exitCode: number };
}

/** What a step run over many checkpoints (one output each) returns instead of one ConvertResult. */
export class BatchRun {
  constructor(readonly items: readonly BatchItem[]) {}
}

/** The result of a step that converts one checkpoint (every step but a batch run). */
export function single(r: ConvertResult | BatchRun): ConvertResult {
  if (r instanceof BatchRun) throw new Error('internal: a one-checkpoint step returned a batch');
  return r;
}

export interface Step {
  readonly name: string;
  readonly description: string;
  readonly params: Readonly<Record<string, ParamSpec>>;
  run(p: StepParams, ctx: StepContext): Promise<ConvertResult | BatchRun>;
}

/** The documented default output base: CONVERT_OUTPUT_DIR, then NEMO_RUN_DIR/convert, then ./output/convert. */
export function defaultOutputBase(env: NodeJS.ProcessEnv): string {
  if (env.CONVERT_OUTPUT_DIR) return env.CONVERT_OUTPUT_DIR;
  if (env.NEMO_RUN_DIR) return join(env.NEMO_RUN_DIR, 'convert');
  return join('.', 'output', 'convert');
}

/** Folder names that say nothing about which model or run a checkpoint is. */
const GENERIC_DIR = /^(policy|weights|model|hf|checkpoints?)$/;
/** Folder names of one save of a run: the run's name must come with them. */
const SAVE_DIR = /^(iter_\d+|step_\d+|global_step\d+|checkpoint-\d+|latest)$/;

/**
 * The name a default output is called after: a hub id's model name, or a local checkpoint's folder
 * with the run's folder in front when the checkpoint is one save of a run (`./run/iter_0000100` →
 * `run-iter_0000100`, `results/run1/step_100/policy/weights` → `run1-step_100`), so two runs'
 * exports do not land in the same directory.
 */
export function outputStem(idOrPath: string): string {
  const parts = idOrPath.split('/').filter((p) => p !== '' && p !== '.');
  const kept: string[] = [];
  for (let i = parts.length - 1; i >= 0; i--) {
    const p = parts[i]!;
    if (p === '..') break;
    if (GENERIC_DIR.test(p) && (kept.length > 0 || i > 0)) continue;
    kept.unshift(p);
    if (!SAVE_DIR.test(p)) break;
  }
  return kept.join('-') || 'model';
}


const DTYPE: ParamSpec = { type: 'string', description: 'weight dtype of the output', default: 'bfloat16', choices: ['bfloat16', 'float16', 'float32'] };
const COMMON: Record<string, ParamSpec> = {
  allow_unmapped: { type: 'bool', description: 'skip source tensors the model map has no place for instead of failing', default: false },
  max_memory: { type: 'size', description: 'byte budget for tensor buffers', default: '1GiB' },
  overwrite: { type: 'bool', description: 'replace an existing output (never the source)', default: false },
};

/** The keys of the HF ↔ Megatron steps that check the finished output's logits against the source. */
const LOGITS: Record<string, ParamSpec> = {
  verify_logits: { type: 'bool', description: 'after converting, run verify --logits on the output against the source (exit 3 when the logits disagree)', default: false },
  verify_positions: { type: 'int', description: 'with verify_logits: positions compared', default: 8 },
};

/** `r` with its logits comparison when `verify_logits` asks (never for a dry run or a part run). */
async function logitsChecked(r: ConvertResult, src: string, p: StepParams, hfModel?: string): Promise<ConvertResult> {
  if (!p.verify_logits || r.outcome === 'dry-run' || r.outcome === 'part-written') return r;
  return { ...r, logits: await verifyLogits(r.plan.target.path, { against: src, positions: p.verify_positions as number, maxMemory: p.max_memory as number, hfModel }) };
}

/** The hub keys every converting step takes. */
const PUSH: Record<string, ParamSpec> = {
  push_to_hub: { type: 'string', description: 'upload the finished output to the hub as one commit: org/name[@branch] (with iterations=: each checkpoint to its own branch, [<branch>-]<iter_*>)', default: null },
  create_repo: { type: 'bool', description: 'with push_to_hub: create the repository or branch when missing', default: false },
};

/** `r` with its output pushed when `push_to_hub` asks (a dry run or a part run pushes nothing). */
async function pushed(r: ConvertResult, p: StepParams, ctx: StepContext, target = p.push_to_hub as string | null): Promise<ConvertResult> {
  // An output whose logits disagree with the source's is not published.
  if (!target || r.outcome === 'dry-run' || r.outcome === 'part-written' || r.logits?.ok === false) return r;
  return { ...r, push: await pushOutput(r.plan.target.path, target, { createRepo: p.create_repo as boolean, env: ctx.env }) };
}

function dtypeOf(p: StepParams): DType {
  return dtypeFromTorch(String(p.dtype))!;
}

const hfToMegatron: Step = {
  name: 'convert/hf_to_megatron',
  description: 'Convert a Hugging Face checkpoint (local directory or model id) into a Megatron-Core torch_dist checkpoint.',
  params: {
    hf_model_id: { type: 'string', description: 'HF model id or local checkpoint directory to import', required: true },
    megatron_path: { type: 'string', description: 'output Megatron checkpoint directory (default: <output base>/<model>-megatron)', default: null },
    dtype: DTYPE,
    'parallel.tp': { type: 'int', description: 'tensor-parallel size (vocab padding; rank files with ckpt_format=torch)', default: 1, aliases: ['tp'] },
    'parallel.pp': { type: 'int', description: 'pipeline-parallel size (rank files with ckpt_format=torch)', default: 1, aliases: ['pp'] },
    'parallel.ep': { type: 'int', description: 'expert-parallel size (MoE models; rank files with ckpt_format=torch)', default: 1, aliases: ['ep'] },
    'parallel.etp': { type: 'int', description: 'expert tensor-parallel size (MoE models; default: tp)', default: null, aliases: ['etp'] },
    make_vocab_size_divisible_by: { type: 'int', description: 'vocab padding divisor', default: 128 },
    iteration: { type: 'int', description: 'iteration number of the output', default: 0 },
    ckpt_format: { type: 'string', description: 'Megatron checkpoint format', default: 'torch_dist', choices: [...CKPT_FORMATS] },
    max_disk: { type: 'size', description: 'a hub model id: most bytes of source on disk at once (tensor ranges fetched as read, deleted once read); default: shards into the HF cache, kept', default: null },
    ...LOGITS,
    ...PUSH,
    ...COMMON,
  },
  async run(p, ctx) {
    const id = String(p.hf_model_id);
    const out = (p.megatron_path as string | null) ?? join(defaultOutputBase(ctx.env), `${outputStem(id)}-megatron`);
    // A hub id streams (planned from the shards' headers) unless offline, where the cache is the model.
    const offline = ctx.env.HF_HUB_OFFLINE === '1' || ctx.env.HF_HUB_OFFLINE === 'true';
    const onDisk = await stat(id).then(() => true, () => false);
    const maxDisk = (p.max_disk as number | null) ?? undefined;
    if (maxDisk !== undefined && (onDisk || !looksLikeModelId(id))) throw usage(`max_disk applies to a hub model id streamed from the hub; ${id} is ${onDisk ? 'on local disk' : 'not a hub model id'}`);
    let hub: HubSource | undefined;
    try {
      if (!onDisk && looksLikeModelId(id) && !offline) hub = await openHubSource(id, { env: ctx.env, maxDisk, spoolDir: `${resolve(out)}.source-spool`, log: ctx.log, onEvent: (e) => (e.kind === 'downloaded' ? ctx.log?.(`downloaded ${id}/${e.file}`) : undefined) });
      const src = hub ? hub.dir : await ctx.resolveModel(id, 'all');
      if (p.verify_logits && hub) throw usage('verify_logits needs the source on local disk (a streamed hub source is not kept to read again)');
      return await pushed(await logitsChecked(await convertHfToMegatron(src, out, { weights: hub?.source,
      dtype: dtypeOf(p),
      tp: p['parallel.tp'] as number,
      pp: p['parallel.pp'] as number,
      ep: p['parallel.ep'] as number,
      etp: (p['parallel.etp'] as number | null) ?? undefined,
      makeVocabSizeDivisibleBy: p.make_vocab_size_divisible_by as number,
      iteration: p.iteration as number,
      ckptFormat: p.ckpt_format as CkptFormat,
      allowUnmapped: p.allow_unmapped as boolean,
      maxMemory: p.max_memory as number,
      overwrite: p.overwrite as boolean,
      dryRun: ctx.dryRun,
      onProgress: ctx.onProgress,
      }), src, p), p, ctx);
    } finally {
      await hub?.source.close();
    }
  },
};

const megatronToHf: Step = {
  name: 'convert/megatron_to_hf',
  description: 'Export a Megatron-Core torch_dist checkpoint (run directory or iter_* directory) to a Hugging Face checkpoint.',
  params: {
    megatron_path: { type: 'string', description: 'Megatron checkpoint: an iter_* directory, or a run directory resolved through latest_checkpointed_iteration.txt', required: true },
    iterations: { type: 'string', description: 'convert many saves of the run directory megatron_path, one output each (hf_path/<iter_*>, or <output base>/<run>-<iter_*>-hf): all, latest, every:N (iterations divisible by N), or a list such as 1000,2000; finished outputs are kept, partial ones resumed', default: null },
    hf_model_id: { type: 'string', description: 'original HF model id or directory: config, generation config and tokenizer to carry (default: the ones recorded in the checkpoint)', default: null },
    hf_path: { type: 'string', description: 'output HF directory (default: <output base>/<checkpoint>-hf)', default: null },
    dtype: { ...DTYPE, default: null, description: 'weight dtype of the output (default: the HF config\'s torch_dtype, else bfloat16)' },
    quantize: { type: 'string', description: 'write the weights the hub stores quantized in that layout (mxfp4: GPT-OSS experts, as transformers\' quantize_to_mxfp4; fp8: DeepSeek-V3\'s block-scaled weights)', default: null, choices: ['mxfp4', 'fp8'] },
    ...LOGITS,
    ...PUSH,
    ...COMMON,
  },
  async run(p, ctx) {
    const ref = p.hf_model_id ? await ctx.resolveModel(String(p.hf_model_id), 'config') : undefined;
    const one = (src: string, out: string, reuseComplete: boolean): Promise<ConvertResult> => convertMegatronToHf(src, out, {
      hfModel: ref,
      reuseComplete,
      dtype: p.dtype ? dtypeOf(p) : undefined,
      quantize: (p.quantize as 'mxfp4' | 'fp8' | null) ?? undefined,
      allowUnmapped: p.allow_unmapped as boolean,
      maxMemory: p.max_memory as number,
      overwrite: p.overwrite as boolean,
      dryRun: ctx.dryRun,
      onProgress: ctx.onProgress,
    });
    const run = String(p.megatron_path);
    if (p.iterations === null) return pushed(await logitsChecked(await one(run, (p.hf_path as string | null) ?? join(defaultOutputBase(ctx.env), `${outputStem(run)}-hf`), false), run, p, ref), p, ctx);
    if (p.verify_logits) throw usage('verify_logits checks one conversion; with iterations=, run verify --logits on the outputs you care about');
    // Many saves of one run, one output each (hf_path/<iter_*>, or <base>/<run>-<iter_*>-hf): a
    // finished output of the same conversion is kept (verified, not redone), a partial one resumed.
    const items: BatchItem[] = [];
    for (const it of await selectIterations(run, parseIterations(String(p.iterations)))) {
      const out = p.hf_path ? join(String(p.hf_path), it.name) : join(defaultOutputBase(ctx.env), `${outputStem(it.dir)}-hf`);
      try {
        const target = p.push_to_hub ? iterationTarget(String(p.push_to_hub), it.name) : null;
        items.push({ name: it.name, source: it.dir, out, result: { ok: true, convert: await pushed(await one(it.dir, out, true), p, ctx, target) } });
      } catch (e) {
        // One bad checkpoint is one failed row; the others still convert. A bug still stops it.
        const err = e instanceof ShardshiftError ? e : isErrno(e) ? ioError(e, it.dir) : e instanceof UnpicklingError ? badInput(e.message, it.dir) : undefined;
        if (!err) throw e;
        items.push({ name: it.name, source: it.dir, out, result: { ok: false, error: err.message, exitCode: err.code === 'USAGE' ? 2 : 1 } });
      }
    }
    return new BatchRun(items);
  },
};

const dcpToHf: Step = {
  name: 'convert/dcp_to_hf',
  description: 'Convert a NeMo RL policy checkpoint (DCP from the DTensor backend, v1 or v2, or the Megatron backend\'s torch_dist) to Hugging Face.',
  params: {
    dcp_ckpt_path: { type: 'string', description: 'the run\'s step_N/policy/weights', required: true },
    config: { type: 'string', description: 'the run\'s config.yaml (default: step_N/config.yaml beside policy/)', default: null },
    hf_model_name: { type: 'string', description: 'override policy.model_name (config.json and fallback tokenizer)', default: null },
    hf_ckpt_path: { type: 'string', description: 'output HF directory (default: <output base>/<run>-<step>-hf)', default: null },
    dtype: { ...DTYPE, default: null, description: 'cast floating-point weights (default: keep)' },
    ...COMMON,
  },
  async run(p, ctx) {
    const { convertDcpToHf } = await import('../plan/dcp-to-hf.js');
    const dcp = String(p.dcp_ckpt_path);
    const stepName = outputStem(dcp);
    const out = (p.hf_ckpt_path as string | null) ?? join(defaultOutputBase(ctx.env), `${stepName}-hf`);
    return convertDcpToHf(dcp, out, {
      config: (p.config as string | null) ?? undefined,
      hfModelName: (p.hf_model_name as string | null) ?? undefined,
      resolveModel: (id) => ctx.resolveModel(id, 'config'),
      dtype: p.dtype ? dtypeOf(p) : undefined,
      allowUnmapped: p.allow_unmapped as boolean,
      maxMemory: p.max_memory as number,
      overwrite: p.overwrite as boolean,
      dryRun: ctx.dryRun,
      onProgress: ctx.onProgress,
    });
  },
};

const mergeLoraStep: Step = {
  name: 'convert/merge_lora',
  description: 'Merge a LoRA adapter into the exact base it was trained on: a PEFT adapter into an HF base (hf_peft), or a Megatron-Bridge adapter into a Megatron base, optionally exporting HF (megatron_bridge).',
  params: {
    backend: { type: 'string', description: 'adapter kind', default: 'hf_peft', choices: ['hf_peft', 'megatron_bridge'] },
    lora_checkpoint: { type: 'string', description: 'the adapter: a PEFT directory, or a Megatron-Bridge LoRA checkpoint', required: true },
    base_hf_path: { type: 'string', description: 'hf_peft: the original HF base (directory or hub id)', default: null },
    output_hf_path: { type: 'string', description: 'merged HF output (hf_peft; megatron_bridge with export_hf)', default: null },
    base_megatron_path: { type: 'string', description: 'megatron_bridge: the original Megatron base checkpoint', default: null },
    output_megatron_path: { type: 'string', description: 'megatron_bridge: merged Megatron output', default: null },
    hf_model_id: { type: 'string', description: 'megatron_bridge: the base\'s HF model (config, tokenizer); default: the base checkpoint\'s hf/', default: null },
    export_hf: { type: 'bool', description: 'megatron_bridge: also write output_hf_path', default: false },
    force_base: { type: 'bool', description: 'merge although the adapter names another base (shapes are always checked)', default: false },
    dtype: { ...DTYPE, default: null, description: 'dtype of the merged weights (default: the base\'s)' },
    ...COMMON,
  },
  async run(p, ctx) {
    const common = { maxMemory: p.max_memory as number, overwrite: p.overwrite as boolean, dryRun: ctx.dryRun, onProgress: ctx.onProgress, dtype: p.dtype ? dtypeOf(p) : undefined };
    const adapter = String(p.lora_checkpoint);
    if (p.backend === 'hf_peft') {
      if (!p.base_hf_path) throw usage(`${this.name}: backend=hf_peft needs base_hf_path`);
      const { mergeLora } = await import('../plan/lora-convert.js');
      const base = await ctx.resolveModel(String(p.base_hf_path), 'all');
      const out = (p.output_hf_path as string | null) ?? join(defaultOutputBase(ctx.env), `${outputStem(adapter)}-merged-hf`);
      return mergeLora(base, adapter, out, { ...common, forceBase: p.force_base as boolean });
    }
    if (!p.base_megatron_path) throw usage(`${this.name}: backend=megatron_bridge needs base_megatron_path`);
    const { mergeMbToMegatron, mergeMbToHf } = await import('../plan/lora-mb.js');
    const hfModel = p.hf_model_id ? await ctx.resolveModel(String(p.hf_model_id), 'config') : undefined;
    const mbOpts = { ...common, hfModel };
    const outMeg = (p.output_megatron_path as string | null) ?? join(defaultOutputBase(ctx.env), `${outputStem(adapter)}-merged-megatron`);
    // Two outputs, each committed on its own: a re-run after a kill between them keeps the first.
    const r = await mergeMbToMegatron(String(p.base_megatron_path), adapter, outMeg, { ...mbOpts, reuseComplete: !!p.export_hf });
    if (!p.export_hf) return r;
    const outHf = (p.output_hf_path as string | null) ?? join(defaultOutputBase(ctx.env), `${outputStem(adapter)}-merged-hf`);
    const h = await mergeMbToHf(String(p.base_megatron_path), adapter, outHf, mbOpts);
    return { ...r, seconds: r.seconds + h.seconds, bytesWritten: r.bytesWritten + h.bytesWritten, outcome: h.outcome, plan: { ...r.plan, notes: [...(r.plan.notes ?? []), ...(r.outcome === 'reused' ? [`kept the finished ${r.plan.target.path} (verified)`] : []), `also exported HF: ${h.plan.target.path}`] } };
  },
};

const STEPS: Step[] = [hfToMegatron, megatronToHf, dcpToHf, mergeLoraStep];

/** Registers a step (one entry per step; LoRA, DCP and NxD steps add theirs). */
export function registerStep(s: Step): void {
  if (!STEPS.some((x) => x.name === s.name)) STEPS.push(s);
}

export function listSteps(): readonly Step[] {
  return STEPS;
}

export function getStep(name: string): Step {
  const s = STEPS.find((x) => x.name === name);
  if (!s) throw usage(`unknown step ${JSON.stringify(name)}; steps: ${STEPS.map((x) => x.name).join(', ')}`);
  return s;
}

/** The schema key a given key or alias names. */
export function canonicalKey(step: Step, key: string): string {
  if (step.params[key]) return key;
  for (const [k, spec] of Object.entries(step.params)) if (spec.aliases?.includes(key)) return k;
  return key;
}

/** Parses one value for a parameter, naming the key and expected type on failure. */
export function parseParam(step: Step, key: string, raw: unknown): string | number | boolean | null {
  const spec = step.params[key];
  if (!spec) throw usage(`${step.name}: unknown parameter ${key}; valid: ${Object.keys(step.params).join(', ')}`);
  // null leaves a parameter unset; required ones are checked once all sources are merged.
  if (raw === null || raw === 'null' || raw === '~') return null;
  const bad = (): never => {
    throw usage(`${step.name}: ${key}=${JSON.stringify(raw)} is not a valid ${spec.type}${spec.choices ? ` (one of ${spec.choices.join(', ')})` : ''}`);
  };
  let v: string | number | boolean;
  switch (spec.type) {
    case 'int': {
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' && /^-?\d+$/.test(raw) ? Number(raw) : NaN;
      if (!Number.isSafeInteger(n)) bad();
      v = n;
      break;
    }
    case 'bool':
      if (raw === true || raw === 'true' || raw === 'True' || raw === '1') v = true;
      else if (raw === false || raw === 'false' || raw === 'False' || raw === '0') v = false;
      else v = bad();
      break;
    case 'size':
      if (typeof raw === 'number') v = raw;
      else if (typeof raw === 'string') {
        try {
          v = parseSize(raw, key);
        } catch {
          v = bad();
        }
      } else v = bad();
      break;
    default:
      if (typeof raw !== 'string' && typeof raw !== 'number') bad();
      v = String(raw);
  }
  if (spec.choices && !spec.choices.includes(String(v))) bad();
  return v;
}
