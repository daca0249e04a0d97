/**
 * Llama 4 (Scout 17B-16E, Maverick 17B-128E): `Llama4ForCausalLM` and the text model of
 * `Llama4ForConditionalGeneration`, mapped onto megatron-core's GPTModel as its own features take
 * it — Megatron-Bridge has no Llama 4 bridge; its `llama4_utils.py` layer spec (L2 q/k norms on the
 * RoPE layers only, NoPE layers, chunked attention) is what this map targets:
 *
 * - GQA attention, `linear_qkv` per query group, no biases; RoPE on the pairs of adjacent dims
 *   (transformers' `apply_rotary_emb` multiplies complex pairs: megatron-core's
 *   `rotary_interleaved`), so q/k rows are carried as they are; every `no_rope_layer_interval`-th
 *   layer has no RoPE (`no_rope_freq`) and the others a weightless L2 q/k norm (`qk_l2_norm`);
 * - MoE layers (`moe_layers`, or every `interleave_moe_layer_step`-th): router `feed_forward.router`
 *   → `mlp.router.weight` (top-k, then a sigmoid of the chosen logits, applied to the expert's
 *   *input*: `moe_apply_probs_on_input`), the experts fused input-major (`experts.gate_up_proj`
 *   [E, H, 2F] with columns [gate | up], `experts.down_proj` [E, F, H]) transposed into each expert's
 *   `linear_fc1` = [gate; up] / `linear_fc2`, `shared_expert.{gate,up,down}_proj` →
 *   `mlp.shared_experts.*`; dense layers' MLP (`intermediate_size_mlp`) → `linear_fc1` / `linear_fc2`;
 * - the wrapper's vision model and projector (`vision_model.*`, `multi_modal_projector.*`) are
 *   carried under their own names, values unchanged (no Megatron vision model exists for them), and
 *   its text model sits under `language_model.` as Megatron-Bridge's other VL models hold theirs.
 *
 * Recorded in the args, not checked on CPU: chunked attention (`attention_chunk_size`) and the NoPE
 * layers' attention temperature tuning (`floor_scale`, `attn_scale`), which change nothing below
 * 8192 tokens.
 */
import { badInput, unsupported } from '../util/errors.js';
import { PyFloat, type PyValue } from '../pickle/values.js';
import { fromHfConfig, isMoeLayer, num, textConfig, visionConfigReader, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, denseMlpParams, inputMajorFusedExperts, linearExtraState, moeArgs, moeParams } from './dense.js';
import type { Block, Family, GlobalParam, LayerParam } from './spec.js';

/** Which layers use RoPE (HF `no_rope_layers`: 1 = RoPE), from the config or its interval. */
function ropeLayers(text: Readonly<Record<string, unknown>>, layers: number): boolean[] {
  const given = text.no_rope_layers;
  if (Array.isArray(given) && given.length > 0) {
    if (given.length !== layers) throw badInput(`config.json: no_rope_layers has ${given.length} entries for ${layers} layers`);
    return given.map((x) => x === 1 || x === true);
  }
  const every = typeof text.no_rope_layer_interval === 'number' ? text.no_rope_layer_interval : 4;
  return Array.from({ length: layers }, (_, i) => (i + 1) % every !== 0);
}

interface Spec {
  readonly id: string;
  readonly architecture: string;
  readonly modelType: string;
  readonly description: string;
  /** The wrapper: text under `language_model.model.`, the head as `language_model.lm_head`, the vision model beside. */
  readonly wrapper: boolean;
}

function llama4Family(s: Spec): Family {
  const T = s.wrapper ? 'language_model.model.' : 'model.';
  const head = s.wrapper ? 'language_model.lm_head.weight' : 'lm_head.weight';
  const L = `${T}layers.{i}`;
  const F = `${L}.feed_forward`;
  return {
    id: s.id,
    architectures: [s.architecture],
    modelType: s.modelType,
    description: s.description,
    keying: (c) => (c.moe?.moeLayers?.some((x) => !x) ? 'per-layer' : 'stacked'),
    fromHf(whole, file): ModelConfig {
      const text = textConfig(whole);
      if (s.wrapper && text === whole) throw badInput(`${file}: a ${s.architecture} config needs its text_config`, file);
      if (s.wrapper && !whole.vision_config) throw badInput(`${file}: a ${s.architecture} config needs its vision_config`, file);
      const ffnMlp = num(text, 'intermediate_size_mlp', file);
      const base = { ...fromHfConfig(s.id, { ...text, intermediate_size: ffnMlp, tie_word_embeddings: whole.tie_word_embeddings ?? text.tie_word_embeddings ?? false }, file, { qkvBias: false, qkNorm: false }), hf: whole };
      const E = num(text, 'num_local_experts', file);
      const topK = num(text, 'num_experts_per_tok', file, 1);
      if (topK > E) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds num_local_experts (${E})`, file);
      const given = text.moe_layers;
      const step = num(text, 'interleave_moe_layer_step', file, 1);
      const moeLayers = Array.isArray(given)
        ? Array.from({ length: base.numLayers }, (_, i) => (given as unknown[]).includes(i))
        : Array.from({ length: base.numLayers }, (_, i) => (i + 1) % step === 0);
      ropeLayers(text, base.numLayers);
      if (text.router_jitter_noise !== undefined && text.router_jitter_noise !== 0 && text.router_jitter_noise !== 0.0) {
        throw unsupported(`${file}: router_jitter_noise ${JSON.stringify(text.router_jitter_noise)}; megatron-core's router has no input jitter at inference and the map does not carry it`, file);
      }
      const F2 = num(text, 'intermediate_size', file);
      return { ...base, moe: { numExperts: E, topK, ffnHiddenSize: F2, sharedExpertFfn: F2, ...(moeLayers.every((x) => x) ? {} : { moeLayers }) } };
    },
    globalParams: (c): GlobalParam[] => [...denseGlobals(c, { embed: `${T}embed_tokens.weight`, norm: `${T}norm.weight`, head }), ...(s.wrapper ? visionGlobals(c) : [])],
    layerParams: (c, i): LayerParam[] => {
      const attn = attentionParams(c, `${L}.self_attn`, `${L}.input_layernorm.weight`);
      if (!isMoeLayer(c, i)) return [...attn, ...denseMlpParams(c, F, `${L}.post_attention_layernorm.weight`)];
      const block = moeParams(c, {
        norm: `${L}.post_attention_layernorm.weight`,
        router: `${F}.router.weight`,
        gate: `${F}.experts.{e}.gate_proj.weight`,
        up: `${F}.experts.{e}.up_proj.weight`,
        down: `${F}.experts.{e}.down_proj.weight`,
        shared: { gate: `${F}.shared_expert.gate_proj.weight`, up: `${F}.shared_expert.up_proj.weight`, down: `${F}.shared_expert.down_proj.weight` },
      });
      return [...attn, ...block.filter((p) => !p.megatron.startsWith('mlp.experts.')), ...inputMajorFusedExperts(c, F)];
    },
    extraStateModules: (c, i) => linearExtraState(c, i),
    ...(s.wrapper ? { blocks: (c: ModelConfig) => [visionBlock(c)], megatronPrefix: () => ({ prefix: 'language_model.', except: ['vision_model.', 'multi_modal_projector.'] }) } : {}),
    megatronArgs: (c): Record<string, PyValue> => {
      const text = textConfig(c.hf ?? {});
      const f = (x: unknown, d: number): PyFloat => new PyFloat(typeof x === 'number' ? x : d);
      return {
        ...moeArgs(c),
        ...(c.moe?.moeLayers ? { moe_layer_freq: c.moe.moeLayers.map((x) => (x ? 1 : 0)) } : {}),
        moe_router_score_function: 'sigmoid',
        moe_router_pre_softmax: false,
        moe_apply_probs_on_input: true,
        moe_router_load_balancing_type: 'none',
        rotary_interleaved: true,
        qk_l2_norm: text.use_qk_norm !== false,
        // megatron-core's no_rope_freq: 1 = no RoPE (HF no_rope_layers: 1 = RoPE).
        no_rope_freq: ropeLayers(text, c.numLayers).map((r) => (r ? 0 : 1)),
        attention_chunk_size: typeof text.attention_chunk_size === 'number' ? text.attention_chunk_size : null,
        attn_temperature_tuning: text.attn_temperature_tuning !== false,
        floor_scale: typeof text.floor_scale === 'number' ? text.floor_scale : 8192,
        attn_scale: f(text.attn_scale, 0.1),
      };
    },
  };
}

interface Vision {
  readonly hidden: number;
  readonly inter: number;
  readonly layers: number;
  readonly channels: number;
  readonly patch: number;
  readonly positions: number;
  /** The pixel-shuffle adapter: fc1 [projector_input_dim, intermediate_size], fc2 [projector_output_dim]². */
  readonly projectorIn: number;
  readonly projectorOut: number;
  /** What the multi-modal projector reads (vision_output_dim). */
  readonly output: number;
}

function visionOf(c: ModelConfig): Vision {
  const { int: n } = visionConfigReader(c, 'Llama4ForConditionalGeneration');
  const patch = n('patch_size', 14);
  const image = n('image_size', 448);
  return {
    hidden: n('hidden_size', 768),
    inter: n('intermediate_size', 5120),
    layers: n('num_hidden_layers', 34),
    channels: n('num_channels', 3),
    patch,
    // the patches and the class token
    positions: (image / patch) ** 2 + 1,
    projectorIn: n('projector_input_dim', 4096),
    projectorOut: n('projector_output_dim', 4096),
    output: n('vision_output_dim', 7680),
  };
}

/** The vision model's tensors outside its encoder layers, and the projector, each under its own name. */
function visionGlobals(c: ModelConfig): GlobalParam[] {
  const v = visionOf(c);
  const H = v.hidden;
  const g = (name: string, shape: number[]): GlobalParam => ({ megatron: name, hf: name, kind: 'copy', shape });
  return [
    g('vision_model.patch_embedding.linear.weight', [H, v.channels * v.patch * v.patch]),
    g('vision_model.class_embedding', [H]),
    g('vision_model.positional_embedding_vlm', [v.positions, H]),
    g('vision_model.layernorm_pre.weight', [H]),
    g('vision_model.layernorm_pre.bias', [H]),
    g('vision_model.layernorm_post.weight', [H]),
    g('vision_model.layernorm_post.bias', [H]),
    g('vision_model.vision_adapter.mlp.fc1.weight', [v.projectorIn, v.inter]),
    g('vision_model.vision_adapter.mlp.fc2.weight', [v.projectorOut, v.projectorOut]),
    g('multi_modal_projector.linear_1.weight', [c.hiddenSize, v.output]),
  ];
}

function visionBlock(c: ModelConfig): Block {
  const v = visionOf(c);
  const H = v.hidden;
  const copy = (name: string, shape: number[]): LayerParam => ({ megatron: name, hf: [`vision_model.model.layers.{i}.${name}`], kind: 'copy', hfShapes: [shape], shape });
  const params: LayerParam[] = [
    ...['q_proj', 'k_proj', 'v_proj', 'o_proj'].flatMap((x) => [copy(`self_attn.${x}.weight`, [H, H]), copy(`self_attn.${x}.bias`, [H])]),
    copy('mlp.fc1.weight', [v.inter, H]),
    copy('mlp.fc1.bias', [v.inter]),
    copy('mlp.fc2.weight', [H, v.inter]),
    copy('mlp.fc2.bias', [H]),
    copy('input_layernorm.weight', [H]),
    copy('input_layernorm.bias', [H]),
    copy('post_attention_layernorm.weight', [H]),
    copy('post_attention_layernorm.bias', [H]),
  ];
  return { prefix: 'vision_model.model.layers.', layers: v.layers, keying: 'per-layer', params: () => params, extraStateModules: () => [] };
}

export const llama4 = llama4Family({
  id: 'llama4_text',
  architecture: 'Llama4ForCausalLM',
  modelType: 'llama4_text',
  description: 'Llama 4 text (Scout, Maverick; NoPE layers, L2 q/k norms, MoE with shared expert and input-major fused experts)',
  wrapper: false,
});

export const llama4Vl = llama4Family({
  id: 'llama4',
  architecture: 'Llama4ForConditionalGeneration',
  modelType: 'llama4',
  description: 'Llama 4 (Scout 17B-16E, Maverick 17B-128E; text model mapped, vision model carried)',
  wrapper: true,
});
