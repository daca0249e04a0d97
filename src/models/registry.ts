/** The model-family registry: HF `architectures` → family. Adding a family is one file plus one line here. */
import type { Family, MegatronRecord } from './spec.js';
import type { ModelConfig } from './config.js';
import { llama } from './llama.js';
import { mistral } from './mistral.js';
import { qwen2 } from './qwen2.js';
import { qwen3 } from './qwen3.js';
import { mixtral } from './mixtral.js';
import { qwen3Moe } from './qwen3-moe.js';
import { nemotronH } from './nemotron-h.js';
import { gptOss } from './gpt-oss.js';
import { deepseekV3 } from './deepseek-v3.js';
import { glm4Moe } from './glm4-moe.js';
import { olmoe } from './olmoe.js';
import { minimaxM2 } from './minimax-m2.js';
import { qwen3Vl, qwen3VlMoe } from './qwen3-vl.js';
import { gemma2, gemma3, gemma3Vl } from './gemma.js';
import { qwen25Vl } from './qwen25-vl.js';
import { llama4, llama4Vl } from './llama4.js';
import { qwen3Next } from './qwen3-next.js';
import { qwen35, qwen35Moe, qwen35Vl, qwen35MoeVl } from './qwen35.js';
import { unsupported } from '../util/errors.js';

export const FAMILIES: readonly Family[] = [llama, mistral, qwen2, qwen3, mixtral, qwen3Moe, nemotronH, qwen3Next, qwen35, qwen35Moe, qwen35Vl, qwen35MoeVl, gptOss, deepseekV3, glm4Moe, olmoe, minimaxM2, qwen3Vl, qwen3VlMoe, gemma2, gemma3, gemma3Vl, qwen25Vl, llama4, llama4Vl];

export function familyById(id: string): Family | undefined {
  return FAMILIES.find((f) => f.id === id);
}

/** The family of a normalized config (always registered: configs are made by families). */
export function familyOf(c: ModelConfig): Family {
  const f = familyById(c.family);
  if (!f) throw new Error(`internal: no family ${c.family}`);
  return f;
}

/**
 * The family of a Megatron checkpoint that records no HF config, from its provider class and
 * features (`Family.megatronClaim`): a family the provider names, else one whose features fit.
 */
export function familyForMegatron(r: MegatronRecord, file: string): Family {
  // Megatron-Bridge's VL providers (qwen_vl, gemma_vl, glm_vl …) name a text family too; their
  // checkpoints keep the language model under a prefix and a vision tower no text family maps.
  if (/(^|[._])(\w+_)?vl([._]|$)|_vl_/.test(r.target)) throw unsupported(`${file}: a vision-language model (${r.target}) records no HF config here; give --hf-model <reference HF dir>`, file);
  const f = FAMILIES.find((x) => x.megatronClaim?.(r) === 'provider') ?? FAMILIES.find((x) => x.megatronClaim?.(r) === 'features');
  if (!f) throw unsupported(`${file}: no family matches the recorded model (${r.target || 'training args'}${r.moe ? ', MoE' : ''}${r.qkNorm ? ', q/k norms' : ''}${r.qkvBias ? ', QKV bias' : ''}); give --hf-model <reference HF dir>`, file);
  return f;
}

/** Architectures recognised only to be refused with the reason, not as unknown ones. */
const REFUSED: Readonly<Record<string, string>> = {
  KimiK25ForConditionalGeneration:
    "Kimi K2.5's multimodal wrapper is not converted yet: its text branch (language_model.*, DeepSeek-V3's architecture with INT4 experts) maps as DeepseekV3ForCausalLM does, but carrying its vision tower (vision_tower.*, mm_projector.*) through Megatron is not written",
};

export function familyForHfConfig(cfg: Record<string, unknown>, file: string): Family {
  const archs = Array.isArray(cfg.architectures) ? (cfg.architectures as unknown[]).filter((a): a is string => typeof a === 'string') : [];
  for (const a of archs) if (REFUSED[a]) throw unsupported(`${file}: ${REFUSED[a]}`, file);
  for (const a of archs) {
    const f = FAMILIES.find((x) => x.architectures.includes(a));
    if (f) return f;
  }
  const byType = FAMILIES.find((f) => f.modelType === cfg.model_type);
  if (byType && archs.length === 0) return byType;
  throw unsupported(
    `${file}: unknown architecture ${archs.length ? archs.join(', ') : JSON.stringify(cfg.model_type)}; supported: ${FAMILIES.flatMap((f) => f.architectures).join(', ')}`,
    file,
  );
}
