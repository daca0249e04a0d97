/**
 * `verify --logits`: runs a reference forward pass of the source (by its format's semantics) and
 * of the output (by its own), on the same tokens, and compares the logits. A layout mistake that
 * import and export make consistently (QKV interleave, gate/up order, expert order, rotary split)
 * survives a byte-identical round trip but not this: the Megatron side is read the way
 * megatron-core computes with it, not through shardshift's mapping.
 *
 * Tolerance: a layout-only conversion gives the same weights in the same dtype, so the two passes
 * make the same operations on the same values; the default bound is then summation-order noise.
 * A conversion that changes the weights' dtype moves every weight by up to half an ulp of the
 * coarser dtype, and the bound is that dtype's (`DEFAULT_TOLERANCE`, measured on random models:
 * docs in the README).
 */
import { compareLogits, type LogitsComparison } from '../forward/compare.js';
import { forwardLogits, type DecoderDims, type ForwardProgress } from '../forward/decoder.js';
import { openForForward, type OpenedModel } from '../forward/open.js';
import { loadTokenizer, type TextTokenizer } from '../forward/tokenizer.js';
import type { DType } from '../tensor/dtype.js';
import { badInput, usage } from '../util/errors.js';

export interface LogitsTolerance {
  /** Largest |Δ| allowed, relative to the reference's largest |logit|. */
  readonly maxAbs: number;
  /** Smallest cosine similarity allowed at any position. */
  readonly minCosine: number;
}

/** Bounds by the coarsest weight dtype involved (measured; README "verify --logits"). */
export const DEFAULT_TOLERANCE: Readonly<Record<'same' | 'F32' | 'F16' | 'BF16' | 'F8', LogitsTolerance>> = {
  same: { maxAbs: 1e-4, minCosine: 0.99999 },
  F32: { maxAbs: 1e-4, minCosine: 0.99999 },
  F16: { maxAbs: 1e-2, minCosine: 0.9999 },
  BF16: { maxAbs: 5e-2, minCosine: 0.999 },
  F8: { maxAbs: 0.25, minCosine: 0.99 },
};

export interface LogitsOptions {
  readonly against: string;
  readonly tokens?: readonly number[];
  readonly prompt?: string;
  /** Positions compared: the length of the default token sequence, or a cap on a prompt's. */
  readonly positions?: number;
  /** Greedy-decode this many tokens from both and report them. */
  readonly generate?: number;
  readonly maxMemory?: number;
  readonly tolerance?: Partial<LogitsTolerance>;
  /** HF model directory describing a Megatron checkpoint saved without training args. */
  readonly hfModel?: string;
  readonly onProgress?: (e: { side: 'source' | 'output'; step: number; steps: number; layer: number; layers: number }) => void;
}

export interface SideReport {
  readonly path: string;
  readonly describe: string;
  readonly config: string;
  readonly dtype: string;
  readonly bytesRead: number;
  readonly seconds: number;
}

export interface LogitsReport {
  readonly ok: boolean;
  readonly tokens: number[];
  readonly text?: string;
  readonly source: SideReport;
  readonly output: SideReport;
  readonly comparison: LogitsComparison;
  readonly tolerance: LogitsTolerance & { readonly basis: string };
  readonly failures: string[];
  readonly generated?: { readonly source: number[]; readonly output: number[]; readonly sourceText?: string; readonly outputText?: string };
}

const DEFAULT_POSITIONS = 8;

/** The dtype most of a side's weight bytes are in. */
function mainDtype(m: OpenedModel): DType {
  const by = new Map<DType, number>();
  for (const t of m.model.store.source.tensors.values()) by.set(t.dtype, (by.get(t.dtype) ?? 0) + t.byteLength);
  return [...by.entries()].sort((a, b) => b[1] - a[1])[0]?.[0] ?? 'F32';
}

function toleranceFor(a: DType, b: DType): LogitsTolerance & { basis: string } {
  if (a === b) return { ...DEFAULT_TOLERANCE.same, basis: `both sides ${a}: summation-order noise only` };
  const coarse = [a, b].find((d) => d.startsWith('F8')) ? 'F8' : [a, b].includes('BF16') ? 'BF16' : [a, b].includes('F16') ? 'F16' : 'F32';
  return { ...DEFAULT_TOLERANCE[coarse], basis: `${a} vs ${b}: the ${coarse} rounding bound` };
}

/**
 * The vocabulary both sides share: equal real vocabularies, or a side that knows only its padded
 * vocabulary (Megatron-LM args without `vocab_size`) taking the other's real one when it fits.
 */
function agreedVocab(a: DecoderDims, b: DecoderDims): number | undefined {
  if (a.vocabPaddedOnly === b.vocabPaddedOnly) return a.vocab === b.vocab ? a.vocab : undefined;
  const [padded, real] = a.vocabPaddedOnly ? [a, b] : [b, a];
  return real.vocab <= padded.vocab ? real.vocab : undefined;
}

function defaultTokens(vocab: number, n: number): number[] {
  // Spread over the vocabulary (a multiplicative walk), so many embedding rows are exercised.
  return Array.from({ length: n }, (_x, i) => (1 + i * 7919) % vocab);
}

export async function verifyLogits(out: string, opts: LogitsOptions): Promise<LogitsReport> {
  const maxMemory = opts.maxMemory ?? 1 << 30;
  // Two read slots of one block each; each worker's kernel memory holds its share of a block.
  // Capped at 512 MiB: a block must fit a worker's WebAssembly memory (4 GiB) with room to spare.
  const blockBytes = Math.min(512 << 20, Math.max(1 << 16, Math.floor(maxMemory / 8)));
  const src = await openForForward(opts.against, { blockBytes, hfModel: opts.hfModel });
  let dst: OpenedModel | undefined;
  try {
    dst = await openForForward(out, { blockBytes, hfModel: opts.hfModel });
    const a = src.model.dims;
    const b = dst.model.dims;
    const vocab = agreedVocab(a, b);
    if (vocab === undefined) throw badInput(`the vocabularies differ: ${opts.against} has ${a.vocab} tokens (${src.config}), ${out} has ${b.vocab} (${dst.config})`, out);
    let tok: TextTokenizer | undefined;
    let tokens: number[];
    if (opts.tokens && opts.prompt !== undefined) throw usage('give --tokens or --prompt, not both');
    if (opts.tokens && opts.positions !== undefined) throw usage('--positions sets the length of the default tokens or caps a prompt; with --tokens, the list is the positions');
    if (opts.tokens) tokens = [...opts.tokens];
    else if (opts.prompt !== undefined || opts.generate) {
      tok = (await loadTokenizer(src.model.store.source.root)) ?? (await loadTokenizer(dst.model.store.source.root));
      if (opts.prompt !== undefined && !tok) throw badInput(`--prompt needs a tokenizer.json beside ${opts.against} or ${out}; give --tokens instead`, opts.against);
      tokens = opts.prompt !== undefined ? tok!.encode(opts.prompt) : defaultTokens(vocab, opts.positions ?? DEFAULT_POSITIONS);
    } else tokens = defaultTokens(vocab, opts.positions ?? DEFAULT_POSITIONS);
    if (opts.positions !== undefined && tokens.length > opts.positions) tokens = tokens.slice(0, opts.positions);
    if (tokens.length === 0) throw usage('no tokens to run (an empty prompt?)');
    const bad = tokens.find((t) => !Number.isInteger(t) || t < 0 || t >= vocab);
    if (bad !== undefined) throw usage(`token id ${bad} is outside the vocabulary (0 … ${vocab - 1})`);
    const maxPos = Math.min(a.maxPositions, b.maxPositions);
    const total = tokens.length + (opts.generate ?? 0);
    if (total > maxPos) throw usage(`${tokens.length} prompt positions${opts.generate ? ` + ${opts.generate} generated` : ''} exceed the model's ${maxPos} positions`);

    const run = async (m: OpenedModel, side: 'source' | 'output', ids: number[], step: number, steps: number) =>
      forwardLogits(m.model, ids, { vocab, onLayer: (p: ForwardProgress) => opts.onProgress?.({ side, step, steps, ...p }) });
    const steps = 1 + (opts.generate ?? 0);
    const t0 = performance.now();
    const refLogits = await run(src, 'source', tokens, 1, steps);
    const t1 = performance.now();
    const outLogits = await run(dst, 'output', tokens, 1, steps);
    const t2 = performance.now();
    const comparison = compareLogits(refLogits, outLogits, tokens, vocab);

    let generated: LogitsReport['generated'];
    if (opts.generate) {
      const last = (l: Float32Array, T: number) => argmaxRow(l, T - 1, vocab);
      const gs = [last(refLogits, tokens.length)];
      const go = [last(outLogits, tokens.length)];
      for (let s = 1; s < opts.generate; s++) {
        gs.push(last(await run(src, 'source', [...tokens, ...gs], s + 1, steps), tokens.length + gs.length));
        go.push(last(await run(dst, 'output', [...tokens, ...go], s + 1, steps), tokens.length + go.length));
      }
      generated = { source: gs, output: go, ...(tok ? { sourceText: tok.decode(gs), outputText: tok.decode(go) } : {}) };
    }

    const dtA = mainDtype(src);
    const dtB = mainDtype(dst);
    const base = toleranceFor(dtA, dtB);
    const tolerance = { ...base, ...opts.tolerance, basis: opts.tolerance?.maxAbs !== undefined || opts.tolerance?.minCosine !== undefined ? 'set by the user' : base.basis };
    const limit = tolerance.maxAbs * comparison.scale;
    const failures: string[] = [];
    if (!(comparison.maxAbs <= limit)) failures.push(`max |Δ| ${comparison.maxAbs.toPrecision(3)} exceeds ${limit.toPrecision(3)} (${tolerance.maxAbs} × the largest |logit|, ${comparison.scale.toPrecision(3)})`);
    if (!(comparison.minCosine >= tolerance.minCosine)) failures.push(`cosine ${comparison.minCosine.toFixed(6)} is below ${tolerance.minCosine}`);
    const side = (m: OpenedModel, path: string, dtype: DType, seconds: number): SideReport => ({ path, describe: m.model.describe, config: m.config, dtype, bytesRead: m.model.store.bytesRead, seconds });
    return {
      ok: failures.length === 0,
      tokens,
      ...(opts.prompt !== undefined ? { text: opts.prompt } : {}),
      source: side(src, opts.against, dtA, (t1 - t0) / 1000),
      output: side(dst, out, dtB, (t2 - t1) / 1000),
      comparison,
      tolerance,
      failures,
      ...(generated ? { generated } : {}),
    };
  } finally {
    await src.close();
    await dst?.close();
  }
}

function argmaxRow(l: Float32Array, t: number, vocab: number): number {
  let best = 0;
  const o = t * vocab;
  for (let i = 1; i < vocab; i++) if (l[o + i]! > l[o + best]!) best = i;
  return best;
}
