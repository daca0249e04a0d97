/**
 * The WebAssembly FMA-chain kernel (src/lora/fma-kernel.ts) against the scalar exact arithmetic of
 * fp32.ts (itself checked against a BigInt reference in lora.test.ts): random fp32 factors,
 * bf16-valued factors (many binary64 sums land on float32 midpoints), the double-rounding trap,
 * subnormals, widths that are not a multiple of the kernel group, several chain blocks; both the
 * fast path and the exact-only path. And the committed kernel bytes match the WAT generator.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { dotChain, fromF32, loraDot, roundThrough, toF32 } from '../../src/tensor/fp32.js';
import { mergedWeight } from '../../src/lora/merge.js';
import { workerTuning } from '../../src/tensor/pool.js';
import { castBytes } from '../../src/tensor/cast.js';
import type { Box } from '../../src/tensor/layout.js';
import type { SourceTensor, TargetTensor } from '../../src/lazy/types.js';
import { activeKernel, chainBlock, setFmaKernel, type ChainStats, type FmaKernelChoice } from '../../src/tensor/fma-kernel.js';
import { produceBox } from '../../src/lazy/expr.js';

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

const bf16 = (v: number): number => {
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer);
  u[0] = (u[0]! + 0x7fff + ((u[0]! >>> 16) & 1)) & 0xffff0000;
  return f[0]!;
};

/** The scalar reference: chains of kc from 0, block sums added in fp32, × scale rounded once. */
function reference(x: Float64Array, x0: number, y: Float64Array, yCols: number, y0: number, n: number, w: number, r: number, kc: number, scale: number): Float32Array {
  const out = new Float32Array(n * w);
  const xr = new Float32Array(r);
  const yc = new Float32Array(r);
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < r; k++) xr[k] = x[(x0 + i) * r + k]!;
    for (let j = 0; j < w; j++) {
      for (let k = 0; k < r; k++) yc[k] = y[k * yCols + y0 + j]!;
      let acc = dotChain(xr, 0, yc, 0, Math.min(kc, r));
      for (let k = kc; k < r; k += kc) acc = Math.fround(acc + dotChain(xr, k, yc, k, Math.min(kc, r - k)));
      out[i * w + j] = Math.fround(acc * Math.fround(scale));
    }
  }
  return out;
}

interface Case {
  name: string;
  gen: (rng: () => number) => number;
  r: number;
  kc: number;
  scale: number;
}

function runCase(c: Case, seed: number): ChainStats {
  const rng = lcg(seed);
  const xRows = 11;
  const yCols = 45;
  const x = Float64Array.from({ length: xRows * c.r }, () => c.gen(rng));
  const y = Float64Array.from({ length: c.r * yCols }, () => c.gen(rng));
  const [x0, n, y0, w] = [2, 7, 3, 37];
  const want = reference(x, x0, y, yCols, y0, n, w, c.r, c.kc, c.scale);
  const stats: ChainStats = { exactGroups: 0 };
  for (const [kernel, exactOnly] of [['exact', false], ['exact', true], ['auto', false]] as const) {
    setFmaKernel(kernel);
    const got = new Float32Array(n * w);
    chainBlock({ x, x0, y, yCols, y0, n, w, r: c.r, kc: c.kc, scale: Math.fround(c.scale) }, got, kernel === 'exact' && !exactOnly ? stats : undefined, exactOnly);
    setFmaKernel('auto');
    for (let k = 0; k < want.length; k++) {
      if (!Object.is(got[k], want[k])) {
        assert.fail(`${c.name} r=${c.r} kc=${c.kc} (${exactOnly ? 'exact path only' : kernel === 'auto' ? `${activeKernel()} kernel` : 'f64 kernel'}): element ${k} is ${got[k]}, want ${want[k]}`);
      }
    }
  }
  return stats;
}

const wide = (rng: () => number): number => Math.fround((rng() < 0.5 ? -1 : 1) * (1 + rng()) * 2 ** (Math.floor(rng() * 40) - 20));
const normal = (rng: () => number): number => Math.fround((rng() - 0.5) * 0.04);

test('kernel = scalar exact fp32 chains: random fp32, bf16-valued, subnormal factors; 1 to 3 chain blocks', (t) => {
  t.diagnostic(`kernel on this machine: ${activeKernel()}`);
  let bf16Exact = 0;
  let seed = 1;
  for (const r of [1, 3, 16, 64, 200, 500]) {
    for (const kc of [r, 192, 384].filter((v, i, a) => a.indexOf(v) === i)) {
      runCase({ name: 'wide fp32', gen: wide, r, kc, scale: 2 }, seed++);
      runCase({ name: 'lora-like fp32', gen: normal, r, kc, scale: 0.125 }, seed++);
      bf16Exact += runCase({ name: 'bf16-valued', gen: (g) => bf16(normal(g)), r, kc, scale: 1 / 3 }, seed++).exactGroups;
      runCase({ name: 'subnormal', gen: (g) => Math.fround((g() - 0.5) * 2 ** -66), r, kc, scale: 1 }, seed++);
    }
  }
  assert.ok(bf16Exact > 0, 'bf16-valued factors exercise the exact path');
});

test('kernel rounds the binary64 double-rounding trap correctly (exact path taken)', () => {
  // Element (0, 0): fma(a, b, fma(c, 1, 0)) where the binary64 sum lands on a float32 midpoint and
  // the exact value is below it: the answer is 1 + 2^-23, the naive double rounding gives 1 + 2^-22.
  const a = Math.fround(1 + 2 ** -23);
  const b = Math.fround(2 ** -24 * (1 - 2 ** -23));
  const c = Math.fround(1 + 2 ** -23);
  const x = new Float64Array([c, a]);
  const y = new Float64Array(2 * 8).fill(0);
  y[0] = 1;
  y[8] = b;
  const out = new Float32Array(8);
  const stats: ChainStats = { exactGroups: 0 };
  setFmaKernel('exact');
  chainBlock({ x, x0: 0, y, yCols: 8, y0: 0, n: 1, w: 8, r: 2, kc: 192, scale: 1 }, out, stats);
  setFmaKernel('auto');
  assert.equal(out[0], 1 + 2 ** -23);
  assert.equal(stats.exactGroups, 1);
  const auto = new Float32Array(8);
  chainBlock({ x, x0: 0, y, yCols: 8, y0: 0, n: 1, w: 8, r: 2, kc: 192, scale: 1 }, auto);
  assert.equal(auto[0], 1 + 2 ** -23, `${activeKernel()} kernel`);
  const exact = new Float32Array(8);
  chainBlock({ x, x0: 0, y, yCols: 8, y0: 0, n: 1, w: 8, r: 2, kc: 192, scale: 1 }, exact, undefined, true);
  assert.equal(exact[0], 1 + 2 ** -23);
});

test('kernel: a zero adapter (B = 0) takes no exact path and gives zeros', () => {
  const r = 16;
  const x = new Float64Array(4 * r);
  const y = Float64Array.from({ length: r * 64 }, (_, i) => Math.fround(Math.sin(i)));
  const out = new Float32Array(4 * 64).fill(7);
  const stats: ChainStats = { exactGroups: 0 };
  setFmaKernel('exact');
  chainBlock({ x, x0: 0, y, yCols: 64, y0: 0, n: 4, w: 64, r, kc: 192, scale: 2 }, out, stats);
  setFmaKernel('auto');
  assert.equal(stats.exactGroups, 0);
  assert.ok(out.every((v) => v === 0));
});

test('the committed kernel bytes are what scripts/build-wasm.mjs generates', () => {
  execFileSync(process.execPath, [join(repoRoot, 'scripts', 'build-wasm.mjs'), '--check'], { stdio: 'pipe' });
});

// ---------------------------------------------------------------------------------------------
// mergedWeight on the worker pool = inline = the scalar definition.

function tensorOf(name: string, dtype: 'F32' | 'BF16' | 'F16', shape: number[], values: Float32Array): SourceTensor {
  const all = castBytes(new Uint8Array(values.buffer), 'F32', dtype);
  const [rows, cols] = [shape[0]!, shape.length > 1 ? shape[1]! : 1];
  const item = dtype === 'F32' ? 4 : 2;
  return {
    name,
    dtype,
    shape,
    byteLength: all.length,
    where: name,
    read: async (box: Box, out: Uint8Array) => {
      const [r0, n] = [box.start[0]!, box.size[0]!];
      const [c0, w] = shape.length > 1 ? [box.start[1]!, box.size[1]!] : [0, 1];
      for (let i = 0; i < n; i++) out.set(all.subarray(((r0 + i) * cols + c0) * item, ((r0 + i) * cols + c0 + w) * item), i * w * item);
      void rows;
    },
  };
}

test('mergedWeight: worker pool, inline and the scalar definition give the same bytes (bf16/fp32/fp16 bases, fp32 and bf16-valued factors, both layouts, safe merge, partial boxes, NaN/Inf)', async () => {
  const rng = lcg(99);
  const [out, inn, r] = [768, 200, 16]; // the first boxes hold ≥ 64Ki elements: they go to the pool
  const rand = (n: number, s: number) => Float32Array.from({ length: n }, () => Math.fround((rng() - 0.5) * s));
  const baseVals = rand(out * inn, 0.2);
  baseVals[5] = NaN;
  baseVals[77] = Infinity;
  baseVals[out * inn - 1] = -Infinity;
  const saved = workerTuning.castThreads;
  try {
   for (const [dtype, factorKind] of [['BF16', 'fp32'], ['BF16', 'bf16'], ['F32', 'fp32'], ['F16', 'fp32']] as const) {
    const a = rand(r * inn, 0.1);
    const b = rand(out * r, 0.1);
    if (factorKind === 'bf16') for (const v of [a, b]) for (let k = 0; k < v.length; k++) v[k] = bf16(v[k]!);
    for (const layout of ['out-in', 'in-out'] as const) {
      const shape = layout === 'out-in' ? [out, inn] : [inn, out];
      const baseT = tensorOf('w', dtype, shape, baseVals);
      const base: TargetTensor = { kind: 'produced', name: 'w', dtype, shape, byteLength: baseT.byteLength, describe: 'w', produce: (bx, o) => baseT.read(bx, o) };
      for (const roundDelta of [false, true]) {
        const spec = { name: 'w', base, module: { name: 'm', kind: 'linear' as const, a: tensorOf('a', 'F32', [r, inn], a), b: tensorOf('b', 'F32', [out, r], b) }, layout, scaling: 2, rounding: { roundDelta }, describe: 'w' };
        // The definition, element by element (fp32.ts's loraDot; peft's rounding).
        const [R, C] = shape as [number, number];
        // A [r, in], B [out, r]; W is [out, in] (out-in) or [in, out] (in-out, fan_in_fan_out).
        const [am, bm, na] = [a, b, inn];
        const at = new Float32Array(na * r);
        for (let k = 0; k < r; k++) for (let j = 0; j < na; j++) at[j * r + k] = am[k * na + j]!;
        const baseBytes = new Uint8Array(baseT.byteLength);
        await baseT.read({ start: [0, 0], size: [R, C] }, baseBytes);
        const w = toF32(baseBytes, dtype);
        const d = new Float32Array(R * C);
        for (let i = 0; i < R; i++) for (let j = 0; j < C; j++) d[i * C + j] = Math.fround((layout === 'out-in' ? loraDot(bm, i * r, at, j * r, r) : loraDot(bm, j * r, at, i * r, r)) * 2);
        if (roundDelta) roundThrough(d, dtype);
        for (let k = 0; k < w.length; k++) w[k] = Math.fround(w[k]! + d[k]!);
        const item = dtype === 'F32' ? 4 : 2;
        const want = new Uint8Array(R * C * item);
        fromF32(w, dtype, want);
        for (const [threads, kernel] of [[2, 'auto'], [0, 'auto'], [2, 'exact'], [0, 'exact']] as Array<[number, FmaKernelChoice]>) {
          workerTuning.castThreads = threads;
          setFmaKernel(kernel);
          const t = mergedWeight(spec);
          // Three row bands (the last partial) and, for one band, two column halves.
          const boxes: Box[] = [
            { start: [0, 0], size: [R >> 1, C] },
            { start: [R >> 1, 0], size: [R - (R >> 1) - 3, C >> 1] },
            { start: [R >> 1, C >> 1], size: [R - (R >> 1) - 3, C - (C >> 1)] },
            { start: [R - 3, 0], size: [3, C] },
          ];
          const got = new Uint8Array(R * C * item);
          for (const bx of boxes) {
            const len = bx.size[0]! * bx.size[1]! * item;
            // The executor's arena is shared memory; a plain buffer takes the copying path.
            const dst = threads ? new Uint8Array(new SharedArrayBuffer(len + 64), 64, len) : new Uint8Array(len);
            await produceBox(t, bx, dst);
            for (let i = 0; i < bx.size[0]!; i++) got.set(dst.subarray(i * bx.size[1]! * item, (i + 1) * bx.size[1]! * item), ((bx.start[0]! + i) * C + bx.start[1]!) * item);
          }
          setFmaKernel('auto');
          assert.ok(Buffer.from(got).equals(Buffer.from(want)), `${dtype} base, ${factorKind} factors, ${layout}, roundDelta=${roundDelta}, threads=${threads}, kernel ${kernel}`);
        }
      }
    }
   }
  } finally {
    workerTuning.castThreads = saved;
  }
});

test('the fused kernel stays exact once the engine has optimised it (many calls, both tiers)', () => {
  const rng = lcg(5);
  const [n, w, r] = [64, 512, 24];
  for (let rep = 0; rep < 12; rep++) {
    const x = Float64Array.from({ length: n * r }, () => wide(rng));
    const y = Float64Array.from({ length: r * w }, () => wide(rng));
    const block = { x, x0: 0, y, yCols: w, y0: 0, n, w, r, kc: 16, scale: 0.5 };
    const a = new Float32Array(n * w);
    const b = new Float32Array(n * w);
    chainBlock(block, a);
    setFmaKernel('exact');
    chainBlock(block, b);
    setFmaKernel('auto');
    assert.ok(Buffer.from(a.buffer).equals(Buffer.from(b.buffer)), `call ${rep}: the ${activeKernel()} kernel differs from the f64 kernel`);
  }
});

test('an overflowed chain stays ±Inf on every path (the exact step must not turn Inf − Inf into NaN)', () => {
  // Lane 0: -2^100·2^100 overflows to -Inf, then a tiny product; lane 1: the midpoint trap, so the
  // group takes the exact path on the f64 kernel.
  const x = new Float64Array([-(2 ** 100), Math.fround(1 + 2 ** -23)]);
  const y = new Float64Array(2 * 8).fill(0);
  y[0] = 2 ** 100;
  y[8] = 2 ** -20;
  const block = { x, x0: 0, y, yCols: 8, y0: 0, n: 1, w: 8, r: 2, kc: 192, scale: 1 };
  for (const [kernel, exactOnly] of [['exact', false], ['exact', true], ['auto', false]] as const) {
    setFmaKernel(kernel);
    const out = new Float32Array(8);
    chainBlock(block, out, undefined, exactOnly);
    setFmaKernel('auto');
    assert.equal(out[0], -Infinity, `${kernel}${exactOnly ? ' exact-only' : ''}`);
  }
  const pos = { ...block, x: new Float64Array([2 ** 100, 2 ** -120]) };
  const out = new Float32Array(8);
  chainBlock(pos, out, undefined, true);
  assert.equal(out[0], Infinity);
});
