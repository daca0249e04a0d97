/**
 * DeepSeek-V3 (V3, V3-0324, V3.1, R1), Moonlight and Kimi K2 — `DeepseekV3ForCausalLM` — as
 * Megatron-Bridge's DeepSeek bridge (`models/deepseek/common.py`, `deepseek_v3_bridge.py`) maps
 * it onto megatron-core's GPTModel with multi-latent attention (`multi_latent_attention`,
 * `transformer/multi_latent_attention.py`):
 *
 * - MLA, every tensor a plain copy: `q_a_proj` / `q_a_layernorm` / `q_b_proj` →
 *   `linear_q_down_proj` / `linear_q_up_proj.layer_norm_weight` / `linear_q_up_proj` (or `q_proj`
 *   → `linear_q_proj` when `q_lora_rank` is null), `kv_a_proj_with_mqa` / `kv_a_layernorm` /
 *   `kv_b_proj` → `linear_kv_down_proj` / `linear_kv_up_proj.layer_norm_weight` /
 *   `linear_kv_up_proj`, `o_proj` → `linear_proj`, `input_layernorm` stays `input_layernorm`
 *   (both down projections read the normed input, so TE cannot fuse it). No rope/nope reordering:
 *   both sides keep each query head as [nope; rope] and the latent as [kv_lora; rope], and both
 *   de-interleave the rope dims when applying RoPE (transformers' `rope_interleave`,
 *   megatron-core's `multi_latent_attention` branch of `apply_rotary_pos_emb`);
 * - MoE from layer `first_k_dense_replace` on (megatron-core `moe_layer_freq` as a list, hence
 *   one torch_dist key per layer): sigmoid router `mlp.gate.weight` → `mlp.router.weight`,
 *   `mlp.gate.e_score_correction_bias` → `mlp.router.expert_bias` in float32 on both sides,
 *   routed experts by global index, `n_shared_experts` shared experts (one MLP of
 *   `n_shared_experts × moe_intermediate_size`); `post_attention_layernorm` is
 *   `pre_mlp_layernorm` in MoE layers and `mlp.linear_fc1.layer_norm_weight` in dense ones;
 * - multi-token prediction (`num_nextn_predict_layers`): HF layer `num_hidden_layers + k` with
 *   `enorm`, `hnorm`, `eh_proj` ([embedding; hidden] on both sides), `shared_head.norm` →
 *   megatron-core's `mtp.layers.<k>.enorm` / `hnorm` / `eh_proj` / `final_layernorm`, its
 *   decoder layer → `mtp.layers.<k>.transformer_layer.*` (an MoE layer like the decoder's last);
 *   the hub's per-MTP-layer `embed_tokens` and `shared_head.head` are copies of the main
 *   embedding and head, which megatron-core's MTP block shares (written back on export);
 * - `rotary_emb.inv_freq` is never converted (recomputed from the config; Megatron-Bridge#1861).
 *
 * FP8 block-scaled hub weights are the source's business (`formats/fp8-block.ts`), not the map's.
 */
import { badInput, unsupported } from '../util/errors.js';
import { PyFloat, type PyValue } from '../pickle/values.js';
import { isMoeLayer, num, validateConfig, type ExpertLayout, type MlaConfig, type ModelConfig } from './config.js';
import { denseGlobals, denseMlpParams, moeArgs, moeExtraState, moeParams } from './dense.js';
import { hubMtpBlock, hubMtpLayerCount, hubMtpLayout, hubMtpNames, mtpLayersOf, withHubMtpCopies } from './hub-mtp.js';
import type { Block, Family, GlobalParam, LayerParam } from './spec.js';

const L = 'model.layers.{i}';

function mlaOf(c: ModelConfig): MlaConfig {
  if (!c.mla) throw new Error(`internal: ${c.family} config without its MLA sizes`);
  return c.mla;
}

/** A nullable positive integer field (q_lora_rank: null means no query bottleneck). */
function optionalNum(cfg: Record<string, unknown>, key: string, file: string): number | undefined {
  return cfg[key] === null || cfg[key] === undefined ? undefined : num(cfg, key, file);
}

/** MLA attention of a layer whose HF names start with `P` (`{i}` = layer). */
function mlaParams(c: ModelConfig, P: string): LayerParam[] {
  const m = mlaOf(c);
  const H = c.hiddenSize;
  const n = c.numAttentionHeads;
  const qHead = m.qkNopeHeadDim + m.qkRopeHeadDim;
  const A = `${P}.self_attn`;
  const copy = (megatron: string, hf: string, shape: number[], aliases?: string[]): LayerParam => ({ megatron, hf: [hf], kind: 'copy', hfShapes: [shape], shape, ...(aliases ? { aliases } : {}) });
  return [
    copy('input_layernorm.weight', `${P}.input_layernorm.weight`, [H]),
    ...(m.qLoraRank === undefined
      ? [copy('self_attention.linear_q_proj.weight', `${A}.q_proj.weight`, [n * qHead, H])]
      : [
          copy('self_attention.linear_q_down_proj.weight', `${A}.q_a_proj.weight`, [m.qLoraRank, H]),
          copy('self_attention.linear_q_up_proj.layer_norm_weight', `${A}.q_a_layernorm.weight`, [m.qLoraRank], ['self_attention.q_layernorm.weight']),
          copy('self_attention.linear_q_up_proj.weight', `${A}.q_b_proj.weight`, [n * qHead, m.qLoraRank]),
        ]),
    copy('self_attention.linear_kv_down_proj.weight', `${A}.kv_a_proj_with_mqa.weight`, [m.kvLoraRank + m.qkRopeHeadDim, H]),
    copy('self_attention.linear_kv_up_proj.layer_norm_weight', `${A}.kv_a_layernorm.weight`, [m.kvLoraRank], ['self_attention.kv_layernorm.weight']),
    copy('self_attention.linear_kv_up_proj.weight', `${A}.kv_b_proj.weight`, [n * (m.qkNopeHeadDim + m.vHeadDim), m.kvLoraRank]),
    copy('self_attention.linear_proj.weight', `${A}.o_proj.weight`, [H, n * m.vHeadDim]),
  ];
}

/** The MLP of a layer at HF prefix `P`: dense (the first `first_k_dense_replace`) or MoE with shared experts. */
function mlpParams(c: ModelConfig, P: string, moe: boolean, experts: ExpertLayout): LayerParam[] {
  if (!moe) return denseMlpParams(c, `${P}.mlp`, `${P}.post_attention_layernorm.weight`);
  const M = `${P}.mlp`;
  return moeParams(c, {
    norm: `${P}.post_attention_layernorm.weight`,
    router: `${M}.gate.weight`,
    routerBias: `${M}.gate.e_score_correction_bias`,
    // Not `routerFp32`: transformers upcasts both on load (_keep_in_fp32_modules_strict), but the hub
    // stores the router weight in bf16 (DeepSeek's own Gate keeps only its bias in float32), so a
    // float32 source stays float32 and a bf16 one bf16; the bias is float32 in Megatron whatever.
    gate: `${M}.experts.{e}.gate_proj.weight`,
    up: `${M}.experts.{e}.up_proj.weight`,
    down: `${M}.experts.{e}.down_proj.weight`,
    ...(experts === 'fused' ? { fused: { gateUp: `${M}.experts.gate_up_proj`, down: `${M}.experts.down_proj` } } : {}),
    shared: { gate: `${M}.shared_experts.gate_proj.weight`, up: `${M}.shared_experts.up_proj.weight`, down: `${M}.shared_experts.down_proj.weight` },
  });
}

function layerParams(c: ModelConfig, P: string, moe: boolean, experts: ExpertLayout): LayerParam[] {
  return [...mlaParams(c, P), ...mlpParams(c, P, moe, experts)];
}

/** The TE linears of a layer (their `_extra_state`, which megatron-core's strict load expects). */
function extraState(c: ModelConfig, moe: boolean): string[] {
  const attn = c.mla?.qLoraRank === undefined ? ['self_attention.linear_q_proj'] : ['self_attention.linear_q_down_proj', 'self_attention.linear_q_up_proj'];
  const out = [...attn, 'self_attention.linear_kv_down_proj', 'self_attention.linear_kv_up_proj', 'self_attention.linear_proj'];
  return moe ? [...out, ...moeExtraState(c)] : [...out, 'mlp.linear_fc1', 'mlp.linear_fc2'];
}

/** megatron-core's MTP block: the hub's layers `num_hidden_layers + k`, each an MoE layer like the decoder's last. */
function mtpBlock(c: ModelConfig): Block {
  const moe = isMoeLayer(c, c.numLayers - 1);
  return hubMtpBlock(c, (P) => layerParams(c, P, moe, c.hfLayout?.mtpExperts ?? 'per-expert'), extraState(c, moe));
}

/** MLA's local-spec module names (no `sharded_state_dict_keys_map`: they are its torch_dist keys too). */
const LOCAL_NAMES: ReadonlyArray<readonly [RegExp, string]> = [
  [/(^|\.)self_attention\.linear_q_up_proj\.layer_norm_weight$/, '$1self_attention.q_layernorm.weight'],
  [/(^|\.)self_attention\.linear_kv_up_proj\.layer_norm_weight$/, '$1self_attention.kv_layernorm.weight'],
  [/(^|\.)mlp\.linear_fc1\.layer_norm_weight$/, '$1pre_mlp_layernorm.weight'],
];

function ropeScalingArgs(hf: Readonly<Record<string, unknown>>): Record<string, PyValue> {
  const rs = (hf.rope_scaling ?? hf.rope_parameters) as Record<string, unknown> | null | undefined;
  const type = rs?.rope_type ?? rs?.type;
  if (!rs || type === undefined || type === 'default') return { rope_type: 'rope' };
  if (type !== 'yarn') throw unsupported(`config.json: rope_scaling type ${JSON.stringify(type)}; DeepSeek-V3 checkpoints use yarn (or none)`, 'config.json');
  const f = (k: string, d: number): PyFloat => new PyFloat(typeof rs[k] === 'number' ? (rs[k] as number) : d);
  return {
    rope_type: 'yarn',
    rotary_scaling_factor: f('factor', 40),
    original_max_position_embeddings: typeof rs.original_max_position_embeddings === 'number' ? rs.original_max_position_embeddings : 4096,
    beta_fast: f('beta_fast', 32),
    beta_slow: f('beta_slow', 1),
    mscale: f('mscale', 1),
    mscale_all_dim: f('mscale_all_dim', 0),
  };
}

export const deepseekV3: Family = {
  id: 'deepseek_v3',
  // V3.2 is recognised so that it is refused by name (below), not as an unknown architecture.
  architectures: ['DeepseekV3ForCausalLM', 'DeepseekV32ForCausalLM'],
  modelType: 'deepseek_v3',
  description: 'DeepSeek-V3 / R1, Kimi K2, Moonlight (MLA, MoE, MTP; FP8 block-scaled weights read as bf16)',
  // deepseek-ai/DeepSeek-V3's config.json, as published: every linear of attention and MLP in FP8
  // (not the embeddings, head, norms, router or the MTP eh_proj).
  hubQuantized: {
    method: 'fp8',
    tensors: /\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)|mlp\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj))\.weight$/,
    quantizationConfig: { activation_scheme: 'dynamic', fmt: 'e4m3', quant_method: 'fp8', weight_block_size: [128, 128] },
  },
  // megatron-core keys layers one by one whenever moe_layer_freq is a list, which Megatron-Bridge always passes.
  keying: () => 'per-layer',
  fromHf(cfg, file): ModelConfig {
    const archs = Array.isArray(cfg.architectures) ? cfg.architectures : [];
    if (archs.includes('DeepseekV32ForCausalLM') || cfg.model_type === 'deepseek_v32' || cfg.index_n_heads !== undefined) {
      throw unsupported(
        `${file}: DeepSeek-V3.2's sparse-attention indexer (self_attn.indexer.wq_b, wk, k_norm, weights_proj) has no Megatron mapping yet — Megatron-Bridge maps DeepSeek-V3 and V4, not V3.2's DSA indexer — so V3.2 is not converted rather than converted without it`,
        file,
      );
    }
    if (cfg.attention_bias === true) throw unsupported(`${file}: attention_bias=true is not supported for DeepSeek-V3 (its MLA projections have no biases)`, file);
    if (cfg.mlp_bias === true) throw unsupported(`${file}: mlp_bias=true is not supported`, file);
    const hidden = num(cfg, 'hidden_size', file);
    const heads = num(cfg, 'num_attention_heads', file);
    const layers = num(cfg, 'num_hidden_layers', file);
    const mla: MlaConfig = {
      ...(optionalNum(cfg, 'q_lora_rank', file) !== undefined ? { qLoraRank: optionalNum(cfg, 'q_lora_rank', file)! } : {}),
      kvLoraRank: num(cfg, 'kv_lora_rank', file),
      qkNopeHeadDim: num(cfg, 'qk_nope_head_dim', file),
      qkRopeHeadDim: num(cfg, 'qk_rope_head_dim', file),
      vHeadDim: num(cfg, 'v_head_dim', file),
    };
    // transformers 5 maps n_routed_experts to num_local_experts (DeepseekV3Config.attribute_map).
    const E = num(cfg, cfg.n_routed_experts === undefined ? 'num_local_experts' : 'n_routed_experts', file);
    const topK = num(cfg, 'num_experts_per_tok', file);
    const dense = cfg.first_k_dense_replace ?? 0;
    if (typeof dense !== 'number' || !Number.isInteger(dense) || dense < 0 || dense > layers) {
      throw badInput(`${file}: first_k_dense_replace is ${JSON.stringify(cfg.first_k_dense_replace)}, expected 0 … ${layers}`, file);
    }
    const every = cfg.moe_layer_freq ?? 1;
    if (every !== 1) throw unsupported(`${file}: moe_layer_freq ${JSON.stringify(every)}; DeepSeek-V3 checkpoints have an MoE MLP in every layer after the dense prefix`, file);
    const nShared = cfg.n_shared_experts ?? 0;
    if (typeof nShared !== 'number' || !Number.isInteger(nShared) || nShared < 0) throw badInput(`${file}: n_shared_experts is ${JSON.stringify(cfg.n_shared_experts)}`, file);
    const F = num(cfg, 'moe_intermediate_size', file);
    const groups = num(cfg, 'n_group', file, 1);
    if (E % groups !== 0) throw badInput(`${file}: n_group (${groups}) does not divide the ${E} routed experts`, file);
    if (num(cfg, 'topk_group', file, 1) > groups) throw badInput(`${file}: topk_group (${String(cfg.topk_group)}) exceeds n_group (${groups})`, file);
    // megatron-core's sigmoid router always renormalises the top-k scores (topk > 1) and picks with
    // the score-correction bias: other routers would convert into a model that routes differently.
    if (cfg.norm_topk_prob === false && topK > 1) throw unsupported(`${file}: norm_topk_prob=false; megatron-core's sigmoid router always renormalises the top-${topK} scores, so the converted model would route differently`, file);
    if (cfg.scoring_func !== undefined && cfg.scoring_func !== 'sigmoid') throw unsupported(`${file}: scoring_func ${JSON.stringify(cfg.scoring_func)}; DeepSeek-V3's router (and megatron-core's mapping of it) scores with a sigmoid`, file);
    if (cfg.topk_method !== undefined && cfg.topk_method !== 'noaux_tc') throw unsupported(`${file}: topk_method ${JSON.stringify(cfg.topk_method)}; DeepSeek-V3 selects experts by noaux_tc (group-limited top-k with the score-correction bias)`, file);
    const mtp = mtpLayersOf(cfg, file);
    const moeLayers = Array.from({ length: layers }, (_, i) => i >= dense);
    const c: ModelConfig = {
      family: 'deepseek_v3',
      numLayers: layers,
      hiddenSize: hidden,
      ffnHiddenSize: num(cfg, 'intermediate_size', file),
      numAttentionHeads: heads,
      // MLA has no grouped KV heads: every query head has its own key and value (from the shared latent).
      numQueryGroups: heads,
      kvChannels: mla.qkNopeHeadDim + mla.qkRopeHeadDim,
      vocabSize: num(cfg, 'vocab_size', file),
      tieEmbeddings: cfg.tie_word_embeddings === true,
      qkvBias: false,
      qkNorm: true,
      mla,
      moe: {
        numExperts: E,
        topK,
        ffnHiddenSize: F,
        ...(nShared > 0 ? { sharedExpertFfn: nShared * F } : {}),
        routerBias: true,
        ...(moeLayers.every((x) => x) ? {} : { moeLayers }),
      },
      ...(mtp > 0 ? { mtpLayers: mtp } : {}),
      hf: cfg,
    };
    validateConfig(c, file);
    return c;
  },
  fromHfNames(c, names, opts): ModelConfig {
    const layout = hubMtpLayout(c, names);
    return { ...c, mtpLayers: hubMtpLayerCount(c, names, opts?.dropMtp), ...(Object.keys(layout).length ? { hfLayout: layout } : {}) };
  },
  globalParams: (c): GlobalParam[] => withHubMtpCopies(c, denseGlobals(c)),
  layerParams: (c, i) => layerParams(c, L, isMoeLayer(c, i), c.hfLayout?.experts ?? 'per-expert'),
  extraStateModules: (c, i) => extraState(c, isMoeLayer(c, i)),
  blocks: (c) => (c.mtpLayers ? [mtpBlock(c)] : []),
  mtpHfNames: hubMtpNames,
  localSpecName: (name) => LOCAL_NAMES.reduce((n, [re, to]) => n.replace(re, to), name),
  megatronArgs: (c) => {
    const m = mlaOf(c);
    const hf = c.hf ?? {};
    const dense = c.moe?.moeLayers?.filter((x) => !x).length ?? 0;
    return {
      ...moeArgs(c),
      multi_latent_attention: true,
      q_lora_rank: m.qLoraRank ?? null,
      kv_lora_rank: m.kvLoraRank,
      qk_head_dim: m.qkNopeHeadDim,
      qk_pos_emb_head_dim: m.qkRopeHeadDim,
      v_head_dim: m.vHeadDim,
      ...ropeScalingArgs(hf),
      moe_layer_freq: Array.from({ length: c.numLayers }, (_, i) => (i < dense ? 0 : 1)),
      moe_router_score_function: 'sigmoid',
      moe_router_enable_expert_bias: true,
      moe_router_dtype: 'fp32',
      moe_router_pre_softmax: true,
      moe_router_load_balancing_type: 'seq_aux_loss',
      moe_router_topk_scaling_factor: new PyFloat(typeof hf.routed_scaling_factor === 'number' ? hf.routed_scaling_factor : 1),
      moe_router_num_groups: typeof hf.n_group === 'number' ? hf.n_group : 1,
      moe_router_group_topk: typeof hf.topk_group === 'number' ? hf.topk_group : 1,
      ...(c.mtpLayers ? { mtp_num_layers: c.mtpLayers } : {}),
    };
  },
};
