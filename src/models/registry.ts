/** The model-family registry: HF `architectures` → family. Adding a family is one file plus one line here. */
import type { DenseFamily } from './dense.js';
import { llama } from './llama.js';
import { mistral } from './mistral.js';
import { qwen2 } from './qwen2.js';
import { qwen3 } from './qwen3.js';
import { unsupported } from '../errors.js';

export const FAMILIES: readonly DenseFamily[] = [llama, mistral, qwen2, qwen3];

export function familyById(id: string): DenseFamily | undefined {
  return FAMILIES.find((f) => f.id === id);
}

export function familyForHfConfig(cfg: Record<string, unknown>, file: string): DenseFamily {
  const archs = Array.isArray(cfg.architectures) ? (cfg.architectures as unknown[]).filter((a): a is string => typeof a === 'string') : [];
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
