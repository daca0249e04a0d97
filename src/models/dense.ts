/**
 * The HF ↔ Megatron-Core parameter map of a dense Llama-style decoder (Llama, Mistral, Qwen2,
 * Qwen3), as Megatron-Bridge's bridges define it, with the typed layout moves it needs:
 *
 * - `linear_qkv` rows grouped per query group: for g in 0..ng−1, the r = np/ng query heads of
 *   group g, then key head g, then value head g (each `kv_channels` rows); its bias likewise;
 * - gated `linear_fc1` = [gate_proj; up_proj];
 * - word embeddings / output layer padded to `make_vocab_size_divisible_by × tp` rows on import
 *   and cut back to the HF vocab on export; no `output_layer` when embeddings are tied;
 * - torch_dist stacks layers: `decoder.layers.<param>` of shape [L, …], one chunk per layer.
 *
 * A family is a small spec (its HF architecture names and which optional parameters it has);
 * the map itself is data, shared.
 */
import type { ModelConfig } from './config.js';

/** A per-layer parameter: its torch_dist name (after `decoder.layers.`) and its HF pieces (after `model.layers.N.`). */
export interface LayerParam {
  readonly megatron: string;
  readonly hf: readonly string[];
  /** How the HF pieces combine: 1:1, QKV interleave per query group, or [gate; up]. */
  readonly kind: 'copy' | 'qkv' | 'gated';
  /** Present only for configs where this holds. */
  readonly when?: (c: ModelConfig) => boolean;
  /** Other names the same parameter has in Megatron checkpoints (local spec, legacy files). */
  readonly aliases?: readonly string[];
}

export interface GlobalParam {
  readonly megatron: string;
  readonly hf: string;
  readonly kind: 'copy' | 'vocab';
  readonly when?: (c: ModelConfig) => boolean;
}

export const DENSE_LAYER_PARAMS: readonly LayerParam[] = [
  { megatron: 'self_attention.linear_qkv.layer_norm_weight', hf: ['input_layernorm.weight'], kind: 'copy', aliases: ['input_layernorm.weight'] },
  { megatron: 'self_attention.linear_qkv.weight', hf: ['self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight'], kind: 'qkv' },
  {
    megatron: 'self_attention.linear_qkv.bias',
    hf: ['self_attn.q_proj.bias', 'self_attn.k_proj.bias', 'self_attn.v_proj.bias'],
    kind: 'qkv',
    when: (c) => c.qkvBias,
  },
  { megatron: 'self_attention.q_layernorm.weight', hf: ['self_attn.q_norm.weight'], kind: 'copy', when: (c) => c.qkNorm },
  { megatron: 'self_attention.k_layernorm.weight', hf: ['self_attn.k_norm.weight'], kind: 'copy', when: (c) => c.qkNorm },
  { megatron: 'self_attention.linear_proj.weight', hf: ['self_attn.o_proj.weight'], kind: 'copy' },
  { megatron: 'mlp.linear_fc1.layer_norm_weight', hf: ['post_attention_layernorm.weight'], kind: 'copy', aliases: ['pre_mlp_layernorm.weight'] },
  { megatron: 'mlp.linear_fc1.weight', hf: ['mlp.gate_proj.weight', 'mlp.up_proj.weight'], kind: 'gated' },
  { megatron: 'mlp.linear_fc2.weight', hf: ['mlp.down_proj.weight'], kind: 'copy' },
];

export const DENSE_GLOBAL_PARAMS: readonly GlobalParam[] = [
  { megatron: 'embedding.word_embeddings.weight', hf: 'model.embed_tokens.weight', kind: 'vocab' },
  { megatron: 'decoder.final_layernorm.weight', hf: 'model.norm.weight', kind: 'copy' },
  { megatron: 'output_layer.weight', hf: 'lm_head.weight', kind: 'vocab', when: (c) => !c.tieEmbeddings },
];

/**
 * Layer modules whose `_extra_state` megatron-core expects in a torch_dist checkpoint (its
 * linears; strict loading fails without them). Without FP8 they hold no state: each is the bytes
 * item `decoder.layers.<module>._extra_state/shard_<l>_<L>` = torch.save([None]).
 */
export const DENSE_EXTRA_STATE_MODULES: readonly string[] = [
  'self_attention.linear_qkv',
  'self_attention.linear_proj',
  'mlp.linear_fc1',
  'mlp.linear_fc2',
];

/** HF tensors a converter may meet and drop by a named rule. */
export const HF_IGNORED: ReadonlyArray<{ pattern: RegExp; reason: string }> = [
  { pattern: /\.rotary_emb\.inv_freq$/, reason: 'rotary inverse frequencies are recomputed from the config' },
];

/** Megatron entries that are not model weights, skipped by a named rule. */
export const MEGATRON_IGNORED: ReadonlyArray<{ pattern: RegExp; reason: string }> = [
  { pattern: /^optimizer\.|^chained_\d+\.optimizer\./, reason: 'optimizer state' },
  { pattern: /^rng_state/, reason: 'RNG state' },
  { pattern: /^rerun_state_machine_state/, reason: 'rerun state machine' },
  { pattern: /^common_state/, reason: 'common (non-tensor) state' },
  { pattern: /_extra_state(\d*)(\/|$)/, reason: 'TransformerEngine extra state (FP8 metadata)' },
];

export interface DenseFamily {
  readonly id: string;
  /** HF `architectures` entries this family handles. */
  readonly architectures: readonly string[];
  readonly modelType: string;
  readonly qkvBias: boolean;
  readonly qkNorm: boolean;
  readonly description: string;
}
