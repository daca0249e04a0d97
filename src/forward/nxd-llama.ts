/**
 * AWS NxD / NxD Training semantics of the dense GQA decoders (HF model style), rank by rank, as
 * neuronx-distributed's parallel layers compute with the shards — not through the layout
 * shardshift's converter writes:
 *
 * - `ParallelEmbedding`: each tensor-parallel rank holds a slice of the vocabulary rows (or,
 *   with `shard_across_embedding`, of the hidden columns); a token's row comes from its rank;
 * - attention per rank: `GQAQKVColumnParallelLinear` (`qkv_proj.weight_q` / `weight_k` /
 *   `weight_v`, or `weight_qkv` = [q; k; v] with `fuse_qkv`) or column-parallel `q_proj` / `k_proj`
 *   / `v_proj` give the rank's own query and key/value heads (K/V possibly replicated by
 *   `kv_size_multiplier`); its query heads attend to its key/value heads (`repeat_kv` over the local
 *   counts); the row-parallel `o_proj` makes a partial sum, and the ranks' partials are all-reduced;
 * - MLP per rank: column-parallel `gate_up_proj` = [gate_r; up_r] (or `gate_proj` / `up_proj`),
 *   row-parallel `down_proj`, partials all-reduced;
 * - `lm_head`: column-parallel, the ranks' vocabulary slices concatenated;
 * - pipeline ranks keep global layer numbers, so a tensor is found in whichever stage holds it.
 *
 * Norms are replicated; rank 0's copy is used. The model's sizes come from the HF config the
 * caller names. Megatron-style NxD names are refused by name.
 */
import { badInput, unsupported } from '../util/errors.js';
import type { SourceTensor } from '../lazy/types.js';
import type { NxdShards } from '../nxd/shards.js';
import { columnParallelHead, project, vocabParallelEmbed, type AttentionShard, type ModelReader, type SwigluReader } from './decoder.js';
import { hfDims, hfNum, type HfConfig } from './hf-config.js';
import { linear } from './linear.js';
import { ref, WeightStore, type WeightRef } from './weights.js';

export const NXD_ARCHITECTURES = ['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen3ForCausalLM'] as const;

/** The store's name of rank `tp`'s tensor `name`. */
const at = (tp: number, name: string): string => `tp${tp}/${name}`;

/** One index over every rank's tensors (`tp<r>/<global name>`), pipeline stages merged. */
export function nxdStore(shards: NxdShards, path: string, blockBytes: number): WeightStore {
  const tensors = new Map<string, SourceTensor>();
  for (const r of shards.ranks) for (const [n, t] of r.tensors) tensors.set(at(r.tp, n), t);
  return new WeightStore({ path, root: path, tensors }, blockBytes);
}

export function nxdLlama(store: WeightStore, tp: number, cfg: HfConfig, file: string): ModelReader {
  const arch = String((cfg.architectures as unknown[] | undefined)?.[0]);
  const path = store.source.path;
  if (!(NXD_ARCHITECTURES as readonly string[]).includes(arch)) throw unsupported(`${file}: ${arch} has no NxD reference forward (${NXD_ARCHITECTURES.join(', ')} do)`, file);
  if (store.has(at(0, 'language_model.embedding.word_embeddings.weight'))) throw unsupported(`${path}: NxD megatron-style shards have no reference forward yet (HF-style shards do)`, path);
  const dims = hfDims(cfg, file);
  const hd = dims.headDim;
  const has = (r: number, n: string) => store.has(at(r, n));
  const need = (r: number, n: string): WeightRef => {
    if (!has(r, n)) throw badInput(`${path}: tp rank ${r} has no ${n}`, path, n);
    return ref(at(r, n));
  };
  const rows = (w: WeightRef) => store.shape(w)[0]!;
  const ranks = [...Array(tp).keys()];

  const attentionShard = (i: number, r: number): AttentionShard => {
    const p = `model.layers.${i}.self_attn`;
    const fused = has(r, `${p}.qkv_proj.weight_qkv`);
    const split = has(r, `${p}.qkv_proj.weight_q`);
    const [q, k, v] = split ? ['q', 'k', 'v'].map((x) => need(r, `${p}.qkv_proj.weight_${x}`)) : fused ? [] : ['q', 'k', 'v'].map((x) => need(r, `${p}.${x}_proj.weight`));
    const out = need(r, `${p}.o_proj.weight`);
    // The rank's query heads: o_proj's input columns (a row-parallel linear over them).
    const heads = store.shape(out)[1]! / hd;
    const qkvRows = fused ? rows(need(r, `${p}.qkv_proj.weight_qkv`)) : rows(q!) + rows(k!) + rows(v!);
    const kvHeads = (qkvRows / hd - heads) / 2;
    if (!Number.isInteger(heads) || !Number.isInteger(kvHeads) || kvHeads < 1 || heads % kvHeads !== 0) {
      throw badInput(`${path}: tp rank ${r}, layer ${i}: ${heads} query heads and ${kvHeads} key/value heads of ${hd} dims do not make grouped-query attention`, path, `${p}.o_proj.weight`);
    }
    return {
      heads,
      kvHeads,
      async qkv(x, T) {
        if (!fused) return { q: await project(store, q!, x, T), k: await project(store, k!, x, T), v: await project(store, v!, x, T) };
        const w = need(r, `${p}.qkv_proj.weight_qkv`);
        const nq = heads * hd;
        const nk = kvHeads * hd;
        return { q: await linear(store, w, x, T, [0, nq]), k: await linear(store, w, x, T, [nq, nq + nk]), v: await linear(store, w, x, T, [nq + nk, nq + 2 * nk]) };
      },
      out,
    };
  };

  const mlpShard = (i: number, r: number): SwigluReader => {
    const p = `model.layers.${i}.mlp`;
    const down = need(r, `${p}.down_proj.weight`);
    if (!has(r, `${p}.gate_up_proj.weight`)) {
      const gate = need(r, `${p}.gate_proj.weight`);
      const up = need(r, `${p}.up_proj.weight`);
      return { gateUp: async (x, T) => ({ gate: await project(store, gate, x, T), up: await project(store, up, x, T) }), down };
    }
    const gu = need(r, `${p}.gate_up_proj.weight`);
    return {
      async gateUp(x, T) {
        const half = rows(gu) / 2;
        return { gate: await linear(store, gu, x, T, [0, half]), up: await linear(store, gu, x, T, [half, 2 * half]) };
      },
      down,
    };
  };

  const qkNorm = (i: number, which: 'q' | 'k'): WeightRef | undefined => {
    for (const n of [`model.layers.${i}.self_attn.${which}_norm.weight`, `model.layers.${i}.self_attn.${which}_layernorm.weight`]) if (has(0, n)) return ref(at(0, n));
    return undefined;
  };

  const embedName = 'model.embed_tokens.weight';
  // Refused before any pass runs: what the reader cannot compute.
  if (!has(0, 'lm_head.weight')) throw unsupported(`${path}: no lm_head in the NxD shards (tied embeddings): it has no NxD reference forward yet`, path);
  const [er, ec] = store.shape(need(0, embedName)) as [number, number];
  const vocabSplit = ec === dims.hidden && er * tp === dims.vocab;
  if (!vocabSplit && !(er === dims.vocab && ec * tp === dims.hidden)) {
    throw badInput(`${path}: ${embedName} is [${er}, ${ec}] on each of ${tp} ranks; neither a vocabulary nor a hidden split of [${dims.vocab}, ${dims.hidden}]`, path, embedName);
  }
  return {
    describe: `${arch} (NxD, tp ${tp})`,
    dims,
    store,
    async embed(tokens) {
      if (vocabSplit) return vocabParallelEmbed(store, ranks.map((r) => ref(at(r, embedName))), tokens, dims.hidden);
      // Hidden columns split over the ranks (shard_across_embedding).
      const H = dims.hidden;
      const parts = await Promise.all(ranks.map((r) => store.gather(ref(at(r, embedName)), tokens)));
      const out = new Float32Array(tokens.length * H);
      for (let t = 0; t < tokens.length; t++) parts.forEach((p, r) => out.set(p.subarray(t * ec, (t + 1) * ec), t * H + r * ec));
      return out;
    },
    layers: hfNum(cfg, 'num_hidden_layers', file),
    attention: (i) => ({
      norm: need(0, `model.layers.${i}.input_layernorm.weight`),
      shards: ranks.map((r) => attentionShard(i, r)),
      ...(qkNorm(i, 'q') ? { qNorm: qkNorm(i, 'q'), kNorm: qkNorm(i, 'k') } : {}),
    }),
    mlp: (i) => ({ kind: 'dense', norm: need(0, `model.layers.${i}.post_attention_layernorm.weight`), shards: ranks.map((r) => mlpShard(i, r)) }),
    finalNorm: need(0, 'model.norm.weight'),
    // Column-parallel: each rank's slice of the vocabulary, concatenated.
    head: (x, T, vocab) => columnParallelHead(store, ranks.map((r) => need(r, 'lm_head.weight')), x, T, vocab),
  };
}
