/**
 * Logit comparison of two forward passes, position by position: max |Δ|, cosine similarity,
 * whether the top-1 token agrees, and KL(reference ‖ output) of the softmaxed distributions.
 */

export interface PositionComparison {
  readonly position: number;
  readonly token: number;
  readonly maxAbs: number;
  readonly cosine: number;
  readonly top1Reference: number;
  readonly top1Output: number;
  readonly kl: number;
}

export interface LogitsComparison {
  readonly positions: PositionComparison[];
  readonly maxAbs: number;
  readonly minCosine: number;
  /** Share of positions whose top-1 token agrees (0 … 1). */
  readonly top1Agreement: number;
  readonly maxKl: number;
  /** Largest |logit| of the reference (the scale a tolerance is relative to). */
  readonly scale: number;
}

function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i]! > x[best]!) best = i;
  return best;
}

function logSoftmax(x: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of x) max = Math.max(max, v);
  let sum = 0;
  for (const v of x) sum += Math.exp(v - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(x, (v) => v - lse);
}

export function compareLogits(ref: Float32Array, out: Float32Array, tokens: readonly number[], vocab: number): LogitsComparison {
  const positions: PositionComparison[] = [];
  let scale = 0;
  for (let t = 0; t < tokens.length; t++) {
    const a = ref.subarray(t * vocab, (t + 1) * vocab);
    const b = out.subarray(t * vocab, (t + 1) * vocab);
    let maxAbs = 0;
    let dot = 0;
    let na = 0;
    let nb = 0;
    for (let i = 0; i < vocab; i++) {
      const d = Math.abs(a[i]! - b[i]!);
      // A NaN anywhere is a failure, not a small difference.
      maxAbs = Number.isNaN(d) ? NaN : Math.max(maxAbs, d);
      dot += a[i]! * b[i]!;
      na += a[i]! * a[i]!;
      nb += b[i]! * b[i]!;
      scale = Math.max(scale, Math.abs(a[i]!));
    }
    const la = logSoftmax(a);
    const lb = logSoftmax(b);
    let kl = 0;
    for (let i = 0; i < vocab; i++) kl += Math.exp(la[i]!) * (la[i]! - lb[i]!);
    const cosine = na === 0 && nb === 0 ? 1 : dot / Math.sqrt(na * nb);
    positions.push({ position: t, token: tokens[t]!, maxAbs, cosine, top1Reference: argmax(a), top1Output: argmax(b), kl: Math.max(0, kl) });
  }
  const agree = positions.filter((p) => p.top1Reference === p.top1Output).length;
  return {
    positions,
    maxAbs: positions.reduce((m, p) => (Number.isNaN(p.maxAbs) || Number.isNaN(m) ? NaN : Math.max(m, p.maxAbs)), 0),
    minCosine: positions.reduce((m, p) => Math.min(m, p.cosine), 1),
    top1Agreement: positions.length ? agree / positions.length : 1,
    maxKl: positions.reduce((m, p) => Math.max(m, p.kl), 0),
    scale,
  };
}
