/**
 * The parts of a Hugging Face `config.json` every decoder-only reference forward reads: sizes,
 * norm epsilon and rotary embedding, with transformers' defaults (`LlamaConfig`, `Qwen2Config` …:
 * `num_key_value_heads` defaults to the head count, `head_dim` to hidden / heads, `rope_theta` to
 * 10000 and may live in transformers 5's `rope_parameters`).
 */
import { badInput, unsupported } from '../util/errors.js';
import { ropeScalingFromHf } from './math.js';
import type { DecoderDims } from './decoder.js';

export type HfConfig = Readonly<Record<string, unknown>>;

export function hfNum(cfg: HfConfig, key: string, file: string, fallback?: number): number {
  const v = cfg[key];
  if (typeof v === 'number' && Number.isFinite(v)) return v;
  if ((v === undefined || v === null) && fallback !== undefined) return fallback;
  throw badInput(`${file}: ${key} is ${v === undefined ? 'missing' : JSON.stringify(v)}; the reference forward needs a number`, file);
}

export function hfDims(cfg: HfConfig, file: string): DecoderDims {
  const hidden = hfNum(cfg, 'hidden_size', file);
  const heads = hfNum(cfg, 'num_attention_heads', file);
  const headDim = hfNum(cfg, 'head_dim', file, hidden / heads);
  const rp = (cfg.rope_parameters ?? cfg.rope_scaling) as Record<string, unknown> | null | undefined;
  const base = typeof rp?.rope_theta === 'number' ? rp.rope_theta : hfNum(cfg, 'rope_theta', file, 10000);
  const partial = typeof rp?.partial_rotary_factor === 'number' ? rp.partial_rotary_factor : hfNum(cfg, 'partial_rotary_factor', file, 1);
  const rotaryDim = Math.floor(headDim * partial);
  if (cfg.hidden_act !== undefined && cfg.hidden_act !== 'silu') throw unsupported(`${file}: hidden_act ${JSON.stringify(cfg.hidden_act)}; the reference forward computes SwiGLU (silu)`, file);
  if (cfg.attention_bias === true && cfg.model_type !== 'qwen2') throw unsupported(`${file}: attention_bias (an o_proj bias) has no reference forward yet`, file);
  if (cfg.mlp_bias === true) throw unsupported(`${file}: mlp_bias is set; the reference forward has no MLP biases`, file);
  const window = (cfg.use_sliding_window ?? true) && typeof cfg.sliding_window === 'number' ? cfg.sliding_window : undefined;
  if (window !== undefined && cfg.model_type !== 'mistral' && cfg.model_type !== 'mixtral') {
    throw unsupported(`${file}: sliding-window attention on ${String(cfg.model_type)} (per-layer windows) has no reference forward`, file);
  }
  return {
    hidden,
    heads,
    kvHeads: hfNum(cfg, 'num_key_value_heads', file, heads),
    headDim,
    vocab: hfNum(cfg, 'vocab_size', file),
    eps: hfNum(cfg, 'rms_norm_eps', file, 1e-6),
    rope: { base, rotaryDim, scaling: ropeScalingFromHf(rp, file) },
    maxPositions: hfNum(cfg, 'max_position_embeddings', file, Number.MAX_SAFE_INTEGER),
    ...(window !== undefined ? { slidingWindow: window } : {}),
  };
}
