/**
 * The arithmetic of a decoder-only transformer's forward pass on fp32 activations: RMSNorm, rotary
 * position embeddings, causal grouped-query attention, SiLU gating and MoE routing. Both the
 * Hugging Face and the Megatron readers feed the same math (they differ in where each weight
 * lives, not in what the model computes), so a difference in logits is a difference in weights.
 *
 * Sums run in float64; results are stored as fp32, as the reference libraries store activations.
 */
import { unsupported } from '../util/errors.js';

/** In-place RMSNorm of each row of `x` ([rows, d]): x · rsqrt(mean(x²) + eps) · w (transformers' LlamaRMSNorm). */
export function rmsNorm(x: Float32Array, d: number, w: Float32Array, eps: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let o = 0; o < x.length; o += d) {
    let s = 0;
    for (let i = 0; i < d; i++) s += x[o + i]! * x[o + i]!;
    const r = Math.fround(1 / Math.sqrt(Math.fround(s / d) + eps));
    for (let i = 0; i < d; i++) out[o + i] = w[i]! * Math.fround(x[o + i]! * r);
  }
  return out;
}

/** How the rotary frequencies are made: the base, the rotated share of each head, and a scaling rule. */
export interface RopeSpec {
  readonly base: number;
  /** Rotated dims of each head (head_dim × partial rotary factor), even. */
  readonly rotaryDim: number;
  readonly scaling?: { readonly type: 'linear'; readonly factor: number } | { readonly type: 'llama3'; readonly factor: number; readonly lowFreqFactor: number; readonly highFreqFactor: number; readonly originalMaxPositions: number };
}

/**
 * inv_freq as transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`
 * compute it (and megatron-core's RotaryEmbedding with `use_rope_scaling`: the same Llama 3.1
 * formula), in fp32.
 */
export function invFreq(spec: RopeSpec): Float32Array {
  const half = spec.rotaryDim / 2;
  const inv = new Float32Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / Math.fround(Math.pow(spec.base, Math.fround((2 * i) / spec.rotaryDim)));
  const s = spec.scaling;
  if (s?.type === 'linear') for (let i = 0; i < half; i++) inv[i] = inv[i]! / s.factor;
  if (s?.type === 'llama3') {
    const lowWave = s.originalMaxPositions / s.lowFreqFactor;
    const highWave = s.originalMaxPositions / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const f = inv[i]!;
      const wave = (2 * Math.PI) / f;
      if (wave < highWave) continue;
      if (wave > lowWave) inv[i] = f / s.factor;
      else {
        const smooth = (s.originalMaxPositions / wave - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        inv[i] = (1 - smooth) * (f / s.factor) + smooth * f;
      }
    }
  }
  return inv;
}

/**
 * Rotates the first `rotaryDim` dims of every head of `x` ([T, heads · headDim]) in place, the
 * "rotate half" way both transformers (`apply_rotary_pos_emb`) and megatron-core
 * (`rotary_interleaved=False`) use: pairs (i, i + rotaryDim/2).
 */
export function applyRope(x: Float32Array, T: number, heads: number, headDim: number, inv: Float32Array, positions: readonly number[]): void {
  const half = inv.length;
  for (let t = 0; t < T; t++) {
    const p = positions[t]!;
    for (let i = 0; i < half; i++) {
      const a = Math.fround(p * inv[i]!);
      const c = Math.fround(Math.cos(a));
      const s = Math.fround(Math.sin(a));
      for (let h = 0; h < heads; h++) {
        const o = (t * heads + h) * headDim;
        const x1 = x[o + i]!;
        const x2 = x[o + i + half]!;
        x[o + i] = x1 * c - x2 * s;
        x[o + i + half] = x2 * c + x1 * s;
      }
    }
  }
}

/**
 * Causal attention: q [T, heads · hd], k / v [T, kvHeads · hd] (query head h reads kv head
 * h / (heads / kvHeads), as `repeat_kv` does), softmax(q·k / √hd) · v → [T, heads · hd].
 * `window`: attend to at most the last `window` positions (Mistral's sliding window).
 */
export function attention(q: Float32Array, k: Float32Array, v: Float32Array, T: number, heads: number, kvHeads: number, hd: number, window?: number): Float32Array {
  const out = new Float32Array(T * heads * hd);
  const rep = heads / kvHeads;
  const scale = 1 / Math.sqrt(hd);
  const score = new Float64Array(T);
  for (let h = 0; h < heads; h++) {
    const g = Math.floor(h / rep);
    for (let t = 0; t < T; t++) {
      const qo = (t * heads + h) * hd;
      const from = window ? Math.max(0, t - window + 1) : 0;
      let max = -Infinity;
      for (let s = from; s <= t; s++) {
        const ko = (s * kvHeads + g) * hd;
        let d = 0;
        for (let i = 0; i < hd; i++) d += q[qo + i]! * k[ko + i]!;
        score[s] = d * scale;
        if (score[s]! > max) max = score[s]!;
      }
      let sum = 0;
      for (let s = from; s <= t; s++) sum += score[s] = Math.exp(score[s]! - max);
      for (let s = from; s <= t; s++) {
        const p = score[s]! / sum;
        const vo = (s * kvHeads + g) * hd;
        for (let i = 0; i < hd; i++) out[qo + i] = out[qo + i]! + p * v[vo + i]!;
      }
    }
  }
  return out;
}

/** silu(gate) · up, element by element (the SwiGLU of Llama's MLP and megatron-core's `swiglu`). */
export function swiglu(gate: Float32Array, up: Float32Array): Float32Array {
  const out = new Float32Array(gate.length);
  for (let i = 0; i < gate.length; i++) {
    const g = gate[i]!;
    out[i] = Math.fround(g / (1 + Math.exp(-g))) * up[i]!;
  }
  return out;
}

/** How router logits become expert weights. */
export interface Routing {
  readonly topK: number;
  /**
   * 'softmax-topk-renorm': softmax over all experts, keep the top k, divide by their sum (Mixtral;
   * Qwen3-MoE with norm_topk_prob; megatron-core's default: top k of the logits, then softmax over
   * them, which is the same). 'softmax-topk': softmax, top k, no renormalisation (Qwen3-MoE with
   * norm_topk_prob = false; megatron-core with moe_router_pre_softmax).
   */
  readonly rule: 'softmax-topk-renorm' | 'softmax-topk';
}

/** For each position: the chosen experts and their weights. */
export function route(logits: Float32Array, T: number, experts: number, r: Routing): Array<Array<{ expert: number; weight: number }>> {
  const out: Array<Array<{ expert: number; weight: number }>> = [];
  for (let t = 0; t < T; t++) {
    const row = logits.subarray(t * experts, (t + 1) * experts);
    let max = -Infinity;
    for (const v of row) max = Math.max(max, v);
    const p = Array.from(row, (v) => Math.exp(v - max));
    const sum = p.reduce((a, b) => a + b, 0);
    // Ties go to the lower index, as torch.topk does on CPU in practice.
    const order = p.map((v, e) => ({ e, v: v / sum })).sort((a, b) => b.v - a.v || a.e - b.e).slice(0, r.topK);
    const kept = order.reduce((a, b) => a + b.v, 0);
    out.push(order.map((o) => ({ expert: o.e, weight: r.rule === 'softmax-topk-renorm' ? o.v / kept : o.v })));
  }
  return out;
}

export function addInto(acc: Float32Array, x: Float32Array, scale = 1): void {
  for (let i = 0; i < acc.length; i++) acc[i] = acc[i]! + scale * x[i]!;
}

export function addBias(y: Float32Array, bias: Float32Array): void {
  const n = bias.length;
  for (let i = 0; i < y.length; i++) y[i] = y[i]! + bias[i % n]!;
}

/** Parses a Hugging Face `rope_scaling` / `rope_parameters` dict into a RopeSpec scaling rule. */
export function ropeScalingFromHf(rp: Record<string, unknown> | null | undefined, file: string): RopeSpec['scaling'] {
  if (!rp) return undefined;
  const type = String(rp.rope_type ?? rp.type ?? 'default');
  const n = (k: string, d?: number): number => {
    const v = rp[k];
    if (typeof v === 'number') return v;
    if (d !== undefined) return d;
    throw unsupported(`${file}: rope scaling ${type} without ${k}`, file);
  };
  if (type === 'default') return undefined;
  if (type === 'linear') return { type: 'linear', factor: n('factor') };
  if (type === 'llama3') return { type: 'llama3', factor: n('factor'), lowFreqFactor: n('low_freq_factor'), highFreqFactor: n('high_freq_factor'), originalMaxPositions: n('original_max_position_embeddings') };
  throw unsupported(`${file}: rope scaling ${JSON.stringify(type)} has no reference forward yet (default, linear and llama3 do)`, file);
}
