/**
 * Hugging Face semantics of the dense GQA decoders, as transformers' `modeling_llama.py`,
 * `modeling_mistral.py`, `modeling_qwen2.py` and `modeling_qwen3.py` define them: separate
 * `q_proj` / `k_proj` / `v_proj` (with biases on Qwen2, or where `attention_bias` is set),
 * per-head `q_norm` / `k_norm` before RoPE on Qwen3, `o_proj`; `mlp.gate_proj`, `up_proj`,
 * `down_proj` (`down(silu(gate(x)) · up(x))`); `lm_head` or, with `tie_word_embeddings`, the
 * embedding.
 */
import { project, wholeEnds, type AttentionReader, type ModelReader, type SwigluReader } from './decoder.js';
import { hfDims, hfNum, type HfConfig } from './hf-config.js';
import { ref, type WeightStore } from './weights.js';

export const HF_DENSE_ARCHITECTURES = ['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'] as const;

/** Attention of layer i under transformers' names (shared with the MoE readers). */
export function hfAttention(store: WeightStore, cfg: HfConfig, i: number, file: string): AttentionReader {
  const p = `model.layers.${i}.self_attn`;
  const bias = cfg.model_type === 'qwen2' || cfg.model_type === 'qwen2_moe' || cfg.attention_bias === true;
  const qkNorm = cfg.model_type === 'qwen3' || cfg.model_type === 'qwen3_moe';
  const b = (n: string) => (bias ? ref(`${p}.${n}_proj.bias`) : undefined);
  const heads = hfNum(cfg, 'num_attention_heads', file);
  return {
    norm: ref(`model.layers.${i}.input_layernorm.weight`),
    shards: [
      {
        heads,
        kvHeads: hfNum(cfg, 'num_key_value_heads', file, heads),
        async qkv(x, T) {
          return {
            q: await project(store, ref(`${p}.q_proj.weight`), x, T, b('q')),
            k: await project(store, ref(`${p}.k_proj.weight`), x, T, b('k')),
            v: await project(store, ref(`${p}.v_proj.weight`), x, T, b('v')),
          };
        },
        out: ref(`${p}.o_proj.weight`),
      },
    ],
    ...(qkNorm ? { qNorm: ref(`${p}.q_norm.weight`), kNorm: ref(`${p}.k_norm.weight`) } : {}),
  };
}

/** A gate_proj / up_proj / down_proj SwiGLU MLP under `prefix`. */
export function hfSwiglu(store: WeightStore, prefix: string, names = { gate: 'gate_proj', up: 'up_proj', down: 'down_proj' }): SwigluReader {
  return {
    async gateUp(x, T) {
      return { gate: await project(store, ref(`${prefix}.${names.gate}.weight`), x, T), up: await project(store, ref(`${prefix}.${names.up}.weight`), x, T) };
    },
    down: ref(`${prefix}.${names.down}.weight`),
  };
}

/** Embedding, final norm and head (tied to the embedding when the config says so). */
export function hfEnds(store: WeightStore, cfg: HfConfig, file: string): Pick<ModelReader, 'embed' | 'head' | 'finalNorm' | 'layers'> {
  const tied = cfg.tie_word_embeddings === true;
  return {
    ...wholeEnds(store, ref('model.embed_tokens.weight'), ref(tied ? 'model.embed_tokens.weight' : 'lm_head.weight')),
    finalNorm: ref('model.norm.weight'),
    layers: hfNum(cfg, 'num_hidden_layers', file),
  };
}

/** Everything but the MLP, shared by the dense and MoE readers. */
export function hfDecoder(store: WeightStore, cfg: HfConfig, file: string): Omit<ModelReader, 'mlp'> {
  const arch = String((cfg.architectures as unknown[] | undefined)?.[0]);
  return {
    describe: `${arch} (Hugging Face)`,
    dims: hfDims(cfg, file),
    store,
    ...hfEnds(store, cfg, file),
    attention: (i) => hfAttention(store, cfg, i, file),
  };
}

export function hfDense(store: WeightStore, cfg: HfConfig, file: string): ModelReader {
  return {
    ...hfDecoder(store, cfg, file),
    mlp: (i) => ({ kind: 'dense', norm: ref(`model.layers.${i}.post_attention_layernorm.weight`), shards: [hfSwiglu(store, `model.layers.${i}.mlp`)] }),
  };
}
