/**
 * What a model family declares: how to read its HF config, and its parameters as a map between
 * HF names and *canonical* Megatron-Core names — the per-layer names a Megatron model's own
 * `state_dict()` has with no parallelism (`decoder.layers.<i>.<param>`, experts as
 * `decoder.layers.<i>.mlp.experts.local_experts.<global e>.<param>`). How those are keyed on disk
 * (torch_dist stacks layers and experts; legacy files split TP/PP/EP and number locally) is the
 * formats' business (`megatron-keys.ts`, `megatron/legacy.ts`), not the families'.
 */
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import type { PyValue } from '../pickle/values.js';
import type { ModelConfig } from './config.js';

/** A tensor (or the sub-tensor at fixed leading indices `prefix`, e.g. expert e of a stacked HF tensor). */
export interface SourcePart {
  readonly src: SourceTensor;
  readonly prefix: readonly number[];
}

/** A layout move that is not a plain copy, QKV interleave or [gate; up] fusion. */
export interface CustomKind {
  readonly id: string;
  /** The Megatron tensor from its HF pieces (each already shape-checked). */
  toMegatron(name: string, pieces: readonly SourcePart[], shape: readonly number[]): TargetTensor;
  /** The HF pieces (names in order of `hf`) from the Megatron tensor. */
  toHf(names: readonly string[], src: SourcePart, shapes: readonly (readonly number[])[]): TargetTensor[];
}

export type ParamKind = 'copy' | 'qkv' | 'gated' | CustomKind;

/**
 * How a parameter's stored dtype is chosen on one side instead of the requested `--dtype`:
 *
 * - `fp32`: always float32 — megatron-core's router `expert_bias` (a float32 buffer it re-casts
 *   before every save), transformers' `_keep_in_fp32_modules_strict` (Nemotron-H's router);
 * - `fp32-with-fp16`: float32 when the requested dtype is float16 (transformers'
 *   `_keep_in_fp32_modules`, e.g. GPT-OSS's norms), else as requested;
 * - `keep-fp32`: float32 when the source holds it in float32 (router weights, Qwen3.5's hub-F32
 *   GatedDeltaNet state), so that a float32 source keeps its precision through a bf16 conversion.
 *
 * Without a rule a parameter takes the requested dtype. Upcasts are exact; the rules only ever
 * keep precision, never drop it.
 */
export type Precision = 'fp32' | 'fp32-with-fp16' | 'keep-fp32';

export interface PrecisionRule {
  readonly hf?: Precision;
  readonly megatron?: Precision;
  /** Why, for the plan (`--dry-run` lists every tensor whose dtype differs from `--dtype`). */
  readonly why: string;
}

/**
 * A parameter of layer i. Names hold `{i}` (layer) and `{e}` (expert) placeholders. An HF piece
 * without `{e}` in an expert parameter is a tensor stacked over experts (`[E, …]`, expert e at
 * index e).
 */
export interface LayerParam {
  /** Canonical Megatron name after `decoder.layers.{i}.` (with `{e}` for experts). */
  readonly megatron: string;
  /** Full HF names of the pieces. */
  readonly hf: readonly string[];
  readonly kind: ParamKind;
  /** Shape of each HF piece (per expert for expert parameters). */
  readonly hfShapes: readonly (readonly number[])[];
  /** Shape of the Megatron tensor (per layer, per expert). */
  readonly shape: readonly number[];
  /** Set for per-expert parameters: the number of experts. */
  readonly experts?: number;
  /** Other canonical names the parameter has in some Megatron checkpoints (local spec, legacy files). */
  readonly aliases?: readonly string[];
  /** Stored dtype rules (default: the requested dtype on both sides). */
  readonly precision?: PrecisionRule;
  /**
   * The Megatron tensor is SwiGLU's `[gate; up]` whatever the HF side looks like (a fused or
   * interleaved HF tensor, a custom kind): tensor parallelism splits each half on its own.
   * Implied by `kind: 'gated'`.
   */
  readonly gateUp?: true;
}

export interface GlobalParam {
  readonly megatron: string;
  readonly hf: string;
  /**
   * `vocab`: padded to the Megatron vocabulary on import, cut back on export; `transpose`: a 2-D
   * weight HF stores input-major (`shape` is Megatron's [out, in], HF holds [in, out]: Gemma 3's
   * `mm_input_projection_weight`).
   */
  readonly kind: 'copy' | 'vocab' | 'transpose';
  readonly shape: readonly number[];
  readonly precision?: PrecisionRule;
  /**
   * More HF names holding the same tensor, which Megatron keeps once: DeepSeek-V3's MTP layers
   * carry their own `embed_tokens` / `shared_head.head` copies of the main embedding and head,
   * where megatron-core's MTP block shares the model's. Skipped (by name) on import, written back
   * from the one Megatron tensor on export.
   */
  readonly hfCopies?: readonly string[];
}

/**
 * A layer parameter megatron-core's `sharded_state_dict` stores as several torch_dist keys
 * `<param>.<suffix>`, consecutive row blocks in order (MambaMixer's `_split_tensor_factory`:
 * `in_proj.weight` → z, x, B, C, dt; `conv1d.weight`/`bias` → x, B, C), each a global tensor.
 */
export interface SplitParam {
  /** Canonical name after `decoder.layers.<i>.`. */
  readonly param: string;
  readonly parts: ReadonlyArray<{ readonly suffix: string; readonly rows: number }>;
}

/** How torch_dist keys a family's layers: stacked `[L, …]` (GPTModel) or one key per layer (MambaModel). */
export type LayerKeying = 'stacked' | 'per-layer';

/**
 * A stack of layers outside the decoder: megatron-core's multi-token-prediction block
 * (`mtp.layers.<k>.…`, always keyed per layer), a vision tower's transformer
 * (`vision_model.decoder.layers.<j>.…`). Its parameters' Megatron names are relative to
 * `<prefix><i>.`; their HF names are full (with `{i}` = this block's layer index, `{e}` = expert).
 */
export interface Block {
  /** Canonical Megatron prefix of layer i, ending in `.` (e.g. `mtp.layers.`). */
  readonly prefix: string;
  readonly layers: number;
  readonly keying: LayerKeying;
  params(i: number): readonly LayerParam[];
  /** Modules of layer i whose empty `_extra_state` megatron-core's strict load expects (names relative to the layer). */
  extraStateModules(i: number): readonly string[];
}

/**
 * What a Megatron checkpoint without an HF config says about its model: Megatron-Bridge's provider
 * class (`run_config.yaml`'s model `_target_`, lower-cased; '' for MLM training args) and the
 * features its config records.
 */
export interface MegatronRecord {
  readonly target: string;
  readonly moe: boolean;
  readonly qkNorm: boolean;
  readonly qkvBias: boolean;
  /** The router has a score-correction bias (`moe_router_enable_expert_bias`: sigmoid-routed DeepSeek-style MoE). */
  readonly expertBias: boolean;
  /** `moe_router_score_function` as recorded (`softmax`, `sigmoid`), when recorded. */
  readonly scoreFunction?: string;
}

export interface Family {
  readonly id: string;
  /** HF `architectures` entries this family handles (first = the one written). */
  readonly architectures: readonly string[];
  readonly modelType: string;
  /** The support matrix's row label. */
  readonly description: string;
  /** stacked for homogeneous GPT layers; per-layer for hybrids and mixed dense/MoE stacks (megatron-core's `non_homogeneous_layers`). */
  keying(c: ModelConfig): LayerKeying;
  /** The normalized config from an HF config.json object. */
  fromHf(cfg: Record<string, unknown>, file: string): ModelConfig;
  globalParams(c: ModelConfig): readonly GlobalParam[];
  layerParams(c: ModelConfig, layer: number): readonly LayerParam[];
  /** Modules of layer i whose empty `_extra_state` megatron-core's strict load expects (canonical names). */
  extraStateModules(c: ModelConfig, layer: number): readonly string[];
  /** Modules outside the layers with an `_extra_state` megatron-core's strict load expects (MambaModel's `output_layer`; GPTModel drops its own). */
  globalExtraStateModules?(c: ModelConfig): readonly string[];
  /** Parameters of layer i stored as several torch_dist keys (none when absent). */
  splitKeys?(c: ModelConfig, layer: number): readonly SplitParam[];
  /**
   * The config refined with what only an HF checkpoint's tensor names tell (`hfLayout`: fused
   * experts, a name prefix; MTP layers a config does not record — Qwen3-Next's has no field).
   */
  fromHfNames?(c: ModelConfig, names: readonly string[], opts?: { readonly dropMtp?: boolean; readonly shapeOf?: (name: string) => readonly number[] | undefined }): ModelConfig;
  /** The HF names of the MTP layers' tensors (what `--drop-mtp` leaves out; default `mtp.*`). */
  mtpHfNames?(c: ModelConfig): RegExp;
  /**
   * The name megatron-core's local (TE-free) layer spec gives a canonical parameter, where the
   * default rule (its `sharded_state_dict_keys_map` folds unfused norms into TE's fused names)
   * does not hold: MLA layers have no keys map, so their local names are their module names.
   */
  localSpecName?(canonical: string): string;
  /**
   * Norms (canonical names after the layer prefix) that tensor parallelism splits like the heads
   * they normalise, where megatron-core replicates every norm: MiniMax-M2's full-width q/k norms
   * (Megatron-Bridge's `FullDimQNorm` / `FullDimKNorm` hold the rows of their rank's heads).
   * torch_dist stores them whole; legacy rank files split them and say so in their args.
   */
  readonly tpShardedNorms?: readonly string[];
  /** Why legacy rank files at TP > 1 are refused, where the family's Megatron model cannot run a TP shard (OLMoE). */
  readonly legacyTpRefusal?: string;
  /** Layer stacks beyond the decoder (MTP, vision tower), in the order their tensors are listed. */
  blocks?(c: ModelConfig): readonly Block[];
  /**
   * A prefix every Megatron name has except those of the listed top-level modules — the wrapper
   * model of a vision-language checkpoint (Megatron-Bridge's Qwen3VLModel keeps the decoder, its
   * embedding, output layer and MTP under `language_model.`, the vision tower under
   * `vision_model.`). Applied by the formats when keying; the maps use unprefixed names.
   */
  megatronPrefix?(c: ModelConfig): { readonly prefix: string; readonly except: readonly string[] } | undefined;
  /**
   * HF weights the family's hub checkpoints store quantized, which `--to hf --quantize <method>`
   * writes back so: the method, the weights (by HF name) and the config.json
   * `quantization_config` the hub carries with them.
   */
  readonly hubQuantized?: { readonly method: 'mxfp4' | 'fp8'; readonly tensors: RegExp; readonly quantizationConfig: Readonly<Record<string, unknown>> };
  /**
   * Whether a Megatron checkpoint that records no HF config is this family's (`models/registry.ts`
   * familyForMegatron): `provider` when Megatron-Bridge's provider class names it, `features` when
   * only its recorded features fit; families that never come from such a checkpoint leave it out.
   */
  megatronClaim?(r: MegatronRecord): 'provider' | 'features' | undefined;
  /** Megatron training-args fields beyond the dense ones (MoE, hybrid pattern …). */
  megatronArgs?(c: ModelConfig): Record<string, PyValue>;
  /**
   * config.json fields beyond the dense ones, when a config is synthesized from a Megatron
   * checkpoint's args (`field` reads an MLM arg / Megatron-Bridge provider field by MLM name).
   */
  hfConfig?(c: ModelConfig, field: (mlmArgName: string) => unknown): Record<string, unknown>;
}
