// Generates src/tensor/fma-kernel.wasm.ts: the WebAssembly SIMD kernel behind the exact fp32 LoRA
// merge (see src/tensor/fma-kernel.ts for what it computes and why it is exact), and
// src/tensor/matmul-kernel.wasm.ts: the reference forward pass's x · Wᵀ kernel (matmul-kernel.ts).
//
// The WAT is written here as a template because the inner loop is four copies of the same lane
// group; `wabt` (a devDependency) assembles it, and the module's bytes are committed as base64 so
// that neither a build nor a user's install needs an assembler. `node scripts/build-wasm.mjs`
// regenerates the file; `--check` exits non-zero when the committed file is stale (a unit test runs
// that).
import { readFileSync, writeFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const target = join(root, 'src', 'tensor', 'fma-kernel.wasm.ts');

/** Lane groups per output group: 4 × f64x2 = 8 output elements, enough chains to hide latency. */
const V = 4;
const range = (n) => [...Array(n).keys()];

/**
 * One FMA step of lane group g in the fast path: s = p + acc rounded to binary64, acc = s rounded
 * to binary32; flags the lanes where that double rounding might differ from a single one.
 * `midpoint`: s is exactly a binary32 midpoint of the normal range (low 29 mantissa bits
 * 0x10000000) — complete when no exact sum can fall in the binary32 subnormal range off its grid,
 * which the caller guarantees (fma-kernel.ts `gridSafe`). Otherwise (`$safe`): s has its low 28
 * bits clear and is not a binary32 — every midpoint, subnormal ones included.
 */
const fastStep = (safe) => (g) => `
      (local.set $s (f64x2.add (f64x2.mul (local.get $xv) (v128.load offset=${16 * g} (local.get $yp))) (local.get $a${g})))
      (local.set $a${g} (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $s))))` + (safe ? `
      (local.set $fl (v128.or (local.get $fl) (v128.and
        (f64x2.ne (local.get $s) (local.get $a${g}))
        (i64x2.eq (v128.and (local.get $s) (local.get $low28)) (local.get $zero)))))` : `
      (local.set $fl (v128.or (local.get $fl)
        (i64x2.eq (v128.and (local.get $s) (local.get $low29)) (local.get $mid))))`);

/**
 * One FMA step in the exact path: s rounded to odd (TwoSum error; if inexact and s's last bit is
 * 0, step s one ulp towards the exact sum), then to binary32. Round-to-odd at 53 bits followed by
 * round-to-nearest at 24 bits equals one rounding of the exact sum (Boldo & Melquiond).
 */
const exactStep = (g) => `
      (local.set $p (f64x2.mul (local.get $xv) (v128.load offset=${16 * g} (local.get $yp))))
      (local.set $s (f64x2.add (local.get $p) (local.get $a${g})))
      (local.set $bb (f64x2.sub (local.get $s) (local.get $p)))
      (local.set $err (f64x2.add
        (f64x2.sub (local.get $p) (f64x2.sub (local.get $s) (local.get $bb)))
        (f64x2.sub (local.get $a${g}) (local.get $bb))))
      (local.set $s (i64x2.add (local.get $s) (v128.and
        (v128.or (i64x2.shr_s (v128.xor (local.get $err) (local.get $s)) (i32.const 63)) (local.get $one))
        (v128.and
          ;; inexact (a NaN error — Inf − Inf once the chain has overflowed — is not inexact:
          ;; s is ±Inf and stays so)
          (v128.and (f64x2.ne (local.get $err) (local.get $zero)) (f64x2.eq (local.get $err) (local.get $err)))
          (i64x2.eq (v128.and (local.get $s) (local.get $one)) (local.get $zero))))))
      (local.set $a${g} (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (local.get $s))))`;

/** The k loop over one block [kb, kend) for the group at (xrow, column j), with `step` per lane group. */
const kLoop = (step) => `
    (local.set $xp (i32.add (local.get $xrow) (i32.shl (local.get $kb) (i32.const 3))))
    (local.set $yp (i32.add (local.get $y) (i32.shl (i32.add (i32.mul (local.get $kb) (local.get $w8)) (local.get $j)) (i32.const 3))))
    (local.set $k (local.get $kb))
    (block $k_done (loop $k_loop
      (br_if $k_done (i32.ge_u (local.get $k) (local.get $kend)))
      (local.set $xv (f64x2.splat (f64.load (local.get $xp))))${range(V).map(step).join('')}
      (local.set $xp (i32.add (local.get $xp) (i32.const 8)))
      (local.set $yp (i32.add (local.get $yp) (local.get $ystride)))
      (local.set $k (i32.add (local.get $k) (i32.const 1)))
      (br $k_loop)))`;

/** Every block of the group's chains into $t0.., block sums added in binary32. */
const group = (step) => `
    (local.set $kb (i32.const 0))
    (block $kb_done (loop $kb_loop
      (br_if $kb_done (i32.ge_u (local.get $kb) (local.get $r)))
      (local.set $kend (select
        (i32.add (local.get $kb) (local.get $kc)) (local.get $r)
        (i32.lt_u (i32.add (local.get $kb) (local.get $kc)) (local.get $r))))${range(V).map((g) => `
      (local.set $a${g} (local.get $zero))`).join('')}
${kLoop(step)}
      (if (i32.eqz (local.get $kb))
        (then${range(V).map((g) => `
          (local.set $t${g} (local.get $a${g}))`).join('')})
        (else${range(V).map((g) => `
          (local.set $t${g} (f64x2.promote_low_f32x4 (f32x4.demote_f64x2_zero (f64x2.add (local.get $t${g}) (local.get $a${g})))))`).join('')}))
      (local.set $kb (i32.add (local.get $kb) (local.get $kc)))
      (br $kb_loop)))
`;

/** f32x4 RNE to bf16 in the high half of each lane (NaN → 0xFFFF, as torch's vectorised cast). */
const bf16Round = (v) => `(v128.bitselect (local.get $nan16)
      (i32x4.shr_u (i32x4.add (i32x4.add ${v} (local.get $c7fff)) (v128.and (i32x4.shr_u ${v} (i32.const 16)) (local.get $one32))) (i32.const 16))
      (f32x4.ne ${v} ${v}))`;

/** $d0.. from the f64 sums $t0..: ΔW = f32(t × scale), one rounding (the product is exact). */
const deltaFromF64 = `
    ${range(V / 2).map((h) => `(local.set $d${h} (i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
      (f32x4.demote_f64x2_zero (f64x2.mul (local.get $t${2 * h}) (local.get $sc)))
      (f32x4.demote_f64x2_zero (f64x2.mul (local.get $t${2 * h + 1}) (local.get $sc)))))`).join('\n    ')}`;

/**
 * The group's epilogue over ΔW in $d0..$d{nd-1} (f32x4 each): by $mode, 0 store ΔW (f32 [n, w8]
 * at $out); 1 bf16 base at $out ([n, w8] u16) ← bf16(f32(base + ΔW)); 2 the same with ΔW rounded
 * to bf16 first (safe_merge); 3 f32 base at $out ← f32(base + ΔW).
 */
const epilogue = (nd) => `
    (local.set $o (i32.add (i32.mul (local.get $i) (local.get $w8)) (local.get $j)))
    (if (i32.le_u (local.get $mode) (i32.const 0))
      (then
        (local.set $o (i32.add (local.get $out) (i32.shl (local.get $o) (i32.const 2))))${range(nd).map((h) => `
        (v128.store offset=${16 * h} (local.get $o) (local.get $d${h}))`).join('')})
      (else (if (i32.eq (local.get $mode) (i32.const 3))
        (then
          (local.set $o (i32.add (local.get $out) (i32.shl (local.get $o) (i32.const 2))))${range(nd).map((h) => `
          (v128.store offset=${16 * h} (local.get $o) (f32x4.add (v128.load offset=${16 * h} (local.get $o)) (local.get $d${h})))`).join('')})
        (else
          (local.set $o (i32.add (local.get $out) (i32.shl (local.get $o) (i32.const 1))))
          (if (i32.eq (local.get $mode) (i32.const 2))
            (then${range(nd).map((h) => `
              (local.set $d${h} (i32x4.shl ${bf16Round(`(local.get $d${h})`)} (i32.const 16)))`).join('')}))${range(nd / 2).map((q) => `
          (local.set $raw (v128.load offset=${16 * q} (local.get $o)))
          (local.set $lo (f32x4.add (i32x4.shl (i32x4.extend_low_i16x8_u (local.get $raw)) (i32.const 16)) (local.get $d${2 * q})))
          (local.set $hi (f32x4.add (i32x4.shl (i32x4.extend_high_i16x8_u (local.get $raw)) (i32.const 16)) (local.get $d${2 * q + 1})))
          (v128.store offset=${16 * q} (local.get $o) (i16x8.narrow_i32x4_u ${bf16Round('(local.get $lo)')} ${bf16Round('(local.get $hi)')}))`).join('')}))))`;

const locals = `
    (local $jt i32) (local $jend i32) (local $i i32) (local $j i32) (local $kb i32) (local $kend i32)
    (local $k i32) (local $xrow i32) (local $xp i32) (local $yp i32) (local $ystride i32) (local $o i32)
    (local $count i32)
    ${range(V).map((g) => `(local $a${g} v128) (local $t${g} v128)`).join(' ')}
    (local $s v128) (local $p v128) (local $bb v128) (local $err v128) (local $xv v128) (local $fl v128)
    (local $low28 v128) (local $low29 v128) (local $mid v128) (local $one v128) (local $zero v128) (local $sc v128)
    ${range(V / 2).map((h) => `(local $d${h} v128)`).join(' ')} (local $raw v128) (local $lo v128) (local $hi v128)
    (local $nan16 v128) (local $c7fff v128) (local $one32 v128)`;

const constants = `
    (local.set $low28 (v128.const i64x2 0x0FFFFFFF 0x0FFFFFFF))
    (local.set $low29 (v128.const i64x2 0x1FFFFFFF 0x1FFFFFFF))
    (local.set $mid (v128.const i64x2 0x10000000 0x10000000))
    (local.set $one (v128.const i64x2 1 1))
    (local.set $zero (v128.const i64x2 0 0))
    (local.set $nan16 (v128.const i32x4 0xFFFF 0xFFFF 0xFFFF 0xFFFF))
    (local.set $c7fff (v128.const i32x4 0x7FFF 0x7FFF 0x7FFF 0x7FFF))
    (local.set $one32 (v128.const i32x4 1 1 1 1))
    (local.set $sc (f64x2.splat (local.get $scale)))
    (local.set $ystride (i32.shl (local.get $w8) (i32.const 3)))`;

/** The fast kernel: fast steps, a flagged group redone exactly, then the epilogue. */
const fastFunc = (name, safe) => `
  ;; For i < n, j < w8 (a multiple of ${2 * V}): ΔW[i, j] = f32(chain(Σ_k x[i, k]·y[k, j]) × scale),
  ;; each chain an fp32 FMA chain from 0 over a block of kc (MKL's order), block sums added in
  ;; fp32; then stored or merged into the base at $out as $mode says (see the epilogue).
  ;; x: f64 [n, r] row-major; y: f64 [r, w8] row-major. Returns the number of ${2 * V}-element
  ;; groups that took the exact path (for tests). "chains" needs the caller's grid guarantee
  ;; (see fastStep); "chainsSafe" does not.
  (func (export "${name}")
    (param $x i32) (param $y i32) (param $out i32) (param $n i32) (param $w8 i32) (param $r i32)
    (param $kc i32) (param $scale f64) (param $mode i32) (result i32)${locals}${constants}
    ;; Column tiles of 256 keep y's tile (r × 256 f64) in L1/L2 while every row passes over it.
    (local.set $jt (i32.const 0))
    (block $jt_done (loop $jt_loop
      (br_if $jt_done (i32.ge_u (local.get $jt) (local.get $w8)))
      (local.set $jend (select
        (i32.add (local.get $jt) (i32.const 256)) (local.get $w8)
        (i32.lt_u (i32.add (local.get $jt) (i32.const 256)) (local.get $w8))))
      (local.set $i (i32.const 0))
      (block $i_done (loop $i_loop
        (br_if $i_done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $xrow (i32.add (local.get $x) (i32.shl (i32.mul (local.get $i) (local.get $r)) (i32.const 3))))
        (local.set $j (local.get $jt))
        (block $j_done (loop $j_loop
          (br_if $j_done (i32.ge_u (local.get $j) (local.get $jend)))
          (local.set $fl (local.get $zero))
${group(fastStep(safe))}
          ;; A flagged lane: redo the whole group with the exact step (rare for real data).
          (if (v128.any_true (local.get $fl))
            (then
              (local.set $count (i32.add (local.get $count) (i32.const 1)))
${group(exactStep)}))
${deltaFromF64}${epilogue(V / 2)}
          (local.set $j (i32.add (local.get $j) (i32.const ${2 * V})))
          (br $j_loop)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $i_loop)))
      (local.set $jt (i32.add (local.get $jt) (i32.const 256)))
      (br $jt_loop)))
    (local.get $count))

`;

const wat = `(module
  ;; Memory is laid out by the caller (fma-kernel.ts) and grown from JS as needed.
  (memory (export "memory") 1)

${fastFunc('chains', false)}${fastFunc('chainsSafe', true)}
  ;; The same with the exact step only (tests compare the two paths).
  (func (export "chainsExact")
    (param $x i32) (param $y i32) (param $out i32) (param $n i32) (param $w8 i32) (param $r i32)
    (param $kc i32) (param $scale f64) (param $mode i32) (result i32)${locals}${constants}
    (local.set $i (i32.const 0))
    (block $i_done (loop $i_loop
      (br_if $i_done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $xrow (i32.add (local.get $x) (i32.shl (i32.mul (local.get $i) (local.get $r)) (i32.const 3))))
      (local.set $j (i32.const 0))
      (block $j_done (loop $j_loop
        (br_if $j_done (i32.ge_u (local.get $j) (local.get $w8)))
${group(exactStep)}
${deltaFromF64}${epilogue(V / 2)}
        (local.set $j (i32.add (local.get $j) (i32.const ${2 * V})))
        (br $j_loop)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $i_loop)))
    (i32.const 0))
)
`;

/** f32x4 lane groups per output group of the fused kernel: 16 elements, 4 FMA chains in flight. */
const F = 4;

/**
 * The fused kernel: the same chains with `f32x4.relaxed_madd`, which V8 compiles to one fused
 * multiply-add instruction on CPUs with FMA3 (then each step is exactly MKL's). "Relaxed" allows an
 * engine to multiply and add separately instead, so fma-kernel.ts uses this module only after a
 * probe on known double-rounding cases shows it fused on this machine and engine.
 */
const fusedWat = `(module
  (memory (export "memory") 1)
  (func (export "chains")
    (param $x i32) (param $y i32) (param $out i32) (param $n i32) (param $w8 i32) (param $r i32)
    (param $kc i32) (param $scale f32) (param $mode i32) (result i32)
    (local $jt i32) (local $jend i32) (local $i i32) (local $j i32) (local $kb i32) (local $kend i32)
    (local $k i32) (local $xrow i32) (local $xp i32) (local $yp i32) (local $ystride i32) (local $o i32)
    ${range(F).map((g) => `(local $a${g} v128) (local $t${g} v128) (local $d${g} v128)`).join(' ')}
    (local $xv v128) (local $sc v128) (local $raw v128) (local $lo v128) (local $hi v128)
    (local $nan16 v128) (local $c7fff v128) (local $one32 v128) (local $zero v128)
    (local.set $zero (v128.const i64x2 0 0))
    (local.set $nan16 (v128.const i32x4 0xFFFF 0xFFFF 0xFFFF 0xFFFF))
    (local.set $c7fff (v128.const i32x4 0x7FFF 0x7FFF 0x7FFF 0x7FFF))
    (local.set $one32 (v128.const i32x4 1 1 1 1))
    (local.set $sc (f32x4.splat (local.get $scale)))
    (local.set $ystride (i32.shl (local.get $w8) (i32.const 2)))
    (local.set $jt (i32.const 0))
    (block $jt_done (loop $jt_loop
      (br_if $jt_done (i32.ge_u (local.get $jt) (local.get $w8)))
      (local.set $jend (select
        (i32.add (local.get $jt) (i32.const 512)) (local.get $w8)
        (i32.lt_u (i32.add (local.get $jt) (i32.const 512)) (local.get $w8))))
      (local.set $i (i32.const 0))
      (block $i_done (loop $i_loop
        (br_if $i_done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $xrow (i32.add (local.get $x) (i32.shl (i32.mul (local.get $i) (local.get $r)) (i32.const 2))))
        (local.set $j (local.get $jt))
        (block $j_done (loop $j_loop
          (br_if $j_done (i32.ge_u (local.get $j) (local.get $jend)))
          (local.set $kb (i32.const 0))
          (block $kb_done (loop $kb_loop
            (br_if $kb_done (i32.ge_u (local.get $kb) (local.get $r)))
            (local.set $kend (select
              (i32.add (local.get $kb) (local.get $kc)) (local.get $r)
              (i32.lt_u (i32.add (local.get $kb) (local.get $kc)) (local.get $r))))${range(F).map((g) => `
            (local.set $a${g} (local.get $zero))`).join('')}
            (local.set $xp (i32.add (local.get $xrow) (i32.shl (local.get $kb) (i32.const 2))))
            (local.set $yp (i32.add (local.get $y) (i32.shl (i32.add (i32.mul (local.get $kb) (local.get $w8)) (local.get $j)) (i32.const 2))))
            (local.set $k (local.get $kb))
            (block $k_done (loop $k_loop
              (br_if $k_done (i32.ge_u (local.get $k) (local.get $kend)))
              (local.set $xv (f32x4.splat (f32.load (local.get $xp))))${range(F).map((g) => `
              (local.set $a${g} (f32x4.relaxed_madd (local.get $xv) (v128.load offset=${16 * g} (local.get $yp)) (local.get $a${g})))`).join('')}
              (local.set $xp (i32.add (local.get $xp) (i32.const 4)))
              (local.set $yp (i32.add (local.get $yp) (local.get $ystride)))
              (local.set $k (i32.add (local.get $k) (i32.const 1)))
              (br $k_loop)))
            (if (i32.eqz (local.get $kb))
              (then${range(F).map((g) => `
                (local.set $t${g} (local.get $a${g}))`).join('')})
              (else${range(F).map((g) => `
                (local.set $t${g} (f32x4.add (local.get $t${g}) (local.get $a${g})))`).join('')}))
            (local.set $kb (i32.add (local.get $kb) (local.get $kc)))
            (br $kb_loop)))${range(F).map((g) => `
          (local.set $d${g} (f32x4.mul (local.get $t${g}) (local.get $sc)))`).join('')}
${epilogue(F)}
          (local.set $j (i32.add (local.get $j) (i32.const ${4 * F})))
          (br $j_loop)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $i_loop)))
      (local.set $jt (i32.add (local.get $jt) (i32.const 512)))
      (br $jt_loop)))
    (i32.const 0))
)
`;

const wabt = await (await import('wabt')).default();
function assemble(name, source, features) {
  const mod = wabt.parseWat(name, source, features);
  mod.validate();
  return Buffer.from(mod.toBinary({}).buffer);
}
const exact = assemble('fma-kernel.wat', wat, { simd: true });
const fused = assemble('fma-kernel-fused.wat', fusedWat, { simd: true, relaxed_simd: true });
// The forward pass's matmul: out[t, n] = Σ_k x[t, k] · w[n, k]. Weight rows are widened to fp32
// four at a time (bf16: the 16 bits shifted into the high half, which is exact) into scratch rows,
// then dotted with every position's activations, the four rows together: one f32x4 accumulator per
// row (four independent chains), one load of x per four multiply-adds; lanes summed pairwise at
// the end. The last N mod 4 rows go through the same four-row dot (so the sums do not depend on
// how rows were split into blocks or worker shares).
const matmulWat = `(module
  (memory (export "memory") 1)
  (func $widen (param $src i32) (param $dst i32) (param $k i32)
    (local $i i32) (local $v v128)
    (block $done (loop $l
      (br_if $done (i32.gt_u (i32.add (local.get $i) (i32.const 8)) (local.get $k)))
      (local.set $v (v128.load (i32.add (local.get $src) (i32.shl (local.get $i) (i32.const 1)))))
      (v128.store (i32.add (local.get $dst) (i32.shl (local.get $i) (i32.const 2)))
        (i32x4.shl (i32x4.extend_low_i16x8_u (local.get $v)) (i32.const 16)))
      (v128.store offset=16 (i32.add (local.get $dst) (i32.shl (local.get $i) (i32.const 2)))
        (i32x4.shl (i32x4.extend_high_i16x8_u (local.get $v)) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 8)))
      (br $l)))
    (block $done2 (loop $l2
      (br_if $done2 (i32.ge_u (local.get $i) (local.get $k)))
      (i32.store (i32.add (local.get $dst) (i32.shl (local.get $i) (i32.const 2)))
        (i32.shl (i32.load16_u (i32.add (local.get $src) (i32.shl (local.get $i) (i32.const 1)))) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l2))))
  ;; Four rows at once against one position: one load of x feeds four multiply-adds (a row's
  ;; dot product would load x and w once each per multiply-add and wait on memory).
  (func $dot4 (param $a i32) (param $r0 i32) (param $r1 i32) (param $r2 i32) (param $r3 i32) (param $k i32) (param $out i32)
    (local $i i32) (local $o i32) (local $xv v128) (local $xs f32)
    (local $a0 v128) (local $a1 v128) (local $a2 v128) (local $a3 v128)
    (local $s0 f32) (local $s1 f32) (local $s2 f32) (local $s3 f32)
    (block $done (loop $l
      (br_if $done (i32.gt_u (i32.add (local.get $i) (i32.const 4)) (local.get $k)))
      (local.set $o (i32.shl (local.get $i) (i32.const 2)))
      (local.set $xv (v128.load (i32.add (local.get $a) (local.get $o))))
      ${range(4).map((r) => `(local.set $a${r} (f32x4.add (local.get $a${r}) (f32x4.mul (local.get $xv) (v128.load (i32.add (local.get $r${r}) (local.get $o))))))`).join('\n      ')}
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br $l)))
    ${range(4).map((r) => `(local.set $s${r} (f32.add
      (f32.add (f32x4.extract_lane 0 (local.get $a${r})) (f32x4.extract_lane 1 (local.get $a${r})))
      (f32.add (f32x4.extract_lane 2 (local.get $a${r})) (f32x4.extract_lane 3 (local.get $a${r})))))`).join('\n    ')}
    (block $done2 (loop $l2
      (br_if $done2 (i32.ge_u (local.get $i) (local.get $k)))
      (local.set $o (i32.shl (local.get $i) (i32.const 2)))
      (local.set $xs (f32.load (i32.add (local.get $a) (local.get $o))))
      ${range(4).map((r) => `(local.set $s${r} (f32.add (local.get $s${r}) (f32.mul (local.get $xs) (f32.load (i32.add (local.get $r${r}) (local.get $o))))))`).join('\n      ')}
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l2)))
    ${range(4).map((r) => `(f32.store offset=${4 * r} (local.get $out) (local.get $s${r}))`).join('\n    ')})
  (func $row (param $w i32) (param $n i32) (param $K i32) (param $bf16 i32) (param $scratch i32) (result i32)
    (if (result i32) (local.get $bf16)
      (then
        (call $widen (i32.add (local.get $w) (i32.shl (i32.mul (local.get $n) (local.get $K)) (i32.const 1))) (local.get $scratch) (local.get $K))
        (local.get $scratch))
      (else (i32.add (local.get $w) (i32.shl (i32.mul (local.get $n) (local.get $K)) (i32.const 2))))))
  ;; x: T×K f32; w: N×K (bf16 when $bf16, else f32); out: T×N f32; scratch: 4·K + 4 f32.
  (func (export "matmul") (param $x i32) (param $w i32) (param $out i32) (param $T i32) (param $K i32) (param $N i32) (param $bf16 i32) (param $scratch i32)
    (local $n i32) (local $t i32) (local $r0 i32) (local $r1 i32) (local $r2 i32) (local $r3 i32) (local $kb i32) (local $row i32)
    (local.set $kb (i32.shl (local.get $K) (i32.const 2)))
    (block $dn (loop $ln
      (br_if $dn (i32.gt_u (i32.add (local.get $n) (i32.const 4)) (local.get $N)))
      ${range(4).map((r) => `(local.set $r${r} (call $row (local.get $w) (i32.add (local.get $n) (i32.const ${r})) (local.get $K) (local.get $bf16) (i32.add (local.get $scratch) (i32.mul (local.get $kb) (i32.const ${r})))))`).join('\n      ')}
      (local.set $t (i32.const 0))
      (block $dt (loop $lt
        (br_if $dt (i32.ge_u (local.get $t) (local.get $T)))
        (call $dot4 (i32.add (local.get $x) (i32.mul (local.get $t) (local.get $kb)))
          (local.get $r0) (local.get $r1) (local.get $r2) (local.get $r3) (local.get $K)
          (i32.add (local.get $out) (i32.shl (i32.add (i32.mul (local.get $t) (local.get $N)) (local.get $n)) (i32.const 2))))
        (local.set $t (i32.add (local.get $t) (i32.const 1)))
        (br $lt)))
      (local.set $n (i32.add (local.get $n) (i32.const 4)))
      (br $ln)))
    ;; The last N mod 4 rows one at a time, through the same four-row dot (the row given four
    ;; times, the first result kept), so every output element is summed in the same order however
    ;; the rows were split into blocks and worker shares.
    (block $dn1 (loop $ln1
      (br_if $dn1 (i32.ge_u (local.get $n) (local.get $N)))
      (local.set $row (call $row (local.get $w) (local.get $n) (local.get $K) (local.get $bf16) (local.get $scratch)))
      (local.set $t (i32.const 0))
      (block $dt1 (loop $lt1
        (br_if $dt1 (i32.ge_u (local.get $t) (local.get $T)))
        (call $dot4 (i32.add (local.get $x) (i32.mul (local.get $t) (local.get $kb)))
          (local.get $row) (local.get $row) (local.get $row) (local.get $row) (local.get $K)
          (i32.add (local.get $scratch) (i32.shl (local.get $kb) (i32.const 2))))
        (f32.store
          (i32.add (local.get $out) (i32.shl (i32.add (i32.mul (local.get $t) (local.get $N)) (local.get $n)) (i32.const 2)))
          (f32.load (i32.add (local.get $scratch) (i32.shl (local.get $kb) (i32.const 2)))))
        (local.set $t (i32.add (local.get $t) (i32.const 1)))
        (br $lt1)))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $ln1))))
)
`;
const matmul = assemble('matmul-kernel.wat', matmulWat, { simd: true });
const matmulText = `// Generated by scripts/build-wasm.mjs (the WAT is there); do not edit.
/** The forward pass's x · Wᵀ kernel (WebAssembly SIMD, f32x4; bf16 rows widened in the kernel), ${matmul.length} bytes. */
export const MATMUL_KERNEL_WASM = '${matmul.toString('base64')}';
`;
const matmulTarget = join(root, 'src', 'tensor', 'matmul-kernel.wasm.ts');

const text = `// Generated by scripts/build-wasm.mjs (the WAT is there); do not edit.
/** The exact fp32 FMA-chain kernel (WebAssembly SIMD, f64 lanes), ${exact.length} bytes. */
export const FMA_KERNEL_WASM = '${exact.toString('base64')}';
/** Output elements per group of that kernel: its width must be a multiple of this. */
export const FMA_KERNEL_GROUP = ${2 * V};
/** The fused kernel (relaxed SIMD f32x4.relaxed_madd), ${fused.length} bytes; used only where a probe shows it fused. */
export const FMA_FUSED_KERNEL_WASM = '${fused.toString('base64')}';
/** Output elements per group of the fused kernel. */
export const FMA_FUSED_KERNEL_GROUP = ${4 * F};
`;

if (process.argv.includes('--check')) {
  let old = '';
  try {
    old = readFileSync(target, 'utf8');
  } catch {
    // missing: stale
  }
  let oldMatmul = '';
  try {
    oldMatmul = readFileSync(matmulTarget, 'utf8');
  } catch {
    // missing: stale
  }
  if (old !== text || oldMatmul !== matmulText) {
    console.error(`${old !== text ? target : matmulTarget} is stale: run node scripts/build-wasm.mjs`);
    process.exit(1);
  }
} else {
  writeFileSync(target, text);
  writeFileSync(matmulTarget, matmulText);
  console.log(`wrote ${matmulTarget} (${matmul.length} bytes of wasm)`);
  console.log(`wrote ${target} (${exact.length} + ${fused.length} bytes of wasm)`);
}
