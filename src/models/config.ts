/**
 * The normalized model config: what the parameter maps need, read from a Hugging Face
 * `config.json` or from a Megatron checkpoint's recorded config, and written back to both.
 */
import { badInput, unsupported } from '../util/errors.js';

export interface ModelConfig {
  /** Family id from the registry (llama, mistral, qwen2, qwen3 ...). */
  readonly family: string;
  readonly numLayers: number;
  readonly hiddenSize: number;
  readonly ffnHiddenSize: number;
  readonly numAttentionHeads: number;
  /** KV heads (Megatron's num_query_groups). */
  readonly numQueryGroups: number;
  /** Head dim (Megatron's kv_channels). */
  readonly kvChannels: number;
  /** The tokenizer vocabulary (HF vocab_size): rows beyond it are padding. */
  readonly vocabSize: number;
  readonly tieEmbeddings: boolean;
  readonly qkvBias: boolean;
  readonly qkNorm: boolean;
  /** Mixture-of-experts layers, when the model has them. */
  readonly moe?: MoeConfig;
  /** Hybrid (Mamba / attention / MLP / MoE) layer stacks: megatron-core's MambaModel. */
  readonly hybrid?: HybridConfig;
  /** Multi-latent attention (DeepSeek-V2/V3, Kimi K2): its low-rank projection sizes, in place of `linear_qkv`. */
  readonly mla?: MlaConfig;
  /** Multi-token-prediction layers (megatron-core's MTP block, the hub's `mtp.*`), when mapped. */
  readonly mtpLayers?: number;
  /** How the HF checkpoint lays its tensors out where the config does not say (read from its names, recorded in Megatron args). */
  readonly hfLayout?: HfLayout;
  /** The HF config.json this came from, when known (carried to HF outputs). */
  readonly hf?: Readonly<Record<string, unknown>>;
}

/**
 * How an HF checkpoint stores MoE experts: one tensor per expert and projection; fused per layer
 * output-major as transformers 5 holds them (`gate_up_proj` [E, 2F, H], `down_proj` [E, H, F]); or
 * fused input-major (`fused-input-major`: [E, H, 2F] / [E, F, H], Qwen3-VL-MoE's hub files).
 */
export type ExpertLayout = 'per-expert' | 'fused' | 'fused-input-major';

/**
 * Facts of an HF checkpoint's naming that its config does not record, found from its tensor names
 * on import and kept in the Megatron args (`shardshift_hf_layout`) so the export writes the same.
 */
export interface HfLayout {
  /** MoE experts of the decoder (default per expert). */
  readonly experts?: ExpertLayout;
  /** MoE experts of the MTP layers (the Qwen3.5 hub checkpoints fuse the decoder's, not the MTP layer's). */
  readonly mtpExperts?: ExpertLayout;
  /**
   * `false` when the checkpoint's DeepSeek-style MTP layers do not carry their own copies of the
   * embedding and head (`model.layers.<L+k>.embed_tokens` / `shared_head.head`): GLM-4.6 and 4.7
   * dropped them, GLM-4.5 and DeepSeek-V3 have them (absent = they do).
   */
  readonly mtpCopies?: false;
  /** The vision tower's name prefix where checkpoints differ (Gemma 3: `vision_tower.vision_model.` on the hub, `vision_tower.` in transformers 5 saves). */
  readonly visionPrefix?: string;
  /** The text model's name prefix where a family has two (`model.` or `model.language_model.`: a Qwen3.5 causal LM re-saved from a VL checkpoint). */
  readonly textPrefix?: string;
}

/**
 * Multi-latent attention's sizes (HF DeepseekV3Config ↔ megatron-core MLATransformerConfig):
 * queries through a rank-`qLoraRank` bottleneck (or one `q_proj` when absent), keys and values
 * through a rank-`kvLoraRank` latent plus a shared rope key of `qkRopeHeadDim`.
 */
export interface MlaConfig {
  /** HF q_lora_rank; undefined = a plain `q_proj` (V2-Lite, Moonlight). */
  readonly qLoraRank?: number;
  readonly kvLoraRank: number;
  /** HF qk_nope_head_dim (megatron-core qk_head_dim). */
  readonly qkNopeHeadDim: number;
  /** HF qk_rope_head_dim (megatron-core qk_pos_emb_head_dim). */
  readonly qkRopeHeadDim: number;
  readonly vHeadDim: number;
}

export interface MoeConfig {
  readonly numExperts: number;
  readonly topK: number;
  /** Each routed expert's intermediate size (Megatron's moe_ffn_hidden_size). */
  readonly ffnHiddenSize: number;
  /** Shared experts' total intermediate size (moe_shared_expert_intermediate_size), when present. */
  readonly sharedExpertFfn?: number;
  /** A sigmoid gate on the shared expert's output (Qwen2-MoE / Qwen3-Next `shared_expert_gate`). */
  readonly sharedExpertGate?: boolean;
  /** The router's per-expert score-correction bias (Megatron `router.expert_bias`). */
  readonly routerBias?: boolean;
  /** Which layers are MoE (the rest dense), when not all are. */
  readonly moeLayers?: readonly boolean[];
}

/**
 * A hybrid stack as megatron-core's `hybrid_override_pattern` spells it, one char per layer:
 * `M` Mamba-2 mixer, `*` self-attention, `-` MLP, `E` MoE; with the Mamba-2 mixer's sizes.
 */
export interface HybridConfig {
  readonly pattern: string;
  readonly mamba: {
    readonly numHeads: number;
    readonly headDim: number;
    /** B/C groups (Megatron mamba_num_groups, HF n_groups). */
    readonly numGroups: number;
    /** SSM state size (Megatron mamba_state_dim, HF ssm_state_size). */
    readonly stateDim: number;
    readonly convKernel: number;
    readonly convBias: boolean;
  };
}

/** Whether layer i is an MoE layer. */
export function isMoeLayer(c: ModelConfig, i: number): boolean {
  return c.moe !== undefined && (c.moe.moeLayers?.[i] ?? true);
}

/** Megatron's padded vocab: `ceil(V / (divisor × tp)) × divisor × tp`. */
export function paddedVocab(vocab: number, divisor: number, tp: number): number {
  const m = divisor * tp;
  return Math.ceil(vocab / m) * m;
}

export function num(cfg: Record<string, unknown>, key: string, file: string, fallback?: number): number {
  const v = cfg[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) {
    throw badInput(`${file}: ${key} is ${JSON.stringify(cfg[key])}, expected a positive integer`, file);
  }
  return v;
}

/** Checks the shape facts every map relies on; names the offending keys. */
export function validateConfig(c: ModelConfig, file: string): void {
  if (c.moe && (c.moe.topK > c.moe.numExperts || c.moe.topK < 1)) {
    throw badInput(`${file}: ${c.moe.topK} experts per token but ${c.moe.numExperts} experts`, file);
  }
  if (c.numAttentionHeads % c.numQueryGroups !== 0) {
    throw badInput(
      `${file}: num_attention_heads (${c.numAttentionHeads}) is not a multiple of num_key_value_heads (${c.numQueryGroups})`,
      file,
    );
  }
}

/** Reads the fields of a Llama-like decoder from an HF config.json object. */
export function fromHfConfig(family: string, cfg: Record<string, unknown>, file: string, opts: { qkvBias: boolean; qkNorm: boolean }): ModelConfig {
  const hidden = num(cfg, 'hidden_size', file);
  const heads = num(cfg, 'num_attention_heads', file);
  const kvHeads = num(cfg, 'num_key_value_heads', file, heads);
  if (cfg.head_dim === undefined && hidden % heads !== 0) {
    throw badInput(`${file}: hidden_size (${hidden}) is not a multiple of num_attention_heads (${heads}) and head_dim is not given`, file);
  }
  const headDim = cfg.head_dim === undefined || cfg.head_dim === null ? hidden / heads : num(cfg, 'head_dim', file);
  if (cfg.attention_bias === true && !opts.qkvBias) {
    throw unsupported(`${file}: attention_bias=true is not supported for ${family} (only Qwen2-style q/k/v biases are mapped)`, file);
  }
  if (cfg.mlp_bias === true) throw unsupported(`${file}: mlp_bias=true is not supported`, file);
  const c: ModelConfig = {
    family,
    numLayers: num(cfg, 'num_hidden_layers', file),
    hiddenSize: hidden,
    ffnHiddenSize: num(cfg, 'intermediate_size', file),
    numAttentionHeads: heads,
    numQueryGroups: kvHeads,
    kvChannels: headDim,
    vocabSize: num(cfg, 'vocab_size', file),
    // transformers' PretrainedConfig defaults tie_word_embeddings to true.
    tieEmbeddings: cfg.tie_word_embeddings === undefined ? true : cfg.tie_word_embeddings === true,
    qkvBias: opts.qkvBias || cfg.attention_bias === true,
    qkNorm: opts.qkNorm,
    hf: cfg,
  };
  validateConfig(c, file);
  return c;
}

/** The text section of an HF config (`text_config` of a VL wrapper; the config itself otherwise). */
export function textConfig(cfg: Readonly<Record<string, unknown>>): Record<string, unknown> {
  const t = cfg.text_config;
  return t && typeof t === 'object' && !Array.isArray(t) ? (t as Record<string, unknown>) : (cfg as Record<string, unknown>);
}

/** The MoE section of a config a family's map needs (a Megatron record without `num_experts` has none). */
export function moeOf(c: ModelConfig): MoeConfig {
  if (!c.moe) throw badInput(`a ${c.family} checkpoint records no MoE section (num_experts / num_moe_experts); give --hf-model <reference HF dir>`);
  return c.moe;
}

/** `partial_rotary_factor`, at the top level (hub configs) or in transformers 5's `rope_parameters`; 1 when absent. */
export function partialRotaryFactor(h: Readonly<Record<string, unknown>>): number {
  const rp = h.rope_parameters as Record<string, unknown> | undefined;
  const v = h.partial_rotary_factor ?? rp?.partial_rotary_factor;
  return typeof v === 'number' ? v : 1;
}

/**
 * A VL wrapper's `vision_config` as a reader of positive-integer fields (`d`: transformers'
 * default when the field is absent); a missing section or a bad field is named.
 */
export function visionConfigReader(c: ModelConfig, architecture: string): { readonly raw: Readonly<Record<string, unknown>>; readonly int: (k: string, d?: number) => number } {
  const v = c.hf?.vision_config as Record<string, unknown> | undefined;
  if (!v || typeof v !== 'object') throw badInput(`config.json: a ${architecture} config needs its vision_config`);
  return {
    raw: v,
    int: (k, d) => {
      const x = v[k] ?? d;
      if (typeof x !== 'number' || !Number.isInteger(x) || x <= 0) throw badInput(`config.json: vision_config.${k} is ${JSON.stringify(v[k])}, expected a positive integer`);
      return x;
    },
  };
}

/**
 * The Megatron args of a Qwen-VL text config's multimodal RoPE (`mrope_section` in transformers 5's
 * `rope_parameters` or 4's `rope_scaling`): a position-id matter with no weight of its own; none
 * when the config has plain 1-D RoPE.
 */
export function mropeArgs(text: Readonly<Record<string, unknown>>): { position_embedding_type: string; mrope_section: number[] } | Record<string, never> {
  const rp = (text.rope_parameters ?? text.rope_scaling) as Record<string, unknown> | null | undefined;
  const s = rp?.mrope_section;
  return Array.isArray(s) && s.every((x) => typeof x === 'number') ? { position_embedding_type: 'mrope', mrope_section: s as number[] } : {};
}
