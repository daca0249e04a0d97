/**
 * Gemma 2 and Gemma 3 text models.
 *
 * Gemma 2 (`Gemma2ForCausalLM`: gemma-2-2b, 9b, 27b) as Megatron-Bridge's Gemma 2 bridge
 * (`models/gemma/gemma2_bridge.py`, `gemma2_provider.py`) maps it onto megatron-core's GPTModel
 * with its Gemma 2 layer spec:
 *
 * - norms are zero-centred on both sides: transformers' Gemma2RMSNorm computes `x̂ · (1 + w)` and
 *   Megatron-Bridge sets `layernorm_zero_centered_gamma` (TENorm computes the same), so every norm
 *   weight is carried as it is — never shifted by one;
 * - the sandwich norms: `input_layernorm` → `linear_qkv.layer_norm_weight`,
 *   `post_attention_layernorm` (on the attention *output*) → `linear_proj.post_layernorm.weight`,
 *   `pre_feedforward_layernorm` → `linear_fc1.layer_norm_weight`, `post_feedforward_layernorm` →
 *   `linear_fc2.post_layernorm.weight` (its `TERowParallelLinearLayerNorm`);
 * - GeGLU MLP (`gelu_pytorch_tanh`, megatron-core's fast_gelu) as `linear_fc1` = [gate; up];
 *   tied embeddings (no `lm_head`);
 * - what only the config holds is recorded in the Megatron args: `query_pre_attn_scalar`, the
 *   attention and final logit soft-capping, the sliding window (`window_size` = (w − 1, 0)) on the
 *   alternating layers `layer_types` names, and the √hidden embedding scale Gemma applies.
 *
 * Gemma 3 (`Gemma3ForCausalLM`: gemma-3-1b, and the text model of the larger wrappers) as its
 * Gemma 3 bridge (`gemma3_bridge.py`, `gemma3_provider.py`) maps it: Gemma 2's layout plus per-head
 * q/k RMSNorms (`q_norm` / `k_norm` → `q_layernorm` / `k_layernorm`, zero-centred as every Gemma
 * norm), no soft-capping, sliding-window layers interleaved 5 : 1 with global ones
 * (`interleaved_attn_pattern`), each kind with its own RoPE base (`rope_local_base_freq` /
 * `rope_theta`, recorded as `rotary_base` = (local, global)) and linear RoPE scaling on the global
 * layers only (`rope_scaling_factor`).
 */
import { badInput, unsupported } from '../util/errors.js';
import { JsonFloat } from '../formats/config-json.js';
import { PyFloat, PyTuple, type PyValue } from '../pickle/values.js';
import { fromHfConfig, num, textConfig, visionConfigReader, type ModelConfig } from './config.js';
import { attentionParams, denseGlobals, denseMlpParams } from './dense.js';
import type { Block, Family, GlobalParam, LayerParam } from './spec.js';

const L = 'model.layers.{i}';

/** The sandwich norms: each applied to a sub-block's output, before the residual add. */
function postNorms(c: ModelConfig, P = L): LayerParam[] {
  const H = c.hiddenSize;
  return [
    { megatron: 'self_attention.linear_proj.post_layernorm.weight', hf: [`${P}.post_attention_layernorm.weight`], kind: 'copy', hfShapes: [[H]], shape: [H] },
    { megatron: 'mlp.linear_fc2.post_layernorm.weight', hf: [`${P}.post_feedforward_layernorm.weight`], kind: 'copy', hfShapes: [[H]], shape: [H] },
  ];
}

/** A Gemma layer at HF prefix P (`model.layers.{i}`): attention, GeGLU MLP, the sandwich norms. */
function gemmaLayer(c: ModelConfig, P = L): LayerParam[] {
  return [...attentionParams(c, `${P}.self_attn`, `${P}.input_layernorm.weight`), ...denseMlpParams(c, `${P}.mlp`, `${P}.pre_feedforward_layernorm.weight`), ...postNorms(c, P)];
}

const float = (x: unknown, what: string, file: string): number | null => {
  if (x === null || x === undefined) return null;
  if (typeof x !== 'number' || !(x > 0)) throw badInput(`${file}: ${what} is ${JSON.stringify(x)}, expected a positive number or null`, file);
  return x;
};

export const gemma2: Family = {
  id: 'gemma2',
  architectures: ['Gemma2ForCausalLM'],
  modelType: 'gemma2',
  description: 'Gemma 2 (2B, 9B, 27B; zero-centred sandwich norms, GeGLU, soft-capping, sliding window)',
  megatronClaim: (r) => (!r.moe && r.target.includes('gemma2') ? 'provider' : undefined),
  keying: () => 'stacked',
  fromHf(cfg, file): ModelConfig {
    const act = cfg.hidden_activation ?? cfg.hidden_act ?? 'gelu_pytorch_tanh';
    if (act !== 'gelu_pytorch_tanh') throw unsupported(`${file}: hidden_activation ${JSON.stringify(act)}; Gemma 2's map carries the tanh-approximated GeGLU (megatron-core fast_gelu)`, file);
    // transformers' Gemma2Config ties the embeddings unless told otherwise; so does every published Gemma 2.
    const base = fromHfConfig('gemma2', { ...cfg, tie_word_embeddings: cfg.tie_word_embeddings ?? true }, file, { qkvBias: false, qkNorm: false });
    float(cfg.query_pre_attn_scalar, 'query_pre_attn_scalar', file);
    float(cfg.attn_logit_softcapping, 'attn_logit_softcapping', file);
    float(cfg.final_logit_softcapping, 'final_logit_softcapping', file);
    const lt = cfg.layer_types;
    if (Array.isArray(lt) && (lt.length !== base.numLayers || lt.some((t) => t !== 'sliding_attention' && t !== 'full_attention'))) {
      throw badInput(`${file}: layer_types must name sliding_attention or full_attention for each of the ${base.numLayers} layers`, file);
    }
    // Megatron-Bridge's Gemma 2 attention slides on odd megatron layer numbers (HF layers 0, 2, …): another pattern has no Megatron form.
    if (Array.isArray(lt) && lt.some((t, i) => (t === 'sliding_attention') !== (i % 2 === 0))) {
      throw unsupported(`${file}: layer_types ${JSON.stringify(lt)}; Megatron-Bridge's Gemma 2 attention slides on every other layer from layer 0, and no other pattern`, file);
    }
    return base;
  },
  globalParams: (c) => denseGlobals(c),
  layerParams: (c) => gemmaLayer(c),
  extraStateModules: () => GEMMA_EXTRA_STATE,
  hfConfig: (c, field) => {
    const n = (k: string): number | null => {
      const v = field(k);
      return typeof v === 'number' ? v : v instanceof PyFloat ? v.value : null;
    };
    const w = field('window_size');
    const win = w instanceof PyTuple && typeof w.items[0] === 'number' ? (w.items[0] as number) + 1 : null;
    return {
      hidden_activation: 'gelu_pytorch_tanh',
      hidden_act: 'gelu_pytorch_tanh',
      query_pre_attn_scalar: n('query_pre_attn_scalar') ?? c.kvChannels,
      attn_logit_softcapping: n('attn_logit_softcapping'),
      final_logit_softcapping: n('final_logit_softcapping'),
      ...(win !== null ? { sliding_window: win } : {}),
      layer_types: Array.from({ length: c.numLayers }, (_, i) => (i % 2 === 0 ? 'sliding_attention' : 'full_attention')),
    };
  },
  megatronArgs: (c): Record<string, PyValue> => {
    const hf = c.hf ?? {};
    const f = (x: unknown): PyValue => (typeof x === 'number' ? new PyFloat(x) : null);
    return {
      // Megatron-Bridge provider fields (GeGLU: gated fc1 with the tanh GELU; `swiglu` stays the
      // gated-fc1 flag legacy rank files are split by).
      gated_linear_unit: true,
      activation_func: 'fast_gelu',
      layernorm_zero_centered_gamma: true,
      apply_embedding_scaling: true,
      query_pre_attn_scalar: typeof hf.query_pre_attn_scalar === 'number' ? hf.query_pre_attn_scalar : c.kvChannels,
      attn_logit_softcapping: f(hf.attn_logit_softcapping),
      final_logit_softcapping: f(hf.final_logit_softcapping),
      ...(typeof hf.sliding_window === 'number' ? { window_size: new PyTuple([hf.sliding_window - 1, 0]) } : {}),
    };
  },
};

/** Gemma 3's RoPE: (local base, global base, linear factor on the global layers), from a transformers 4 or 5 config. */
function gemma3Rope(cfg: Readonly<Record<string, unknown>>, file: string): { local: number; global: number; factor: number } {
  const rp = cfg.rope_parameters as Record<string, Record<string, unknown> | undefined> | undefined;
  const full = rp?.full_attention ?? (cfg.rope_scaling as Record<string, unknown> | null | undefined) ?? undefined;
  const slide = rp?.sliding_attention;
  const type = full?.rope_type ?? full?.type ?? 'default';
  if (type !== 'default' && type !== 'linear') throw unsupported(`${file}: global-layer rope type ${JSON.stringify(type)}; Megatron-Bridge's Gemma 3 scales RoPE linearly (rope_scaling_factor) or not at all`, file);
  const n = (x: unknown, d: number): number => (typeof x === 'number' ? x : d);
  return {
    local: n(slide?.rope_theta ?? cfg.rope_local_base_freq, 10000),
    global: n(full?.rope_theta ?? cfg.rope_theta, 1000000),
    factor: type === 'linear' ? n(full?.factor, 1) : 1,
  };
}

export const gemma3: Family = {
  id: 'gemma3',
  architectures: ['Gemma3ForCausalLM'],
  modelType: 'gemma3_text',
  description: 'Gemma 3 text (1B …; q/k norms, 5 : 1 local / global attention, dual RoPE)',
  megatronClaim: (r) => (!r.moe && r.target.includes('gemma3') ? 'provider' : undefined),
  keying: () => 'stacked',
  fromHf: (cfg, file) => gemma3Text('gemma3', cfg, file),
  globalParams: (c) => denseGlobals(c),
  layerParams: (c) => gemmaLayer(c),
  extraStateModules: () => GEMMA_EXTRA_STATE,
  hfConfig: (c, field) => gemma3HfConfig(c, field),
  megatronArgs: (c) => gemma3Args(c, c.hf ?? {}),
};

const GEMMA_EXTRA_STATE = ['self_attention.linear_qkv', 'self_attention.linear_proj', 'mlp.linear_fc1', 'mlp.linear_fc2'];

/**
 * transformers' Gemma3TextConfig defaults for the fields the map reads: the published wrapper
 * configs leave them out (gemma-3-27b's `text_config` names no `vocab_size`, `head_dim` or norm eps)
 * and rely on these.
 */
const GEMMA3_TEXT_DEFAULTS: Readonly<Record<string, unknown>> = {
  vocab_size: 262208,
  head_dim: 256,
  num_key_value_heads: 4,
  rms_norm_eps: 1e-6,
  query_pre_attn_scalar: 256,
  sliding_window: 4096,
  max_position_embeddings: 131072,
  hidden_activation: 'gelu_pytorch_tanh',
  tie_word_embeddings: true,
};

const withGemma3Defaults = (cfg: Readonly<Record<string, unknown>>): Record<string, unknown> => {
  const out: Record<string, unknown> = { ...cfg };
  for (const [k, v] of Object.entries(GEMMA3_TEXT_DEFAULTS)) if (out[k] === undefined || out[k] === null) out[k] = v;
  return out;
};

/** A Gemma 3 text config (of `Gemma3ForCausalLM`, or a wrapper's `text_config`) checked and read. */
function gemma3Text(family: string, given: Record<string, unknown>, file: string): ModelConfig {
  const cfg = withGemma3Defaults(given);
  const act = cfg.hidden_activation ?? cfg.hidden_act ?? 'gelu_pytorch_tanh';
  if (act !== 'gelu_pytorch_tanh') throw unsupported(`${file}: hidden_activation ${JSON.stringify(act)}; Gemma 3's map carries the tanh-approximated GeGLU (megatron-core fast_gelu)`, file);
  for (const k of ['attn_logit_softcapping', 'final_logit_softcapping']) {
    if (cfg[k] !== undefined && cfg[k] !== null) throw unsupported(`${file}: ${k} ${JSON.stringify(cfg[k])}; Megatron-Bridge's Gemma 3 model has no soft-capping, so the converted model would compute differently`, file);
  }
  const base = { ...fromHfConfig(family, cfg, file, { qkvBias: false, qkNorm: true }), hf: given };
  float(cfg.query_pre_attn_scalar, 'query_pre_attn_scalar', file);
  num(cfg, 'sliding_window', file);
  // Megatron-Bridge's Gemma 3 attention: layer i (0-based) is global iff (i + 1) % 6 == 0.
  const lt = cfg.layer_types;
  if (Array.isArray(lt) && (lt.length !== base.numLayers || lt.some((t, i) => t !== ((i + 1) % 6 === 0 ? 'full_attention' : 'sliding_attention')))) {
    throw unsupported(`${file}: layer_types ${JSON.stringify(lt)}; Megatron-Bridge's Gemma 3 attention interleaves 5 sliding-window layers with 1 global one (interleaved_attn_pattern (5, 1)), and no other pattern`, file);
  }
  gemma3Rope(cfg, file);
  return base;
}

/** config.json fields of Gemma 3 text rebuilt from Megatron args. */
function gemma3HfConfig(c: ModelConfig, field: (k: string) => unknown): Record<string, unknown> {
  const n = (v: unknown): number | undefined => (typeof v === 'number' ? v : v instanceof PyFloat ? v.value : undefined);
  const rb = field('rotary_base');
  const [local, global] = rb instanceof PyTuple ? rb.items.map(n) : [undefined, n(rb)];
  const factor = n(field('rope_scaling_factor')) ?? 1;
  const scale = n(field('softmax_scale'));
  const w = n(field('window_size'));
  return {
    hidden_activation: 'gelu_pytorch_tanh',
    hidden_act: 'gelu_pytorch_tanh',
    // transformers 4 reads these flat fields, 5 the rope_parameters below: both say the same.
    rope_theta: new JsonFloat(global ?? 1000000),
    rope_local_base_freq: new JsonFloat(local ?? 10000),
    rope_scaling: factor !== 1 ? { rope_type: 'linear', factor: new JsonFloat(factor) } : null,
    query_pre_attn_scalar: scale ? Math.round(1 / (scale * scale)) : c.kvChannels,
    ...(w !== undefined ? { sliding_window: w } : {}),
    layer_types: Array.from({ length: c.numLayers }, (_, i) => ((i + 1) % 6 === 0 ? 'full_attention' : 'sliding_attention')),
    rope_parameters: {
      full_attention: factor !== 1 ? { rope_type: 'linear', factor: new JsonFloat(factor), rope_theta: new JsonFloat(global ?? 1000000) } : { rope_type: 'default', rope_theta: new JsonFloat(global ?? 1000000) },
      sliding_attention: { rope_type: 'default', rope_theta: new JsonFloat(local ?? 10000) },
    },
    attn_logit_softcapping: null,
    final_logit_softcapping: null,
  };
}

/** Gemma3ModelProvider's fields, from the text config. */
function gemma3Args(c: ModelConfig, given: Readonly<Record<string, unknown>>): Record<string, PyValue> {
  const text = withGemma3Defaults(given);
  const rope = gemma3Rope(text, 'config.json');
  return {
    gated_linear_unit: true,
    activation_func: 'fast_gelu',
    layernorm_zero_centered_gamma: true,
    apply_embedding_scaling: true,
    rotary_base: new PyTuple([new PyFloat(rope.local), new PyFloat(rope.global)]),
    rope_scaling_factor: new PyFloat(rope.factor),
    interleaved_attn_pattern: new PyTuple([5, 1]),
    softmax_scale: new PyFloat(1 / Math.sqrt(typeof text.query_pre_attn_scalar === 'number' ? text.query_pre_attn_scalar : c.kvChannels)),
    window_size: typeof text.sliding_window === 'number' ? text.sliding_window : null,
    // The config may leave these to transformers' defaults (the shared args builder reads the file as it is).
    norm_epsilon: new PyFloat(text.rms_norm_eps as number),
    max_position_embeddings: text.max_position_embeddings as number,
  };
}

// ---------------------------------------------------------------------------------------------
// Gemma 3 vision-language wrapper

/**
 * The names a Gemma 3 wrapper checkpoint uses: the hub's (`language_model.model.*`,
 * `vision_tower.vision_model.*`, `multi_modal_projector.*`), transformers 5's saves
 * (`vision_tower.*` flattened) or its in-memory ones (`model.language_model.*`, `model.vision_tower.*`,
 * `model.multi_modal_projector.*`).
 */
function gemmaVlPrefixes(c: ModelConfig): { text: string; vision: string; projector: string } {
  const text = c.hfLayout?.textPrefix ?? 'language_model.model.';
  if (text === 'model.language_model.') return { text, vision: 'model.vision_tower.', projector: 'model.multi_modal_projector.' };
  return { text, vision: c.hfLayout?.visionPrefix ?? 'vision_tower.vision_model.', projector: 'multi_modal_projector.' };
}

interface Siglip {
  readonly hidden: number;
  readonly inter: number;
  readonly layers: number;
  readonly channels: number;
  readonly patch: number;
  readonly positions: number;
  readonly head: boolean;
}

function siglipOf(c: ModelConfig): Siglip {
  const { raw: v, int: n } = visionConfigReader(c, 'Gemma3ForConditionalGeneration');
  const image = n('image_size', 224);
  const patch = n('patch_size', 16);
  return { hidden: n('hidden_size', 768), inter: n('intermediate_size', 3072), layers: n('num_hidden_layers', 12), channels: n('num_channels', 3), patch, positions: (image / patch) ** 2, head: v.vision_use_head === true };
}

/** The SigLIP tower's tensors outside its encoder layers, and its projector (`mm_input_projection_weight` [vision, text] is Megatron's `proj` [text, vision]). */
function gemmaVlGlobals(c: ModelConfig): GlobalParam[] {
  const v = siglipOf(c);
  const { vision: P, projector: J } = gemmaVlPrefixes(c);
  const H = v.hidden;
  const g = (name: string, shape: number[]): GlobalParam => ({ megatron: `vision_tower.${name}`, hf: `${P}${name}`, kind: 'copy', shape });
  return [
    g('embeddings.patch_embedding.weight', [H, v.channels, v.patch, v.patch]),
    g('embeddings.patch_embedding.bias', [H]),
    g('embeddings.position_embedding.weight', [v.positions, H]),
    g('post_layernorm.weight', [H]),
    g('post_layernorm.bias', [H]),
    ...(v.head
      ? [
          g('head.probe', [1, 1, H]),
          g('head.attention.in_proj_weight', [3 * H, H]),
          g('head.attention.in_proj_bias', [3 * H]),
          g('head.attention.out_proj.weight', [H, H]),
          g('head.attention.out_proj.bias', [H]),
          g('head.layernorm.weight', [H]),
          g('head.layernorm.bias', [H]),
          g('head.mlp.fc1.weight', [v.inter, H]),
          g('head.mlp.fc1.bias', [v.inter]),
          g('head.mlp.fc2.weight', [H, v.inter]),
          g('head.mlp.fc2.bias', [H]),
        ]
      : []),
    { megatron: 'multi_modal_projector.mm_soft_embed_norm.weight', hf: `${J}mm_soft_emb_norm.weight`, kind: 'copy', shape: [H] },
    { megatron: 'multi_modal_projector.proj.weight', hf: `${J}mm_input_projection_weight`, kind: 'transpose', shape: [c.hiddenSize, H] },
  ];
}

/** The SigLIP encoder layers, each under its own name (transformers' module inside Megatron-Bridge's model). */
function gemmaVlVisionBlock(c: ModelConfig): Block {
  const v = siglipOf(c);
  const H = v.hidden;
  const B = `${gemmaVlPrefixes(c).vision}encoder.layers.{i}`;
  const copy = (name: string, shape: number[]): LayerParam => ({ megatron: name, hf: [`${B}.${name}`], kind: 'copy', hfShapes: [shape], shape });
  const params: LayerParam[] = [
    copy('layer_norm1.weight', [H]),
    copy('layer_norm1.bias', [H]),
    ...['q_proj', 'k_proj', 'v_proj', 'out_proj'].flatMap((x) => [copy(`self_attn.${x}.weight`, [H, H]), copy(`self_attn.${x}.bias`, [H])]),
    copy('layer_norm2.weight', [H]),
    copy('layer_norm2.bias', [H]),
    copy('mlp.fc1.weight', [v.inter, H]),
    copy('mlp.fc1.bias', [v.inter]),
    copy('mlp.fc2.weight', [H, v.inter]),
    copy('mlp.fc2.bias', [H]),
  ];
  return { prefix: 'vision_tower.encoder.layers.', layers: v.layers, keying: 'per-layer', params: () => params, extraStateModules: () => [] };
}

/**
 * Gemma 3 vision-language models (`Gemma3ForConditionalGeneration`: gemma-3-4b … 27b) as
 * Megatron-Bridge's Gemma 3 VL bridge (`gemma_vl/gemma3_vl_bridge.py`) maps them: the Gemma 3 text
 * model under `language_model.`, the SigLIP vision tower carried under `vision_tower.*` (its
 * `ReplicatedMapping("vision_tower.**")`; from the hub's `vision_tower.vision_model.*` or the flattened
 * `vision_tower.*`), `mm_soft_emb_norm` → `multi_modal_projector.mm_soft_embed_norm` and
 * `mm_input_projection_weight` [vision, text] → `multi_modal_projector.proj.weight` transposed.
 */
export const gemma3Vl: Family = {
  id: 'gemma3_vl',
  architectures: ['Gemma3ForConditionalGeneration'],
  modelType: 'gemma3',
  description: 'Gemma 3 vision-language (4B … 27B; SigLIP tower carried, projector transposed)',
  keying: () => 'stacked',
  fromHf(whole, file): ModelConfig {
    const text = textConfig(whole);
    if (text === whole) throw badInput(`${file}: a Gemma3ForConditionalGeneration config needs its text_config`, file);
    if (!whole.vision_config) throw badInput(`${file}: a Gemma3ForConditionalGeneration config needs its vision_config`, file);
    const tie = whole.tie_word_embeddings ?? text.tie_word_embeddings;
    return { ...gemma3Text('gemma3_vl', { ...text, ...(tie !== undefined ? { tie_word_embeddings: tie } : {}) }, file), hf: whole };
  },
  fromHfNames(c, names): ModelConfig {
    if (names.some((n) => n.startsWith('model.language_model.'))) return { ...c, hfLayout: { ...c.hfLayout, textPrefix: 'model.language_model.' } };
    // transformers 5 saves the tower flattened (vision_tower.*), the hub files wrap it (vision_tower.vision_model.*).
    if (names.some((n) => n.startsWith('vision_tower.')) && !names.some((n) => n.startsWith('vision_tower.vision_model.'))) return { ...c, hfLayout: { ...c.hfLayout, visionPrefix: 'vision_tower.' } };
    return c;
  },
  globalParams: (c) => {
    const T = gemmaVlPrefixes(c).text;
    return [...denseGlobals(c, { embed: `${T}embed_tokens.weight`, norm: `${T}norm.weight`, head: 'lm_head.weight' }), ...gemmaVlGlobals(c)];
  },
  layerParams: (c) => gemmaLayer(c, `${gemmaVlPrefixes(c).text}layers.{i}`),
  extraStateModules: () => GEMMA_EXTRA_STATE,
  blocks: (c) => [gemmaVlVisionBlock(c)],
  megatronPrefix: () => ({ prefix: 'language_model.', except: ['vision_tower.', 'multi_modal_projector.'] }),
  megatronArgs: (c) => gemma3Args(c, textConfig(c.hf ?? {})),
};
