/**
 * Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` (or
 * `adapter_model.bin`, read by the torch reader), as peft 0.21 `save_pretrained` writes them.
 *
 * Keys are `base_model.model.<module path>.<param>` with the adapter name removed
 * (`peft/utils/save_and_load.py: get_peft_model_state_dict`):
 *
 * | key suffix | meaning |
 * | --- | --- |
 * | `.lora_A.weight` [r, in], `.lora_B.weight` [out, r] | a Linear (or GPT-2 Conv1D) LoRA |
 * | `.lora_B.bias` [out] | `lora_bias=True`: added × scaling to the base bias |
 * | `.lora_embedding_A` [r, num_embeddings], `.lora_embedding_B` [dim, r] | an Embedding LoRA |
 * | `.lora_magnitude_vector` [out] | DoRA's magnitude (the `.weight` peft strips on save) |
 * | anything else | a whole tensor that replaces the base's on load: `modules_to_save` copies (`lm_head.weight`), biases (`bias="all"`/`"lora_only"`, saved under `….base_layer.bias`), embeddings saved with `save_embedding_layers` (`….base_layer.weight`) |
 *
 * The config decides which modules are adapted, each module's rank and alpha, and the variant; the
 * weights file says which modules actually carry LoRA tensors. Adapter types and options whose
 * merge is not the one implemented here are refused by name.
 */
import { stat, readdir } from 'node:fs/promises';
import { join, basename } from 'node:path';
import { badInput, unsupported, usage } from '../util/errors.js';
import { isSafetensorsPath, openSafetensors } from './safetensors.js';
import { isTorchPath, openTorch } from './torch.js';
import type { CheckpointSource } from './types.js';
import type { SourceTensor } from '../lazy/types.js';
import { readTextFile } from '../io/file.js';

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_SAFETENSORS = 'adapter_model.safetensors';
export const ADAPTER_BIN = 'adapter_model.bin';
export const PEFT_PREFIX = 'base_model.model.';

/** adapter_config.json, checked and normalised. */
export interface LoraAdapterConfig {
  /** The config file (for messages). */
  readonly file: string;
  readonly r: number;
  readonly loraAlpha: number;
  readonly useRslora: boolean;
  /** In file order (peft takes the first matching key). */
  readonly rankPattern: ReadonlyArray<readonly [string, number]>;
  readonly alphaPattern: ReadonlyArray<readonly [string, number]>;
  /** A list (suffix or exact match), a regex string (full match), `all-linear`, or null. */
  readonly targetModules: readonly string[] | string | null;
  readonly excludeModules: readonly string[] | string | null;
  readonly layersToTransform: readonly number[] | number | null;
  readonly layersPattern: readonly string[] | null;
  readonly fanInFanOut: boolean;
  readonly modulesToSave: readonly string[] | null;
  readonly bias: 'none' | 'all' | 'lora_only';
  readonly useDora: boolean;
  readonly loraBias: boolean;
  readonly baseModelNameOrPath: string | null;
  readonly initLoraWeights: boolean | string;
  /** The whole JSON object, as read. */
  readonly raw: Readonly<Record<string, unknown>>;
}

/** Init methods that rewrite the base weights when the adapter is created and loaded (peft `update_layer`). */
const BASE_MUTATING_INITS: ReadonlyArray<[RegExp, string]> = [
  [/^pissa/i, 'PiSSA'],
  [/^olora$/i, 'OLoRA'],
  [/^corda/i, 'CorDA'],
  [/^loftq$/i, 'LoftQ'],
  [/^lora_ga$/i, 'LoRA-GA'],
];

/** LoRA variants and options whose merge differs from plain LoRA/DoRA (config field → name). */
const REFUSED_OPTIONS: ReadonlyArray<[string, string]> = [
  ['target_parameters', 'target_parameters (LoRA on nn.Parameters, e.g. fused MoE experts)'],
  ['trainable_token_indices', 'trainable_token_indices (trainable tokens)'],
  ['layer_replication', 'layer_replication'],
  ['use_qalora', 'QALoRA (use_qalora)'],
  ['use_bdlora', 'BD-LoRA (use_bdlora)'],
  ['arrow_config', 'Arrow (arrow_config)'],
  ['velora_config', 'VeLoRA (velora_config)'],
  ['monteclora_config', 'MonteCLoRA (monteclora_config)'],
  ['kasa_config', 'KaSA (kasa_config)'],
  ['alora_invocation_tokens', 'aLoRA (alora_invocation_tokens)'],
  ['ensure_weight_tying', 'ensure_weight_tying'],
];

function truthy(v: unknown): boolean {
  if (v === null || v === undefined || v === false || v === 0 || v === '') return false;
  if (Array.isArray(v)) return v.length > 0;
  if (typeof v === 'object') return Object.keys(v).length > 0;
  return true;
}

/** Parses adapter_config.json text (pure; `file` names it in messages). */
export function parseAdapterConfig(text: string, file: string): LoraAdapterConfig {
  let j: unknown;
  try {
    j = JSON.parse(text);
  } catch (e) {
    throw badInput(`${file}: not valid JSON (${(e as Error).message})`, file);
  }
  if (typeof j !== 'object' || j === null || Array.isArray(j)) throw badInput(`${file}: not a JSON object`, file);
  const c = j as Record<string, unknown>;
  const peftType = c.peft_type;
  if (typeof peftType !== 'string') throw badInput(`${file}: no peft_type (is this a PEFT adapter config?)`, file);
  if (peftType !== 'LORA') {
    throw unsupported(`${file}: peft_type ${peftType} is not supported; shardshift merges LORA adapters only (${peftType} adapters use different merge math)`, file);
  }
  const init = c.init_lora_weights ?? true;
  if (typeof init === 'string') {
    const hit = BASE_MUTATING_INITS.find(([re]) => re.test(init));
    if (hit) {
      throw unsupported(
        `${file}: init_lora_weights "${init}" (${hit[1]}) rewrites the base weights when the adapter is loaded, so merging into the original base would be wrong; convert it to a plain LoRA first with peft (save_pretrained(..., path_initial_model_for_weight_conversion=...))`,
        file,
      );
    }
    if (/^mica$/i.test(init)) throw unsupported(`${file}: init_lora_weights "mica" (the MiCA LoRA variant) is not supported`, file);
    if (!['gaussian', 'eva', 'orthogonal'].includes(init.toLowerCase())) throw unsupported(`${file}: init_lora_weights "${init}" is not a method shardshift knows`, file);
  } else if (typeof init !== 'boolean') throw badInput(`${file}: init_lora_weights must be a boolean or a string`, file);
  for (const [k, name] of REFUSED_OPTIONS) if (truthy(c[k])) throw unsupported(`${file}: ${name} is not supported`, file);
  if (truthy(c.megatron_config)) throw unsupported(`${file}: megatron_config (peft's Megatron tensor-parallel LoRA layers) is not supported`, file);

  const int = (k: string, dflt: number): number => {
    const v = c[k] ?? dflt;
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) throw badInput(`${file}: ${k} must be a positive integer (got ${JSON.stringify(v)})`, file);
    return v;
  };
  const num = (k: string, dflt: number): number => {
    const v = c[k] ?? dflt;
    if (typeof v !== 'number' || !Number.isFinite(v)) throw badInput(`${file}: ${k} must be a number (got ${JSON.stringify(v)})`, file);
    return v;
  };
  const bool = (k: string): boolean => {
    const v = c[k] ?? false;
    if (typeof v !== 'boolean') throw badInput(`${file}: ${k} must be true or false (got ${JSON.stringify(v)})`, file);
    return v;
  };
  const pattern = (k: string, ints: boolean): Array<[string, number]> => {
    const v = c[k] ?? {};
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw badInput(`${file}: ${k} must be an object`, file);
    return Object.entries(v).map(([p, x]) => {
      if (typeof x !== 'number' || !Number.isFinite(x) || (ints && (!Number.isInteger(x) || x <= 0))) throw badInput(`${file}: ${k}["${p}"] must be a ${ints ? 'positive integer' : 'number'}`, file);
      return [p, x];
    });
  };
  const strList = (k: string, allowString: boolean): string[] | string | null => {
    const v = c[k];
    if (v === null || v === undefined) return null;
    if (typeof v === 'string' && allowString) return v;
    if (Array.isArray(v) && v.every((x) => typeof x === 'string')) return v as string[];
    throw badInput(`${file}: ${k} must be ${allowString ? 'a string or ' : ''}a list of strings`, file);
  };
  const bias = c.bias ?? 'none';
  if (bias !== 'none' && bias !== 'all' && bias !== 'lora_only') throw badInput(`${file}: bias must be "none", "all" or "lora_only" (got ${JSON.stringify(bias)})`, file);
  const ltt = c.layers_to_transform ?? null;
  if (ltt !== null && !(typeof ltt === 'number' && Number.isInteger(ltt)) && !(Array.isArray(ltt) && ltt.every((x) => Number.isInteger(x)))) {
    throw badInput(`${file}: layers_to_transform must be an integer or a list of integers`, file);
  }
  const lp = strList('layers_pattern', true);
  const targetModules = strList('target_modules', true);
  if (ltt !== null && typeof targetModules === 'string') throw badInput(`${file}: layers_to_transform cannot be used with a regex target_modules (peft refuses this config)`, file);
  const bmp = c.base_model_name_or_path;
  return {
    file,
    r: int('r', 8),
    loraAlpha: num('lora_alpha', 8),
    useRslora: bool('use_rslora'),
    rankPattern: pattern('rank_pattern', true),
    alphaPattern: pattern('alpha_pattern', false),
    targetModules,
    excludeModules: strList('exclude_modules', true),
    layersToTransform: ltt as number[] | number | null,
    layersPattern: typeof lp === 'string' ? [lp] : lp,
    fanInFanOut: bool('fan_in_fan_out'),
    modulesToSave: strList('modules_to_save', false) as string[] | null,
    bias,
    useDora: bool('use_dora'),
    loraBias: bool('lora_bias'),
    baseModelNameOrPath: typeof bmp === 'string' && bmp.length > 0 ? bmp : null,
    initLoraWeights: init as boolean | string,
    raw: c,
  };
}

/** The LoRA tensors of one adapted module. */
export interface LoraModuleTensors {
  /** Module path in the base model (`model.layers.0.self_attn.q_proj`). */
  readonly name: string;
  readonly kind: 'linear' | 'embedding';
  /** lora_A [r, in] (linear) or lora_embedding_A [r, num_embeddings]. */
  readonly a: SourceTensor;
  /** lora_B [out, r] (linear) or lora_embedding_B [embedding_dim, r]. */
  readonly b: SourceTensor;
  /** lora_B.bias [out] (lora_bias=True). */
  readonly bBias?: SourceTensor;
  /** DoRA magnitude [out]. */
  readonly magnitude?: SourceTensor;
}

export interface PeftAdapter {
  readonly dir: string;
  readonly config: LoraAdapterConfig;
  readonly weightsFile: string;
  readonly source: CheckpointSource;
  /** By module path, in file order. */
  readonly modules: ReadonlyMap<string, LoraModuleTensors>;
  /** Whole tensors replacing base tensors on load: base tensor name → adapter tensor. */
  readonly replacements: ReadonlyMap<string, SourceTensor>;
  close(): Promise<void>;
}

const SUFFIXES: ReadonlyArray<[string, 'a' | 'b' | 'bBias' | 'ea' | 'eb' | 'magnitude']> = [
  ['.lora_A.weight', 'a'],
  ['.lora_B.weight', 'b'],
  ['.lora_B.bias', 'bBias'],
  ['.lora_embedding_A', 'ea'],
  ['.lora_embedding_B', 'eb'],
  ['.lora_magnitude_vector', 'magnitude'],
];

/** Parameter names of other PEFT methods that may sit in a mislabelled LoRA file. */
const FOREIGN = /\.(lora_E|lora_[A-Z]\w*\.\w+\.weight|hada_\w+|lokr_\w+|ia3_l|vera_lambda_\w+|oft_\w+|boft_\w+|token_adapter\.\w+|lora_A\.\w+\.weight|lora_B\.\w+\.weight)$/;

/** Groups an adapter's tensors into LoRA modules and whole-tensor replacements. */
export function groupAdapterTensors(src: CheckpointSource, file: string): { modules: Map<string, LoraModuleTensors>; replacements: Map<string, SourceTensor> } {
  const parts = new Map<string, Partial<Record<'a' | 'b' | 'bBias' | 'ea' | 'eb' | 'magnitude', SourceTensor>>>();
  const replacements = new Map<string, SourceTensor>();
  for (const t of src.tensors.values()) {
    if (!t.name.startsWith(PEFT_PREFIX)) {
      throw badInput(`${file}: tensor ${t.name} does not start with "${PEFT_PREFIX}" (not a PEFT LoRA adapter for a transformers model?)`, file, t.name);
    }
    const key = t.name.slice(PEFT_PREFIX.length);
    const hit = SUFFIXES.find(([s]) => key.endsWith(s));
    if (hit) {
      const mod = key.slice(0, -hit[0].length);
      const p = parts.get(mod) ?? {};
      p[hit[1]] = t;
      parts.set(mod, p);
      continue;
    }
    if (FOREIGN.test(key)) throw unsupported(`${file}: tensor ${t.name} is not a LoRA parameter shardshift knows (another PEFT method, or several adapters in one file?)`, file, t.name);
    const baseName = key.replace(/\.base_layer(?=\.)/g, '');
    if (replacements.has(baseName)) throw badInput(`${file}: two tensors replace ${baseName}`, file, t.name);
    replacements.set(baseName, t);
  }
  const modules = new Map<string, LoraModuleTensors>();
  for (const [name, p] of parts) {
    const isEmb = p.ea !== undefined || p.eb !== undefined;
    const isLin = p.a !== undefined || p.b !== undefined;
    const missing = (what: string): never => {
      throw badInput(`${file}: module ${name} has ${Object.keys(p).map((k) => SUFFIXES.find(([, v]) => v === k)![0].slice(1)).join(', ')} but no ${what}`, file, `${PEFT_PREFIX}${name}`);
    };
    if (isEmb && isLin) throw badInput(`${file}: module ${name} has both linear (lora_A/lora_B) and embedding (lora_embedding_A/B) LoRA tensors`, file);
    if (isEmb) {
      if (!p.ea) missing('lora_embedding_A');
      if (!p.eb) missing('lora_embedding_B');
      if (p.bBias) throw badInput(`${file}: embedding module ${name} has a lora_B.bias (peft has no lora_bias for embeddings)`, file);
      modules.set(name, { name, kind: 'embedding', a: p.ea!, b: p.eb!, magnitude: p.magnitude });
    } else {
      if (!p.a) missing('lora_A.weight');
      if (!p.b) missing('lora_B.weight');
      modules.set(name, { name, kind: 'linear', a: p.a!, b: p.b!, bBias: p.bBias, magnitude: p.magnitude });
    }
  }
  return { modules, replacements };
}

async function isFile(p: string): Promise<boolean> {
  return stat(p).then(
    (s) => s.isFile(),
    () => false,
  );
}

/** Opens a PEFT adapter directory (or its adapter_config.json / weights file). */
export async function openPeftAdapter(path: string): Promise<PeftAdapter> {
  let st;
  try {
    st = await stat(path);
  } catch {
    throw usage(`${path}: no such adapter directory`);
  }
  const dir = st.isDirectory() ? path : join(path, '..');
  const configPath = join(dir, ADAPTER_CONFIG);
  let text: string;
  try {
    text = await readTextFile(configPath);
  } catch {
    const names = await readdir(dir).catch(() => [] as string[]);
    const hint = names.includes('config.json') ? ' (it has a config.json: is this a full model rather than an adapter?)' : '';
    throw badInput(`${dir}: no ${ADAPTER_CONFIG}; a PEFT adapter directory needs it to say how the adapter is applied${hint}`, configPath);
  }
  const config = parseAdapterConfig(text, configPath);
  let weightsFile: string;
  if (!st.isDirectory() && basename(path) !== ADAPTER_CONFIG) weightsFile = path;
  else if (await isFile(join(dir, ADAPTER_SAFETENSORS))) weightsFile = join(dir, ADAPTER_SAFETENSORS);
  else if (await isFile(join(dir, ADAPTER_BIN))) weightsFile = join(dir, ADAPTER_BIN);
  else throw badInput(`${dir}: no ${ADAPTER_SAFETENSORS} or ${ADAPTER_BIN} beside ${ADAPTER_CONFIG}`, dir);
  // A PEFT adapter's weights are one safetensors or torch.save file (never a sharded or DCP dir).
  const open = (await isSafetensorsPath(weightsFile)) ? openSafetensors : (await isTorchPath(weightsFile)) ? openTorch : undefined;
  if (!open) throw badInput(`${weightsFile}: a PEFT adapter's weights are safetensors or torch.save, and this is neither`, weightsFile);
  const source = await open(weightsFile);
  try {
    const { modules, replacements } = groupAdapterTensors(source, weightsFile);
    if (modules.size === 0) throw badInput(`${weightsFile}: no LoRA tensors (lora_A/lora_B or lora_embedding_A/B)`, weightsFile);
    return { dir, config, weightsFile, source, modules, replacements, close: () => source.close() };
  } catch (e) {
    await source.close();
    throw e;
  }
}
