/**
 * Hugging Face semantics of the routed-MoE decoders: transformers' `modeling_mixtral.py`
 * (`block_sparse_moe.gate`, experts `w1` gate / `w3` up / `w2` down; softmax over all experts,
 * top k, renormalised) and `modeling_qwen3_moe.py` (`mlp.gate`, experts `gate_proj` / `up_proj` /
 * `down_proj`, `num_experts` or transformers 5's `num_local_experts`; renormalised only with `norm_topk_prob`; dense layers where `mlp_only_layers` or
 * `decoder_sparse_step` say). Attention is the dense families' (`hf-dense.ts`).
 */
import { unsupported } from '../util/errors.js';
import type { ModelReader, MlpReader } from './decoder.js';
import { hfDecoder, hfSwiglu } from './hf-dense.js';
import { hfNum, type HfConfig } from './hf-config.js';
import { ref, type WeightStore } from './weights.js';

export const HF_MOE_ARCHITECTURES = ['MixtralForCausalLM', 'Qwen3MoeForCausalLM'] as const;

export function hfMoe(store: WeightStore, cfg: HfConfig, file: string): ModelReader {
  const mixtral = cfg.model_type === 'mixtral';
  const experts = hfNum(cfg, mixtral || cfg.num_experts === undefined ? 'num_local_experts' : 'num_experts', file);
  const topK = hfNum(cfg, 'num_experts_per_tok', file);
  if (store.has('model.layers.0.mlp.experts.gate_up_proj')) throw unsupported(`${file}: fused expert tensors (experts.gate_up_proj) have no reference forward yet; per-expert names do`, file);
  const dense = new Set(Array.isArray(cfg.mlp_only_layers) ? (cfg.mlp_only_layers as number[]) : []);
  const step = mixtral ? 1 : hfNum(cfg, 'decoder_sparse_step', file, 1);
  const isMoe = (i: number) => !dense.has(i) && experts > 0 && (i + 1) % step === 0;
  const rule = mixtral || cfg.norm_topk_prob === true ? 'softmax-topk-renorm' : 'softmax-topk';
  return {
    ...hfDecoder(store, cfg, file),
    mlp(i): MlpReader {
      const norm = ref(`model.layers.${i}.post_attention_layernorm.weight`);
      if (!isMoe(i)) return { kind: 'dense', norm, shards: [hfSwiglu(store, `model.layers.${i}.mlp`)] };
      const p = mixtral ? `model.layers.${i}.block_sparse_moe` : `model.layers.${i}.mlp`;
      return {
        kind: 'moe',
        norm,
        router: ref(`${p}.gate.weight`),
        experts,
        routing: { topK, rule },
        expert: (e) => (mixtral ? hfSwiglu(store, `${p}.experts.${e}`, { gate: 'w1', up: 'w3', down: 'w2' }) : hfSwiglu(store, `${p}.experts.${e}`)),
      };
    },
  };
}
