/**
 * megatron-core semantics of a `GPTModel` checkpoint (torch_dist, or Megatron-FSDP's
 * fsdp_dtensor), read as megatron-core 0.16 loads it — not as shardshift's converter writes it:
 *
 * - `decoder.layers.*` tensors carry a leading layer axis (TransformerBlock's sharded state dict
 *   prepends the global layer number); fsdp_dtensor keeps `decoder.layers.<i>.*` per layer;
 * - `self_attention.linear_qkv.weight` is grouped per query group: for each of the
 *   `num_query_groups` groups, its `heads / groups` query heads, then one key head, then one value
 *   head (`SelfAttention.get_query_key_value_tensors`: view [.., ng, (np/ng + 2) · hn], split
 *   [np/ng · hn, hn, hn]); its bias likewise; `q_layernorm` / `k_layernorm` per head;
 * - `mlp.linear_fc1.weight` is [gate; up] (`MLP.glu`: `chunk(2, -1)`, `silu(x[0]) · x[1]`);
 * - the TransformerEngine-fused norms `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`
 *   (or the local spec's `input_layernorm` / `pre_mlp_layernorm`);
 * - MoE: `mlp.router.weight`, experts `mlp.experts.experts.linear_fc{1,2}.weight` with an expert
 *   axis at the global expert index (or SequentialMLP's `local_experts.<e>`); `TopKRouter`: top k
 *   of the logits then softmax over them, or softmax first with `moe_router_pre_softmax`;
 * - `output_layer.weight` with `padded_vocab_size` rows, or the embedding when tied.
 *
 * The model's sizes come from the checkpoint's own training args (`common.pt` `args`), or, for a
 * checkpoint saved without them (plain `dist_checkpointing.save`), from an HF config the caller
 * names (`hfConfigDims`).
 */
import { PyFloat, PyTuple, type PyDict, type PyValue } from '../pickle/values.js';
import { badInput, unsupported } from '../util/errors.js';
import { project, wholeEnds, type AttentionReader, type DecoderDims, type MlpReader, type ModelReader, type Qkv, type SwigluReader } from './decoder.js';
import type { RopeSpec, Routing } from './math.js';
import { ref, type WeightRef, type WeightStore } from './weights.js';

/** What the Megatron reader needs beyond the decoder's dims. */
export interface MegatronShape {
  readonly dims: DecoderDims;
  readonly layers: number;
  readonly qkvBias: boolean;
  readonly qkNorm: boolean;
  readonly tied: boolean;
  readonly moe?: { readonly experts: number; readonly routing: Routing; readonly isMoe: (i: number) => boolean };
  /** Where the sizes came from, for the report. */
  readonly from: string;
}

function plain(v: PyValue | undefined): unknown {
  if (v instanceof PyFloat) return v.value;
  if (typeof v === 'bigint') return Number(v);
  if (Array.isArray(v)) return v.map(plain);
  if (v instanceof PyTuple) return v.items.map(plain);
  return v;
}

/** The model's shape from megatron-core / Megatron-LM training args. */
export function argsShape(args: PyDict, file: string): MegatronShape {
  const get = (k: string) => plain(args.get(k));
  const num = (k: string, d?: number): number => {
    const v = get(k);
    if (typeof v === 'number') return v;
    if ((v === undefined || v === null) && d !== undefined) return d;
    throw badInput(`${file}: training arg ${k} is ${v === undefined ? 'missing' : JSON.stringify(v)}`, file);
  };
  const flag = (k: string) => get(k) === true;
  const refuse = (what: string) => {
    throw unsupported(`${file}: ${what} has no Megatron reference forward yet`, file);
  };
  if ((get('normalization') ?? 'LayerNorm') !== 'RMSNorm') refuse(`normalization ${JSON.stringify(get('normalization'))}`);
  if (!flag('swiglu')) refuse('an MLP without swiglu');
  if (flag('add_bias_linear')) refuse('add_bias_linear (biases on every linear)');
  if (flag('apply_layernorm_1p') || flag('layernorm_zero_centered_gamma')) refuse('zero-centred norms');
  const pe = get('position_embedding_type') ?? 'learned_absolute';
  if (pe !== 'rope') refuse(`position_embedding_type ${JSON.stringify(pe)}`);
  if (get('moe_shared_expert_intermediate_size')) refuse('shared experts');
  if ((get('moe_router_score_function') ?? 'softmax') !== 'softmax') refuse(`moe_router_score_function ${JSON.stringify(get('moe_router_score_function'))}`);
  const scale = get('moe_router_topk_scaling_factor');
  if (scale !== undefined && scale !== null && scale !== 1) refuse('moe_router_topk_scaling_factor');
  if (get('multi_latent_attention') === true) refuse('multi-latent attention');
  if (flag('rotary_interleaved')) refuse('rotary_interleaved (RoFormer-style pairs)');
  // Settings that change the forward and are not modelled here: refused rather than ignored.
  for (const k of ['window_attn_skip_freq', 'moe_expert_capacity_factor', 'rotary_seq_len_interpolation_factor', 'softmax_scale', 'no_rope_freq', 'attention_output_gate', 'glu_linear_offset', 'activation_func_clamp_value', 'moe_apply_probs_on_input', 'qk_clip', 'mrope_section']) {
    const v = get(k);
    if (v !== undefined && v !== null && v !== false && v !== 0) refuse(k);
  }
  const softmaxType = get('softmax_type');
  if (softmaxType !== undefined && softmaxType !== null && softmaxType !== 'vanilla') refuse(`softmax_type ${JSON.stringify(softmaxType)}`);
  if (get('moe_router_load_balancing_type') === 'sinkhorn') refuse('the sinkhorn router');
  if (flag('qk_l2_norm')) refuse('qk_l2_norm');
  const groups = get('moe_router_num_groups');
  if (typeof groups === 'number' && groups > 1) refuse('group-limited routing (moe_router_num_groups)');
  if (num('mtp_num_layers', 0) > 0) refuse('multi-token prediction layers');

  const hidden = num('hidden_size');
  const heads = num('num_attention_heads');
  const headDim = num('kv_channels', hidden / heads);
  const rotaryDim = Math.floor(headDim * num('rotary_percent', 1));
  const rope: RopeSpec = {
    base: num('rotary_base', 10000),
    rotaryDim,
    // megatron-core RotaryEmbedding._apply_scaling: Llama 3.1's rule with its fixed constants.
    ...(flag('use_rope_scaling') ? { scaling: { type: 'llama3', factor: num('rope_scaling_factor', 8), lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 } } : {}),
  };
  const experts = num('num_experts', 0);
  const freq = get('moe_layer_freq') ?? 1;
  if (!Array.isArray(freq) && typeof freq !== 'number') refuse(`moe_layer_freq ${JSON.stringify(freq)} (a list or an interval is read)`);
  const isMoe = Array.isArray(freq) ? (i: number) => freq[i] === 1 : (i: number) => i % (freq as number) === 0;
  const vocab = get('vocab_size');
  const window = get('window_size');
  return {
    dims: {
      hidden,
      heads,
      kvHeads: flag('group_query_attention') ? num('num_query_groups') : heads,
      headDim,
      vocab: typeof vocab === 'number' ? vocab : num('padded_vocab_size'),
      ...(typeof vocab === 'number' ? {} : { vocabPaddedOnly: true }),
      eps: num('norm_epsilon', 1e-5),
      rope,
      maxPositions: num('max_position_embeddings', Number.MAX_SAFE_INTEGER),
      ...(Array.isArray(window) && typeof window[0] === 'number' && window[0] > 0 ? { slidingWindow: window[0] + 1 } : {}),
    },
    layers: num('num_layers'),
    qkvBias: flag('add_qkv_bias'),
    qkNorm: flag('qk_layernorm'),
    tied: !flag('untie_embeddings_and_output_weights'),
    ...(experts > 0 ? { moe: { experts, routing: { topK: num('moe_router_topk', 2), rule: flag('moe_router_pre_softmax') ? 'softmax-topk' : 'softmax-topk-renorm' }, isMoe } } : {}),
    from: `${file} (training args)`,
  };
}

/**
 * linear_qkv's output ([T, groups · (r + 2) · hd]) split per query group — its r query heads,
 * then its key head, then its value head (`SelfAttention.get_query_key_value_tensors`) — into
 * q [T, groups · r · hd], k and v [T, groups · hd].
 */
export function splitQueryGroups(fused: Float32Array, T: number, groups: number, r: number, hd: number): Qkv {
  const nq = groups * r;
  const q = new Float32Array(T * nq * hd);
  const k = new Float32Array(T * groups * hd);
  const v = new Float32Array(T * groups * hd);
  const width = groups * (r + 2) * hd;
  for (let t = 0; t < T; t++) {
    for (let g = 0; g < groups; g++) {
      const o = t * width + g * (r + 2) * hd;
      q.set(fused.subarray(o, o + r * hd), (t * nq + g * r) * hd);
      k.set(fused.subarray(o + r * hd, o + (r + 1) * hd), (t * groups + g) * hd);
      v.set(fused.subarray(o + (r + 1) * hd, o + (r + 2) * hd), (t * groups + g) * hd);
    }
  }
  return { q, k, v };
}

/** `layout`: how the checkpoint keeps the model (torch_dist, or fsdp_dtensor's description). */
export function megatronGpt(store: WeightStore, s: MegatronShape, layout = 'torch_dist'): ModelReader {
  const file = store.source.path;
  const stacked = store.has('decoder.layers.self_attention.linear_qkv.weight');
  /** Layer i's tensor `rest` (a leading layer axis, or per-layer names), with further leading indices. */
  const L = (i: number, rest: string, ...more: number[]): WeightRef => (stacked ? ref(`decoder.layers.${rest}`, i, ...more) : ref(`decoder.layers.${i}.${rest}`, ...more));
  const has = (i: number, rest: string) => store.has(stacked ? `decoder.layers.${rest}` : `decoder.layers.${i}.${rest}`);
  const either = (i: number, a: string, b: string): WeightRef => (has(i, a) ? L(i, a) : has(i, b) ? L(i, b) : fail(`neither decoder.layers.${a} nor ${b}`));
  const fail = (what: string): never => {
    throw badInput(`${file}: ${what} (a megatron-core GPTModel has it)`, file);
  };
  const { heads, kvHeads, headDim: hd } = s.dims;
  const r = heads / kvHeads;
  const qkv = async (i: number, x: Float32Array, T: number) =>
    splitQueryGroups(await project(store, L(i, 'self_attention.linear_qkv.weight'), x, T, s.qkvBias ? L(i, 'self_attention.linear_qkv.bias') : undefined), T, kvHeads, r, hd);
  const attention = (i: number): AttentionReader => ({
    norm: either(i, 'self_attention.linear_qkv.layer_norm_weight', 'input_layernorm.weight'),
    shards: [{ heads, kvHeads, qkv: (x, T) => qkv(i, x, T), out: L(i, 'self_attention.linear_proj.weight') }],
    ...(s.qkNorm ? { qNorm: L(i, 'self_attention.q_layernorm.weight'), kNorm: L(i, 'self_attention.k_layernorm.weight') } : {}),
  });
  const glu = (fc1: WeightRef, fc2: WeightRef): SwigluReader => ({
    async gateUp(x, T) {
      const [rows] = store.shape(fc1) as [number];
      const half = rows / 2;
      const y = await project(store, fc1, x, T);
      const gate = new Float32Array(T * half);
      const up = new Float32Array(T * half);
      for (let t = 0; t < T; t++) {
        gate.set(y.subarray(t * rows, t * rows + half), t * half);
        up.set(y.subarray(t * rows + half, (t + 1) * rows), t * half);
      }
      return { gate, up };
    },
    down: fc2,
  });
  const mlp = (i: number): MlpReader => {
    const norm = either(i, 'mlp.linear_fc1.layer_norm_weight', 'pre_mlp_layernorm.weight');
    if (!s.moe?.isMoe(i)) return { kind: 'dense', norm, shards: [glu(L(i, 'mlp.linear_fc1.weight'), L(i, 'mlp.linear_fc2.weight'))] };
    const grouped = has(i, 'mlp.experts.experts.linear_fc1.weight');
    return {
      kind: 'moe',
      norm,
      router: L(i, 'mlp.router.weight'),
      experts: s.moe.experts,
      routing: s.moe.routing,
      expert: (e) =>
        grouped
          ? glu(L(i, 'mlp.experts.experts.linear_fc1.weight', e), L(i, 'mlp.experts.experts.linear_fc2.weight', e))
          : glu(L(i, `mlp.experts.local_experts.${e}.linear_fc1.weight`), L(i, `mlp.experts.local_experts.${e}.linear_fc2.weight`)),
    };
  };
  if (!s.tied && !store.has('output_layer.weight')) throw badInput(`${file}: the training args say the output layer is untied, but there is no output_layer.weight`, file, 'output_layer.weight');
  const tied = s.tied && !store.has('output_layer.weight');
  return {
    describe: `GPTModel (megatron-core ${layout})`,
    dims: s.dims,
    store,
    ...wholeEnds(store, ref('embedding.word_embeddings.weight'), ref(tied ? 'embedding.word_embeddings.weight' : 'output_layer.weight')),
    layers: s.layers,
    attention,
    mlp,
    finalNorm: ref('decoder.final_layernorm.weight'),
  };
}
