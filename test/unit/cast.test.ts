// castBytes without Python: every cast table checked against torch's SHA-256 digests in
// test/fixtures/cast-golden.json (made by test/oracle/cast_tables.py golden --write), readable
// spot checks, the unaligned path, and a differential test against a plain scalar reference.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { castBytes, canCast, CASTABLE } from '../../src/tensor/cast.js';
import { itemSize, type DType } from '../../src/tensor/dtype.js';
import { repoRoot } from '../helpers/oracle.js';

interface Golden {
  generatedBy: string;
  torch: string;
  inputs: Record<string, { count: number; sha256: string }>;
  outputs: Record<string, string>;
  f32Inputs: {
    order: string[];
    counts: Record<string, number>;
    edges: string[];
    sweeps: { targets: string[] };
    random: { seed: number; count: number; step: number };
    focused: { seed: number; count: number; step: number };
  };
}

const golden = JSON.parse(readFileSync(join(repoRoot, 'test', 'fixtures', 'cast-golden.json'), 'utf8')) as Golden;

// ---------------------------------------------------------------------------------------------
// Inputs, regenerated exactly as cast_tables.py makes them.

function hash32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x7feb352d);
  x ^= x >>> 15;
  x = Math.imul(x, 0x846ca68b);
  x ^= x >>> 16;
  return x >>> 0;
}

function counter(seed: number, step: number, i: number): number {
  return (seed + Math.imul(i, step)) >>> 0;
}

interface Format {
  ebits: number;
  mbits: number;
  /** Largest finite positive bit pattern. */
  maxBits: number;
}
const FORMATS: Record<'F16' | 'BF16' | 'F8_E4M3' | 'F8_E5M2', Format> = {
  F16: { ebits: 5, mbits: 10, maxBits: 0x7bff },
  BF16: { ebits: 8, mbits: 7, maxBits: 0x7f7f },
  F8_E4M3: { ebits: 4, mbits: 3, maxBits: 0x7e },
  F8_E5M2: { ebits: 5, mbits: 2, maxBits: 0x7b },
};
type Narrow = keyof typeof FORMATS;

function bias(f: Format): number {
  return (1 << (f.ebits - 1)) - 1;
}

/** Value of a non-negative, finite-encoding bit pattern k of format f (k may be maxBits+1). */
function decodeMag(f: Format, k: number): number {
  const e = k >>> f.mbits;
  const m = k & ((1 << f.mbits) - 1);
  if (e === 0) return m * 2 ** (1 - bias(f) - f.mbits);
  return (1 + m / 2 ** f.mbits) * 2 ** (e - bias(f));
}

const f32box = new Float32Array(1);
const u32box = new Uint32Array(f32box.buffer);
function f32bits(x: number): number {
  f32box[0] = x;
  assert.equal(f32box[0], x, `${x} is not an exact f32`);
  return u32box[0]!;
}

function f32Inputs(): Uint32Array {
  const g = golden.f32Inputs;
  const parts: Record<string, number[] | Uint32Array> = {};
  parts.edges = g.edges.map((h) => parseInt(h, 16));
  const sweeps: number[] = [];
  for (const t of g.sweeps.targets) {
    const f = FORMATS[t as Narrow];
    for (let k = 0; k <= f.maxBits; k++) {
      const v = decodeMag(f, k);
      const m = f32bits((v + decodeMag(f, k + 1)) / 2);
      const four = [f32bits(v), m - 1, m, m + 1];
      sweeps.push(...four, ...four.map((x) => (x | 0x80000000) >>> 0));
    }
  }
  parts.sweeps = sweeps;
  const r = new Uint32Array(g.random.count);
  for (let i = 0; i < r.length; i++) r[i] = hash32(counter(g.random.seed, g.random.step, i));
  parts.random = r;
  const fo = new Uint32Array(g.focused.count);
  for (let i = 0; i < fo.length; i++) {
    const h = hash32(counter(g.focused.seed, g.focused.step, i));
    fo[i] = ((h & 0x807fffff) | ((100 + (((h >>> 23) & 0xff) % 51)) << 23)) >>> 0;
  }
  parts.focused = fo;
  const total = g.order.reduce((s, p) => s + parts[p]!.length, 0);
  const out = new Uint32Array(total);
  let o = 0;
  for (const p of g.order) {
    assert.equal(parts[p]!.length, g.counts[p], `f32 input part ${p}`);
    out.set(parts[p]!, o);
    o += parts[p]!.length;
  }
  return out;
}

function allPatterns(bits: 8 | 16): Uint8Array {
  const n = 1 << bits;
  const a = bits === 8 ? new Uint8Array(n) : new Uint16Array(n);
  for (let i = 0; i < n; i++) a[i] = i;
  return new Uint8Array(a.buffer);
}

let inputCache: Map<DType, Uint8Array> | undefined;
function inputs(): Map<DType, Uint8Array> {
  inputCache ??= new Map<DType, Uint8Array>([
    ['F32', new Uint8Array(f32Inputs().buffer)],
    ['F16', allPatterns(16)],
    ['BF16', allPatterns(16)],
    ['F8_E4M3', allPatterns(8)],
    ['F8_E5M2', allPatterns(8)],
  ]);
  return inputCache;
}

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

// ---------------------------------------------------------------------------------------------
// A plain scalar reference: decode to a JS number, round with real arithmetic, encode. NaN bit
// patterns follow torch's rules (measured; see the header of src/tensor/cast.ts), stated here
// directly rather than through bit tricks.

const dv = new DataView(new ArrayBuffer(4));

function readBits(b: Uint8Array, i: number, size: number): number {
  let v = 0;
  for (let k = size - 1; k >= 0; k--) v = v * 256 + b[i * size + k]!;
  return v;
}

/** The f32 bit pattern torch has in hand after widening a NaN of `from` (bits x). */
function nanAsF32(from: DType, x: number): number {
  switch (from) {
    case 'F32':
      return x;
    case 'BF16':
      return x * 65536;
    case 'F16': // F16C vcvtph2ps: payload kept, quiet bit set
      return (x & 0x8000) * 65536 + 0x7f800000 + ((x & 0x3ff) | 0x200) * 8192;
    case 'F8_E5M2':
      return nanAsF32('F16', x * 256);
    case 'F8_E4M3':
      return ((x & 0x80) * 16777216 + 0x7ff00000) >>> 0;
  }
  throw new Error(from);
}

/** Decodes bits x of `from`: a number, or {nan} for NaN. */
function decode(from: DType, x: number): number | { nan: true } {
  if (from === 'F32') {
    dv.setUint32(0, x);
    const v = dv.getFloat32(0);
    return Number.isNaN(v) ? { nan: true } : v;
  }
  const f = FORMATS[from as Narrow];
  const signBit = 1 << (f.ebits + f.mbits);
  const mag = x & (signBit - 1);
  const sign = x & signBit ? -1 : 1;
  const expAll = ((1 << f.ebits) - 1) << f.mbits;
  if (from === 'F8_E4M3') {
    if (mag === 0x7f) return { nan: true };
  } else if ((mag & expAll) === expAll) {
    return mag === expAll ? sign * Infinity : { nan: true };
  }
  return sign * decodeMag(f, mag);
}

/** Encodes a number (not NaN) in narrow format `to` with round-to-nearest-even. */
function encode(to: Narrow, v: number): number {
  const f = FORMATS[to];
  const signBit = 1 << (f.ebits + f.mbits);
  const s = v < 0 || Object.is(v, -0) ? signBit : 0;
  let a = Math.abs(v);
  const maxVal = decodeMag(f, f.maxBits);
  const inf = to === 'F8_E4M3' ? f.maxBits : ((1 << f.ebits) - 1) << f.mbits; // e4m3fn saturates
  if (a === Infinity) return s | inf;
  if (a === 0) return s;
  const emin = 1 - bias(f);
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  if (2 ** (e + 1) <= a) e++;
  if (e < emin) e = emin;
  const quantum = 2 ** (e - f.mbits);
  const n = a / quantum; // exact: a has at most 24 significant bits
  let r = Math.floor(n);
  const frac = n - r;
  if (frac > 0.5 || (frac === 0.5 && r % 2 === 1)) r++;
  a = r * quantum;
  if (a > maxVal) return s | inf;
  if (a < 2 ** emin) return s | (a / 2 ** (emin - f.mbits));
  let E = Math.floor(Math.log2(a));
  if (2 ** E > a) E--;
  return s | ((E + bias(f)) << f.mbits) | ((a / 2 ** E - 1) * 2 ** f.mbits);
}

function referenceCast(from: DType, to: DType, x: number): number {
  if (from === to) return x;
  const v = decode(from, x);
  if (typeof v === 'number') {
    if (to === 'F32') {
      dv.setFloat32(0, v);
      return dv.getUint32(0);
    }
    return encode(to as Narrow, v);
  }
  const n = nanAsF32(from, x);
  switch (to) {
    case 'F32':
      return n;
    case 'BF16': // torch's AVX f32 kernel writes 0xFFFF; the other paths c10's 0x7FC0
      return from === 'F32' ? 0xffff : 0x7fc0;
    case 'F16': // F16C vcvtps2ph: sign, quiet bit, top 10 payload bits
      return (Math.floor(n / 65536) & 0x8000) | 0x7e00 | ((n >>> 13) & 0x3ff);
    default:
      return (n >= 0x80000000 ? 0x80 : 0) | 0x7f;
  }
}

// ---------------------------------------------------------------------------------------------

test('CASTABLE and canCast', () => {
  assert.deepEqual([...CASTABLE], ['F32', 'F16', 'BF16', 'F8_E4M3', 'F8_E5M2']);
  for (const a of CASTABLE) for (const b of CASTABLE) assert.ok(canCast(a, b));
  assert.equal(canCast('F32', 'I32'), false);
  assert.equal(canCast('F64', 'F32'), false);
  assert.throws(() => castBytes(new Uint8Array(8), 'F64', 'F32'), (e: unknown) => e instanceof RangeError && /F64/.test(e.message) && /F32/.test(e.message));
  assert.throws(() => castBytes(new Uint8Array(4), 'F32', 'I8'), (e: unknown) => e instanceof RangeError && /F32/.test(e.message) && /I8/.test(e.message));
  assert.throws(() => castBytes(new Uint8Array(3), 'F32', 'F16'), RangeError);
  assert.throws(() => castBytes(new Uint8Array(4), 'F32', 'F16', new Uint8Array(4)), RangeError);
  assert.equal(castBytes(new Uint8Array(0), 'F32', 'BF16').byteLength, 0);
});

test('regenerated inputs match the golden fixture', () => {
  for (const [d, b] of inputs()) {
    const g = golden.inputs[d];
    assert.ok(g, `golden has no inputs for ${d}`);
    assert.equal(b.byteLength / itemSize(d)!, g.count, `${d} input count`);
    assert.equal(sha256(b), g.sha256, `${d} inputs differ from what cast_tables.py generated`);
  }
});

test('every cast table matches the golden torch digests', () => {
  const bad: string[] = [];
  for (const from of CASTABLE) {
    const input = inputs().get(from)!;
    for (const to of CASTABLE) {
      const key = `${from}->${to}`;
      const want = golden.outputs[key];
      assert.ok(want, `golden has no digest for ${key}`);
      if (sha256(castBytes(input, from, to)) !== want) bad.push(key);
    }
  }
  assert.deepEqual(bad, [], `outputs differ from ${golden.generatedBy} (the interop test shows which elements)`);
});

test('differential: fast path equals the plain scalar reference, element by element', () => {
  const failures: string[] = [];
  for (const from of CASTABLE) {
    const input = inputs().get(from)!;
    const si = itemSize(from)!;
    const n = input.byteLength / si;
    for (const to of CASTABLE) {
      const so = itemSize(to)!;
      const got = castBytes(input, from, to);
      let count = 0;
      const first: string[] = [];
      for (let i = 0; i < n; i++) {
        const x = readBits(input, i, si);
        const want = referenceCast(from, to, x);
        const have = readBits(got, i, so);
        if (want !== have) {
          count++;
          if (first.length < 5) first.push(`0x${x.toString(16)}: ref 0x${want.toString(16)}, fast 0x${have.toString(16)}`);
        }
      }
      if (count) failures.push(`${from}->${to}: ${count} differ; ${first.join('; ')}`);
    }
  }
  assert.deepEqual(failures, []);
});

function one(from: DType, to: DType, bits: number): number {
  const si = itemSize(from)!;
  const b = new Uint8Array(si);
  for (let k = 0; k < si; k++) b[k] = Math.floor(bits / 256 ** k) & 0xff;
  return readBits(castBytes(b, from, to), 0, itemSize(to)!);
}

test('spot checks', () => {
  // bf16: 1.00390625 = 1 + 2^-8 is halfway between 1 and 1+2^-7: ties to even (1.0)
  assert.equal(one('F32', 'BF16', 0x3f808000), 0x3f80);
  assert.equal(one('F32', 'BF16', 0x3f818000), 0x3f82); // 1 + 3*2^-8 ties up to even
  assert.equal(one('F32', 'BF16', 0x3f808001), 0x3f81);
  assert.equal(one('F32', 'BF16', 0x7f7fffff), 0x7f80); // f32 max rounds to +Inf
  assert.equal(one('F32', 'BF16', 0x7fc00000), 0xffff); // NaN: torch's AVX kernel writes 0xFFFF
  assert.equal(one('F16', 'BF16', 0xfe00), 0x7fc0); // ...but F16 NaN goes through c10: 0x7FC0
  // f16: 65504 is max; 65520 ties to even → Inf
  assert.equal(one('F32', 'F16', 0x477fe000), 0x7bff);
  assert.equal(one('F32', 'F16', 0x477fefff), 0x7bff);
  assert.equal(one('F32', 'F16', 0x477ff000), 0x7c00);
  assert.equal(one('F32', 'F16', 0xc77ff000), 0xfc00);
  assert.equal(one('F32', 'F16', 0x33000000), 0x0000); // 2^-25 ties to 0
  assert.equal(one('F32', 'F16', 0x33000001), 0x0001);
  assert.equal(one('F32', 'F16', 0xffa00000), 0xff00); // NaN keeps sign and top payload, quieted
  assert.equal(one('F16', 'F32', 0x7c01), 0x7fc02000); // signalling NaN is quieted
  assert.equal(one('BF16', 'F32', 0x7f81), 0x7f810000); // bf16 widening is a plain shift
  // float8_e4m3fn: no Inf; overflow and ±Inf saturate to ±448, NaN stays NaN
  assert.equal(one('F32', 'F8_E4M3', 0x43e00000), 0x7e); // 448
  assert.equal(one('F32', 'F8_E4M3', 0x43e7ffff), 0x7e);
  assert.equal(one('F32', 'F8_E4M3', 0x43e80000), 0x7e); // 464: tie would go to 480 → saturate
  assert.equal(one('F32', 'F8_E4M3', 0x47000000), 0x7e); // 32768
  assert.equal(one('F32', 'F8_E4M3', 0x7f800000), 0x7e); // +Inf → 448
  assert.equal(one('F32', 'F8_E4M3', 0xff800000), 0xfe); // -Inf → -448
  assert.equal(one('F32', 'F8_E4M3', 0xffc00000), 0xff); // -NaN
  assert.equal(one('F8_E4M3', 'F32', 0x7f), 0x7ff00000);
  assert.equal(one('F8_E4M3', 'F32', 0x01), 0x3b000000); // 2^-9
  assert.equal(one('F32', 'F8_E4M3', 0x3a800000), 0x00); // 2^-10 ties to 0
  // float8_e5m2: overflow → Inf
  assert.equal(one('F32', 'F8_E5M2', 0x47600000), 0x7b); // 57344 max
  assert.equal(one('F32', 'F8_E5M2', 0x476fffff), 0x7b);
  assert.equal(one('F32', 'F8_E5M2', 0x47700000), 0x7c); // 61440 ties → Inf
  assert.equal(one('F32', 'F8_E5M2', 0xff800000), 0xfc);
  assert.equal(one('F8_E5M2', 'F32', 0x7d), 0x7fe00000); // via f16: quieted
  // no double rounding: 1.0625+2^-23 is just above the e4m3 tie between 1 and 1.125; going
  // through f16 or bf16 first would round it onto the tie and then down to 1
  assert.equal(one('F32', 'F8_E4M3', 0x3f880001), 0x39);
  assert.equal(one('F16', 'F8_E4M3', 0x3c41), 0x39);
  assert.equal(one('F16', 'F8_E4M3', 0x3c40), 0x38);
});

test('unaligned source and destination offsets give the same bytes', () => {
  const n = 40_000; // more than one internal chunk
  const f32 = inputs().get('F32')!.subarray(0, n * 4);
  const sources: Record<string, Uint8Array> = { F32: f32, F16: allPatterns(16), BF16: allPatterns(16), F8_E4M3: allPatterns(8), F8_E5M2: allPatterns(8) };
  for (const from of CASTABLE) {
    const src = sources[from]!;
    for (const to of CASTABLE) {
      const want = castBytes(src, from, to);
      for (const [sOff, oOff] of [[1, 0], [0, 1], [3, 2], [2, 3]] as const) {
        const sbuf = new Uint8Array(src.byteLength + 8);
        const sview = sbuf.subarray(sOff, sOff + src.byteLength);
        sview.set(src);
        const obuf = new Uint8Array(want.byteLength + 8).fill(0xa5);
        const oview = obuf.subarray(oOff, oOff + want.byteLength);
        const res = castBytes(sview, from, to, oview);
        assert.equal(res, oview);
        assert.ok(Buffer.from(oview).equals(Buffer.from(want)), `${from}->${to} offsets ${sOff}/${oOff}`);
        assert.ok(obuf.subarray(0, oOff).every((b) => b === 0xa5) && obuf.subarray(oOff + want.byteLength).every((b) => b === 0xa5), 'wrote outside out');
      }
    }
  }
  // Node Buffer views (pool slices are often unaligned)
  const buf = Buffer.concat([Buffer.from([7]), Buffer.from(f32.buffer, f32.byteOffset, 4096)]);
  const view = new Uint8Array(buf.buffer, buf.byteOffset + 1, 4096);
  assert.ok(Buffer.from(castBytes(view, 'F32', 'BF16')).equals(Buffer.from(castBytes(f32.subarray(0, 4096), 'F32', 'BF16'))));
});

test('overlapping src and out', () => {
  const base = inputs().get('F32')!.slice(0, 4000 * 4);
  const want = castBytes(base, 'F32', 'BF16');
  const shared = base.slice();
  const out = castBytes(shared, 'F32', 'BF16', shared.subarray(0, 8000));
  assert.ok(Buffer.from(out).equals(Buffer.from(want)));
  const wide = new Uint8Array(4000 * 4);
  wide.set(want, 4000 * 2);
  const w = castBytes(wide.subarray(8000), 'BF16', 'F32', wide);
  assert.ok(Buffer.from(w).equals(Buffer.from(castBytes(want, 'BF16', 'F32'))));
});
