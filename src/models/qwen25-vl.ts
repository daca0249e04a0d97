/**
 * Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`: 3B, 7B, 32B, 72B) as Megatron-Bridge's
 * Qwen2.5-VL bridge (`qwen_vl/qwen25_vl_bridge.py`) maps it onto its `Qwen25VLModel`:
 *
 * - the text model, a Qwen2 decoder (q/k/v biases, `linear_qkv` per query group, [gate; up]),
 *   under `language_model.` in Megatron; on the HF side under `model.` as the hub checkpoints and
 *   transformers 5's save_pretrained name it, or `model.language_model.` (transformers 5's
 *   in-memory names, which some tools save) — the source's prefix is written back;
 * - the vision tower is transformers' own module inside Megatron-Bridge's model
 *   (`ReplicatedMapping("visual.**", "visual.**")`): every `visual.*` tensor (or `model.visual.*`)
 *   is carried under its own name, replicated on every TP rank, values unchanged;
 * - mRoPE (`mrope_section`) is recorded in the args.
 */
import { badInput } from '../util/errors.js';
import { fromHfConfig, mropeArgs, textConfig, visionConfigReader, type ModelConfig } from './config.js';
import { attentionParams, DENSE_EXTRA_STATE_MODULES, denseGlobals, denseMlpParams } from './dense.js';
import type { Block, Family, GlobalParam, LayerParam } from './spec.js';

/** The text prefix (`model.` as the hub has it, or `model.language_model.`) and the vision prefix that goes with it. */
function prefixes(c: ModelConfig): { text: string; vision: string } {
  return c.hfLayout?.textPrefix === 'model.language_model.' ? { text: 'model.language_model.', vision: 'model.visual.' } : { text: 'model.', vision: 'visual.' };
}

interface Vision {
  readonly depth: number;
  readonly hidden: number;
  readonly inter: number;
  readonly out: number;
  readonly merge: number;
  readonly patch: number;
  readonly temporal: number;
  readonly channels: number;
}

function visionOf(c: ModelConfig): Vision {
  const { int: n } = visionConfigReader(c, 'Qwen2_5_VLForConditionalGeneration');
  return { depth: n('depth'), hidden: n('hidden_size'), inter: n('intermediate_size'), out: n('out_hidden_size'), merge: n('spatial_merge_size', 2), patch: n('patch_size', 14), temporal: n('temporal_patch_size', 2), channels: n('in_channels', 3) };
}

function visionGlobals(c: ModelConfig): GlobalParam[] {
  const v = visionOf(c);
  const P = prefixes(c).vision;
  const m2 = v.hidden * v.merge * v.merge;
  const g = (name: string, shape: number[]): GlobalParam => ({ megatron: `visual.${name}`, hf: `${P}${name}`, kind: 'copy', shape });
  return [
    g('patch_embed.proj.weight', [v.hidden, v.channels, v.temporal, v.patch, v.patch]),
    g('merger.ln_q.weight', [v.hidden]),
    g('merger.mlp.0.weight', [m2, m2]),
    g('merger.mlp.0.bias', [m2]),
    g('merger.mlp.2.weight', [v.out, m2]),
    g('merger.mlp.2.bias', [v.out]),
  ];
}

/** The vision blocks, each keyed under its own name (an HF module inside the Megatron model, not a megatron-core layer stack). */
function visionBlock(c: ModelConfig): Block {
  const v = visionOf(c);
  const H = v.hidden;
  const B = `${prefixes(c).vision}blocks.{i}`;
  const copy = (name: string, shape: number[]): LayerParam => ({ megatron: name, hf: [`${B}.${name}`], kind: 'copy', hfShapes: [shape], shape });
  const params: LayerParam[] = [
    copy('norm1.weight', [H]),
    copy('norm2.weight', [H]),
    copy('attn.qkv.weight', [3 * H, H]),
    copy('attn.qkv.bias', [3 * H]),
    copy('attn.proj.weight', [H, H]),
    copy('attn.proj.bias', [H]),
    copy('mlp.gate_proj.weight', [v.inter, H]),
    copy('mlp.gate_proj.bias', [v.inter]),
    copy('mlp.up_proj.weight', [v.inter, H]),
    copy('mlp.up_proj.bias', [v.inter]),
    copy('mlp.down_proj.weight', [H, v.inter]),
    copy('mlp.down_proj.bias', [H]),
  ];
  return { prefix: 'visual.blocks.', layers: v.depth, keying: 'per-layer', params: () => params, extraStateModules: () => [] };
}

export const qwen25Vl: Family = {
  id: 'qwen2_5_vl',
  architectures: ['Qwen2_5_VLForConditionalGeneration'],
  modelType: 'qwen2_5_vl',
  description: 'Qwen2.5-VL (3B … 72B; the vision tower carried as transformers holds it)',
  keying: () => 'stacked',
  fromHf(whole, file): ModelConfig {
    // Hub configs are flat (text fields at the top); transformers ≥ 4.53 re-saves them with a text_config.
    const text = textConfig(whole);
    if (!whole.vision_config) throw badInput(`${file}: a Qwen2_5_VLForConditionalGeneration config needs its vision_config`, file);
    const tie = whole.tie_word_embeddings ?? text.tie_word_embeddings;
    return { ...fromHfConfig('qwen2_5_vl', { ...text, tie_word_embeddings: tie }, file, { qkvBias: true, qkNorm: false }), hf: whole };
  },
  fromHfNames(c, names): ModelConfig {
    return names.some((n) => n.startsWith('model.language_model.')) ? { ...c, hfLayout: { ...c.hfLayout, textPrefix: 'model.language_model.' } } : c;
  },
  globalParams: (c) => {
    const T = prefixes(c).text;
    return [...denseGlobals(c, { embed: `${T}embed_tokens.weight`, norm: `${T}norm.weight`, head: 'lm_head.weight' }), ...visionGlobals(c)];
  },
  layerParams: (c) => {
    const T = `${prefixes(c).text}layers.{i}`;
    return [...attentionParams(c, `${T}.self_attn`, `${T}.input_layernorm.weight`), ...denseMlpParams(c, `${T}.mlp`, `${T}.post_attention_layernorm.weight`)];
  },
  extraStateModules: () => DENSE_EXTRA_STATE_MODULES,
  blocks: (c) => [visionBlock(c)],
  megatronPrefix: () => ({ prefix: 'language_model.', except: ['visual.'] }),
  megatronArgs: (c) => mropeArgs(textConfig(c.hf ?? {})),
};
