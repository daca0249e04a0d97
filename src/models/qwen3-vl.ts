/**
 * Qwen3-VL dense vision-language models (`Qwen3VLForConditionalGeneration`: Qwen3-VL-2B … 32B) as
 * Megatron-Bridge's Qwen3-VL bridge (`qwen_vl/qwen3_vl_bridge.py`) maps them onto its
 * `Qwen3VLModel`:
 *
 * - the text model, a Qwen3 decoder (GQA `linear_qkv` per query group, q/k RMSNorm per head, SwiGLU
 *   `linear_fc1` = [gate; up]), under `model.language_model.*` (HF) ↔ `language_model.*`
 *   (Megatron: decoder, embedding, output layer); interleaved mRoPE (`mrope_section`) is a
 *   position-id matter, recorded in the args, with no weight of its own;
 * - the vision tower and its deepstack mergers `model.visual.*` ↔ `vision_model.*`, carried value
 *   for value (`qwen-vision.ts`).
 *
 * Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`: 30B-A3B, 235B-A22B; its `Qwen3VLMoEBridge`)
 * has Qwen3-MoE text layers (softmax router `mlp.gate`, no shared expert, dense layers from
 * `mlp_only_layers` / `decoder_sparse_step`). Its hub checkpoints store the experts fused and
 * **input-major**: `experts.gate_up_proj` [E, H, 2F] (columns [gate | up]) and `experts.down_proj`
 * [E, F, H] — the transpose of transformers' in-memory [E, 2F, H] / [E, H, F], which transformers
 * 5 restores on save (`Transpose(1, 2)` in its qwen3_vl_moe conversion mapping). Each expert's
 * `linear_fc1` = [gate; up] is `gate_up_proj[e]` transposed and `linear_fc2` is `down_proj[e]`
 * transposed, as Megatron-Bridge's `FusedGatedExpertMapping(transpose_on_export=True)` does;
 * per-expert checkpoints (`experts.<e>.{gate,up,down}_proj`) are read too, and the export writes
 * the layout the source had.
 */
import { badInput } from '../util/errors.js';
import { fromHfConfig, isMoeLayer, mropeArgs, num, textConfig, type ExpertLayout, type ModelConfig } from './config.js';
import { attentionParams, DENSE_EXTRA_STATE_MODULES, denseGlobals, denseMlpParams, inputMajorFusedExperts, linearExtraState, moeArgs, moeParams } from './dense.js';
import type { PyValue } from '../pickle/values.js';
import { qwenVisionTower } from './qwen-vision.js';
import type { Family, LayerParam } from './spec.js';

const T = 'model.language_model';
const vision = qwenVisionTower({ deepstack: true });


export const qwen3Vl: Family = {
  id: 'qwen3_vl',
  architectures: ['Qwen3VLForConditionalGeneration'],
  modelType: 'qwen3_vl',
  description: 'Qwen3-VL dense vision-language (2B … 32B; vision tower with deepstack mergers)',
  keying: () => 'stacked',
  fromHf(whole, file): ModelConfig {
    const text = textConfig(whole);
    if (text === whole) throw badInput(`${file}: a Qwen3VLForConditionalGeneration config needs its text_config`, file);
    // The wrapper's tie_word_embeddings is the one transformers applies (the 2B/4B configs set it in both places).
    const tie = whole.tie_word_embeddings ?? text.tie_word_embeddings;
    return { ...fromHfConfig('qwen3_vl', { ...text, tie_word_embeddings: tie }, file, { qkvBias: text.attention_bias === true, qkNorm: true }), hf: whole };
  },
  globalParams: (c) => [...denseGlobals(c, { embed: `${T}.embed_tokens.weight`, norm: `${T}.norm.weight`, head: 'lm_head.weight' }), ...vision.globals(c)],
  layerParams: (c) => [
    ...attentionParams(c, `${T}.layers.{i}.self_attn`, `${T}.layers.{i}.input_layernorm.weight`),
    ...denseMlpParams(c, `${T}.layers.{i}.mlp`, `${T}.layers.{i}.post_attention_layernorm.weight`),
  ],
  extraStateModules: () => DENSE_EXTRA_STATE_MODULES,
  blocks: (c) => [vision.block(c)],
  megatronPrefix: () => ({ prefix: 'language_model.', except: ['vision_model.'] }),
  megatronArgs: (c): Record<string, PyValue> => {
    return mropeArgs(textConfig(c.hf ?? {}));
  },
};

/** A Qwen3-VL-MoE text layer's MoE block at HF prefix P: experts per expert, fused output-major (transformers 5's) or fused input-major (the hub's). */
function moeBlock(c: ModelConfig, P: string, experts: ExpertLayout): LayerParam[] {
  const M = `${P}.mlp`;
  const block = moeParams(c, {
    norm: `${P}.post_attention_layernorm.weight`,
    router: `${M}.gate.weight`,
    gate: `${M}.experts.{e}.gate_proj.weight`,
    up: `${M}.experts.{e}.up_proj.weight`,
    down: `${M}.experts.{e}.down_proj.weight`,
    ...(experts === 'fused' ? { fused: { gateUp: `${M}.experts.gate_up_proj`, down: `${M}.experts.down_proj` } } : {}),
  });
  if (experts !== 'fused-input-major') return block;
  return [...block.filter((p) => !p.megatron.startsWith('mlp.experts.')), ...inputMajorFusedExperts(c, M)];
}

export const qwen3VlMoe: Family = {
  id: 'qwen3_vl_moe',
  architectures: ['Qwen3VLMoeForConditionalGeneration'],
  modelType: 'qwen3_vl_moe',
  description: 'Qwen3-VL-MoE vision-language (30B-A3B, 235B-A22B; input-major fused experts)',
  keying: (c) => (c.moe?.moeLayers?.some((x) => !x) ? 'per-layer' : 'stacked'),
  fromHf(whole, file): ModelConfig {
    const text = textConfig(whole);
    if (text === whole) throw badInput(`${file}: a Qwen3VLMoeForConditionalGeneration config needs its text_config`, file);
    const tie = whole.tie_word_embeddings ?? text.tie_word_embeddings;
    const base = { ...fromHfConfig('qwen3_vl_moe', { ...text, tie_word_embeddings: tie }, file, { qkvBias: text.attention_bias === true, qkNorm: true }), hf: whole };
    const numExperts = num(text, text.num_experts === undefined ? 'num_local_experts' : 'num_experts', file);
    const topK = num(text, 'num_experts_per_tok', file);
    if (topK > numExperts) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds the ${numExperts} experts`, file);
    const step = num(text, 'decoder_sparse_step', file, 1);
    const only = Array.isArray(text.mlp_only_layers) ? (text.mlp_only_layers as unknown[]).map(Number) : [];
    const moeLayers = Array.from({ length: base.numLayers }, (_, i) => !only.includes(i) && (i + 1) % step === 0);
    return { ...base, moe: { numExperts, topK, ffnHiddenSize: num(text, 'moe_intermediate_size', file), ...(moeLayers.every((x) => x) ? {} : { moeLayers }) } };
  },
  fromHfNames(c, names, opts): ModelConfig {
    const fused = names.filter((n) => /^model\.language_model\.layers\.\d+\.mlp\.experts\.down_proj$/.test(n));
    if (fused.length === 0) {
      const perExpert = names.some((n) => /^model\.language_model\.layers\.\d+\.mlp\.experts\.\d+\.down_proj\.weight$/.test(n));
      return perExpert ? { ...c, hfLayout: { ...c.hfLayout, experts: 'per-expert' } } : c;
    }
    // Which way round: input-major (the hub's: gate_up_proj [E, H, 2F], down_proj [E, F, H]) or
    // output-major (transformers 5's in-memory layout, which it saves for a model it did not load
    // from the hub). The two shapes together tell, unless H = 2F and F = H at once (impossible).
    const H = c.hiddenSize;
    const F = c.moe!.ffnHiddenSize;
    const down = opts?.shapeOf?.(fused[0]!);
    const gateUp = opts?.shapeOf?.(fused[0]!.replace(/down_proj$/, 'gate_up_proj'));
    let layout: ExpertLayout = 'fused-input-major';
    if (down?.length === 3 && F !== H) layout = down[1] === F && down[2] === H ? 'fused-input-major' : 'fused';
    else if (gateUp?.length === 3 && 2 * F !== H) layout = gateUp[1] === H && gateUp[2] === 2 * F ? 'fused-input-major' : 'fused';
    return { ...c, hfLayout: { ...c.hfLayout, experts: layout } };
  },
  globalParams: (c) => [...denseGlobals(c, { embed: `${T}.embed_tokens.weight`, norm: `${T}.norm.weight`, head: 'lm_head.weight' }), ...vision.globals(c)],
  layerParams: (c, i) => [
    ...attentionParams(c, `${T}.layers.{i}.self_attn`, `${T}.layers.{i}.input_layernorm.weight`),
    // Without a recorded layout (a Megatron checkpoint saved by megatron-core), the hub's: transformers 5
    // loads Qwen3-VL-MoE experts only fused (its conversion mapping transposes them, nothing merges per-expert ones).
    ...(isMoeLayer(c, i) ? moeBlock(c, `${T}.layers.{i}`, c.hfLayout?.experts ?? 'fused-input-major') : denseMlpParams(c, `${T}.layers.{i}.mlp`, `${T}.layers.{i}.post_attention_layernorm.weight`)),
  ],
  extraStateModules: (c, i) => linearExtraState(c, i),
  blocks: (c) => [vision.block(c)],
  megatronPrefix: () => ({ prefix: 'language_model.', except: ['vision_model.'] }),
  megatronArgs: (c): Record<string, PyValue> => {
    const text = textConfig(c.hf ?? {});
    return {
      ...moeArgs(c),
      moe_router_pre_softmax: text.norm_topk_prob === false,
      moe_router_load_balancing_type: 'aux_loss',
      ...(c.moe?.moeLayers ? { moe_layer_freq: c.moe.moeLayers.map((x) => (x ? 1 : 0)) } : {}),
      ...mropeArgs(text),
    };
  },
};
