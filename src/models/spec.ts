/**
 * What a model family declares: how to read its HF config, and its parameters as a map between
 * HF names and *canonical* Megatron-Core names — the per-layer names a Megatron model's own
 * `state_dict()` has with no parallelism (`decoder.layers.<i>.<param>`, experts as
 * `decoder.layers.<i>.mlp.experts.local_experts.<global e>.<param>`). How those are keyed on disk
 * (torch_dist stacks layers and experts; legacy files split TP/PP/EP and number locally) is the
 * formats' business (`megatron-keys.ts`, `formats/megatron-legacy.ts`), not the families'.
 */
import type { SourceTensor, TargetTensor } from '../formats/types.js';
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
}

export interface GlobalParam {
  readonly megatron: string;
  readonly hf: string;
  /** `vocab`: padded to the Megatron vocabulary on import, cut back on export. */
  readonly kind: 'copy' | 'vocab';
  readonly shape: readonly number[];
}

/** How torch_dist keys a family's layers: stacked `[L, …]` (GPTModel) or one key per layer (MambaModel). */
export type LayerKeying = 'stacked' | 'per-layer';

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
  /**
   * Canonical parameters of layer i that torch_dist stores as several keys `<name>.<suffix>`, each
   * a run of consecutive rows (megatron-core's `_split_tensor_factory`, e.g. GDN `in_proj.weight`).
   */
  torchDistSplits?(c: ModelConfig, layer: number): ReadonlyArray<{ readonly param: string; readonly parts: ReadonlyArray<readonly [suffix: string, rows: number]> }>;
  /** Megatron training-args fields beyond the dense ones (MoE, hybrid pattern …). */
  megatronArgs?(c: ModelConfig): Record<string, PyValue>;
}
