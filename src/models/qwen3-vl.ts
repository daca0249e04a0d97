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
 */
import { badInput } from '../util/errors.js';
import { fromHfConfig, textConfig, type ModelConfig } from './config.js';
import { attentionParams, DENSE_EXTRA_STATE_MODULES, denseGlobals, denseMlpParams } from './dense.js';
import type { PyValue } from '../pickle/values.js';
import { qwenVisionTower } from './qwen-vision.js';
import type { Family } from './spec.js';

const T = 'model.language_model';
const vision = qwenVisionTower({ deepstack: true });

/** `mrope_section` from transformers 5's `rope_parameters` or 4's `rope_scaling` (absent: plain 1-D RoPE). */
function mropeSection(text: Readonly<Record<string, unknown>>): number[] | undefined {
  const rp = (text.rope_parameters ?? text.rope_scaling) as Record<string, unknown> | null | undefined;
  const s = rp?.mrope_section;
  return Array.isArray(s) && s.every((x) => typeof x === 'number') ? (s as number[]) : undefined;
}

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
    const s = mropeSection(textConfig(c.hf ?? {}));
    return s ? { position_embedding_type: 'mrope', mrope_section: s } : {};
  },
};
