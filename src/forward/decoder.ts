/**
 * The forward pass of a decoder-only transformer (pre-norm, RoPE, grouped-query attention, SwiGLU
 * MLP or a routed MoE of SwiGLU experts), layer by layer, all prompt positions at once: each
 * layer's weights are read once, used for every position and dropped, so memory is one layer's
 * largest row block plus the activations ([positions, hidden]).
 *
 * What the engine does not know is where a weight lives and how fused tensors split: a
 * `ModelReader` answers that, one per checkpoint format and architecture class (`hf-*.ts`,
 * `megatron-gpt.ts`), each written from its reference implementation, not from shardshift's
 * conversion code, so that a mapping error shows up as different logits.
 */
import { addBias, addInto, applyRope, attention, invFreq, rmsNorm, route, swiglu, type RopeSpec, type Routing } from './math.js';
import { linear } from './linear.js';
import type { WeightRef, WeightStore } from './weights.js';

export interface DecoderDims {
  readonly hidden: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  /** The real vocabulary (logits beyond it, e.g. Megatron's padding rows, are not computed). */
  readonly vocab: number;
  /**
   * Set when only the padded vocabulary is known (Megatron-LM args without `vocab_size`): the
   * other side's vocabulary, if not larger, is taken as the real one.
   */
  readonly vocabPaddedOnly?: boolean;
  readonly eps: number;
  readonly rope: RopeSpec;
  readonly maxPositions: number;
  /** Sliding-window attention on every layer (Mistral), when set. */
  readonly slidingWindow?: number;
}

/** q [T, heads·hd], k and v [T, kvHeads·hd], before q/k norms and rotary embedding. */
export interface Qkv {
  readonly q: Float32Array;
  readonly k: Float32Array;
  readonly v: Float32Array;
}

export interface AttentionReader {
  readonly norm: WeightRef;
  qkv(x: Float32Array, T: number): Promise<Qkv>;
  /** Per-head RMSNorm weights on q and k (Qwen3), when the model has them. */
  readonly qNorm?: WeightRef;
  readonly kNorm?: WeightRef;
  readonly out: WeightRef;
}

/** One SwiGLU MLP: gate and up projections of the normed input, and the down projection. */
export interface SwigluReader {
  gateUp(x: Float32Array, T: number): Promise<{ gate: Float32Array; up: Float32Array }>;
  readonly down: WeightRef;
}

export type MlpReader =
  | { readonly kind: 'dense'; readonly norm: WeightRef; readonly mlp: SwigluReader }
  | { readonly kind: 'moe'; readonly norm: WeightRef; readonly router: WeightRef; readonly experts: number; readonly routing: Routing; expert(e: number): SwigluReader };

export interface ModelReader {
  /** e.g. "LlamaForCausalLM (Hugging Face)", "GPTModel (megatron-core torch_dist)". */
  readonly describe: string;
  readonly dims: DecoderDims;
  readonly store: WeightStore;
  readonly embedding: WeightRef;
  readonly layers: number;
  attention(i: number): AttentionReader;
  mlp(i: number): MlpReader;
  readonly finalNorm: WeightRef;
  readonly lmHead: WeightRef;
}

export interface ForwardProgress {
  readonly layer: number;
  readonly layers: number;
}

/** Logits [T, vocab] for `tokens` at positions 0 … T-1 (`vocab`: the model's own unless given). */
export async function forwardLogits(m: ModelReader, tokens: readonly number[], opts: { vocab?: number; onLayer?: (p: ForwardProgress) => void } = {}): Promise<Float32Array> {
  const onLayer = opts.onLayer;
  const { dims, store } = m;
  const T = tokens.length;
  const H = dims.hidden;
  const inv = invFreq(dims.rope);
  const positions = tokens.map((_t, i) => i);
  let x = await store.gather(m.embedding, tokens);
  for (let i = 0; i < m.layers; i++) {
    const a = m.attention(i);
    const h = rmsNorm(x, H, await store.whole(a.norm), dims.eps);
    const { q, k, v } = await a.qkv(h, T);
    const hd = dims.headDim;
    const qn = a.qNorm ? rmsNorm(q, hd, await store.whole(a.qNorm), dims.eps) : q;
    const kn = a.kNorm ? rmsNorm(k, hd, await store.whole(a.kNorm), dims.eps) : k;
    applyRope(qn, T, dims.heads, hd, inv, positions);
    applyRope(kn, T, dims.kvHeads, hd, inv, positions);
    const o = attention(qn, kn, v, T, dims.heads, dims.kvHeads, hd, dims.slidingWindow);
    addInto(x, await linear(store, a.out, o, T));
    const mr = m.mlp(i);
    const h2 = rmsNorm(x, H, await store.whole(mr.norm), dims.eps);
    if (mr.kind === 'dense') addInto(x, await swigluMlp(store, mr.mlp, h2, T));
    else x = await moe(store, mr, h2, T, x, H);
    onLayer?.({ layer: i + 1, layers: m.layers });
  }
  const hn = rmsNorm(x, H, await store.whole(m.finalNorm), dims.eps);
  return linear(store, m.lmHead, hn, T, [0, opts.vocab ?? dims.vocab]);
}

async function swigluMlp(store: WeightStore, r: SwigluReader, x: Float32Array, T: number): Promise<Float32Array> {
  const { gate, up } = await r.gateUp(x, T);
  return linear(store, r.down, swiglu(gate, up), T);
}

async function moe(store: WeightStore, r: Extract<MlpReader, { kind: 'moe' }>, h: Float32Array, T: number, x: Float32Array, H: number): Promise<Float32Array> {
  const logits = await linear(store, r.router, h, T);
  const choice = route(logits, T, r.experts, r.routing);
  for (let e = 0; e < r.experts; e++) {
    const rows = choice.flatMap((c, t) => c.filter((x) => x.expert === e).map((x) => ({ t, w: x.weight })));
    if (rows.length === 0) continue; // an expert no position chose is never read
    const xe = new Float32Array(rows.length * H);
    rows.forEach((r2, j) => xe.set(h.subarray(r2.t * H, (r2.t + 1) * H), j * H));
    const ye = await swigluMlp(store, r.expert(e), xe, rows.length);
    rows.forEach((r2, j) => {
      for (let d = 0; d < H; d++) x[r2.t * H + d] = x[r2.t * H + d]! + r2.w * ye[j * H + d]!;
    });
  }
  return x;
}

/** A projection with an optional bias: x · Wᵀ (+ b). */
export async function project(store: WeightStore, w: WeightRef, x: Float32Array, T: number, bias?: WeightRef): Promise<Float32Array> {
  const y = await linear(store, w, x, T);
  if (bias) addBias(y, await store.whole(bias));
  return y;
}
