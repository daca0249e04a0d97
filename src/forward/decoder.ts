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
import { badInput } from '../util/errors.js';
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

/**
 * The attention of one tensor-parallel rank (or of the whole model: one shard): its query and
 * key/value heads, and the rows of the output projection that take its heads (a row-parallel
 * linear, [hidden, heads·hd]); the shards' outputs are summed, as the all-reduce does.
 */
export interface AttentionShard {
  readonly heads: number;
  readonly kvHeads: number;
  qkv(x: Float32Array, T: number): Promise<Qkv>;
  readonly out: WeightRef;
}

export interface AttentionReader {
  readonly norm: WeightRef;
  readonly shards: readonly AttentionShard[];
  /** Per-head RMSNorm weights on q and k (Qwen3), when the model has them. */
  readonly qNorm?: WeightRef;
  readonly kNorm?: WeightRef;
}

/** One SwiGLU MLP (or one tensor-parallel rank's share of it): gate and up of the normed input, and the down projection. */
export interface SwigluReader {
  gateUp(x: Float32Array, T: number): Promise<{ gate: Float32Array; up: Float32Array }>;
  readonly down: WeightRef;
}

export type MlpReader =
  /** `shards`: the MLP, or its tensor-parallel ranks' shares (their outputs summed). */
  | { readonly kind: 'dense'; readonly norm: WeightRef; readonly shards: readonly SwigluReader[] }
  | { readonly kind: 'moe'; readonly norm: WeightRef; readonly router: WeightRef; readonly experts: number; readonly routing: Routing; expert(e: number): SwigluReader };

export interface ModelReader {
  /** e.g. "LlamaForCausalLM (Hugging Face)", "GPTModel (megatron-core torch_dist)". */
  readonly describe: string;
  readonly dims: DecoderDims;
  readonly store: WeightStore;
  /** The embedding rows of `tokens` ([T, hidden]). */
  embed(tokens: readonly number[]): Promise<Float32Array>;
  readonly layers: number;
  attention(i: number): AttentionReader;
  mlp(i: number): MlpReader;
  readonly finalNorm: WeightRef;
  /** Logits [T, vocab] of the final hidden states. */
  head(x: Float32Array, T: number, vocab: number): Promise<Float32Array>;
}

/**
 * The embedding rows of `tokens` from a vocabulary-parallel embedding: `slices[r]` holds rows
 * r · rows … (r + 1) · rows - 1 (megatron-core's VocabParallelEmbedding, NxD's ParallelEmbedding).
 */
export async function vocabParallelEmbed(store: WeightStore, slices: readonly WeightRef[], tokens: readonly number[], hidden: number): Promise<Float32Array> {
  const rows = store.shape(slices[0]!)[0]!;
  const out = new Float32Array(tokens.length * hidden);
  for (let t = 0; t < tokens.length; t++) {
    const id = tokens[t]!;
    const slice = slices[Math.floor(id / rows)];
    if (!slice) throw badInput(`token id ${id} is outside the ${rows * slices.length} rows of ${slices[0]!.name}'s slices`, store.source.path, slices[0]!.name);
    out.set(await store.gather(slice, [id % rows]), t * hidden);
  }
  return out;
}

/**
 * Logits [T, vocab] of a column-parallel output layer: each slice's rows in order, the first
 * `vocab` of them (padding rows beyond it are not computed).
 */
export async function columnParallelHead(store: WeightStore, slices: readonly WeightRef[], x: Float32Array, T: number, vocab: number): Promise<Float32Array> {
  const out = new Float32Array(T * vocab);
  let v0 = 0;
  for (const w of slices) {
    if (v0 >= vocab) break;
    const n = Math.min(store.shape(w)[0]!, vocab - v0);
    const y = await linear(store, w, x, T, [0, n]);
    for (let t = 0; t < T; t++) out.set(y.subarray(t * n, (t + 1) * n), t * vocab + v0);
    v0 += n;
  }
  if (v0 < vocab) throw badInput(`${store.source.path}: the slices of ${slices[0]!.name} hold ${v0} of the ${vocab} vocabulary rows`, store.source.path, slices[0]!.name);
  return out;
}

/** `embed` and `head` of a model whose embedding and output layer are whole matrices. */
export function wholeEnds(store: WeightStore, embedding: WeightRef, lmHead: WeightRef): Pick<ModelReader, 'embed' | 'head'> {
  return {
    embed: (tokens) => store.gather(embedding, tokens),
    head: (x, T, vocab) => linear(store, lmHead, x, T, [0, vocab]),
  };
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
  let x = await m.embed(tokens);
  const hd = dims.headDim;
  for (let i = 0; i < m.layers; i++) {
    const a = m.attention(i);
    const h = rmsNorm(x, H, await store.whole(a.norm), dims.eps);
    const qNorm = a.qNorm && (await store.whole(a.qNorm));
    const kNorm = a.kNorm && (await store.whole(a.kNorm));
    // Each shard's heads attend on their own; the output projections' partial sums add up.
    const partials: Float32Array[] = [];
    for (const sh of a.shards) {
      const { q, k, v } = await sh.qkv(h, T);
      const qn = qNorm ? rmsNorm(q, hd, qNorm, dims.eps) : q;
      const kn = kNorm ? rmsNorm(k, hd, kNorm, dims.eps) : k;
      applyRope(qn, T, sh.heads, hd, inv, positions);
      applyRope(kn, T, sh.kvHeads, hd, inv, positions);
      partials.push(await linear(store, sh.out, attention(qn, kn, v, T, sh.heads, sh.kvHeads, hd, dims.slidingWindow), T));
    }
    addAll(x, partials);
    const mr = m.mlp(i);
    const h2 = rmsNorm(x, H, await store.whole(mr.norm), dims.eps);
    if (mr.kind === 'dense') {
      const parts: Float32Array[] = [];
      for (const sh of mr.shards) parts.push(await swigluMlp(store, sh, h2, T));
      addAll(x, parts);
    } else x = await moe(store, mr, h2, T, x, H);
    onLayer?.({ layer: i + 1, layers: m.layers });
  }
  const hn = rmsNorm(x, H, await store.whole(m.finalNorm), dims.eps);
  return m.head(hn, T, opts.vocab ?? dims.vocab);
}

/** x += Σ partials, the partials summed first (in shard order), as a tensor-parallel all-reduce adds them. */
function addAll(x: Float32Array, partials: readonly Float32Array[]): void {
  if (partials.length === 1) return addInto(x, partials[0]!);
  const sum = Float32Array.from(partials[0]!);
  for (const p of partials.slice(1)) addInto(sum, p);
  addInto(x, sum);
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
