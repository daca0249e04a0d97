/**
 * DeepSeek-V3 (MLA, sigmoid-routed MoE with expert bias and shared experts, a dense prefix, MTP)
 * against real megatron-core 0.16.1 on CPU and transformers 5.24 (test/oracle/deepseek_oracle.py):
 *
 * - tiny random `DeepseekV3ForCausalLM` models (q_lora on / off, 1 / 2 dense layers, 1 / 2 shared
 *   experts, MTP = 1 with the hub's layer-L layout and embedding / head copies): HF → Megatron
 *   under TE keys and under the local spec's own names, each strictly loaded by megatron-core
 *   (`dist_checkpointing.load(strict=RAISE_ALL)`, MTP block included) with transformers' logits
 *   and the MTP block's output equal to a reference MTP forward; HF → Megatron → HF byte-identical;
 * - an FP8 checkpoint made by the reference block quantizer: HF → Megatron (bf16) → HF equals the
 *   reference bf16 dequantisation (Megatron-Bridge's dequantize_fp8_blockwise) byte for byte;
 * - the exhaustive FP8 table, derived from torch on this run;
 * - a checkpoint megatron-core saves at EP=2 × TP=2 (with MTP) exports to HF that loads cleanly,
 *   with megatron-core's logits and every expert at its global index.
 *
 * Not exercised on CPU: TransformerEngine's fused MLA / grouped-GEMM kernels, YaRN RoPE (the tiny
 * models use plain RoPE; the weights do not depend on it), the alltoall dispatcher.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { withFp8Dequantized } from '../../src/formats/fp8-block.js';
import { withInt4Dequantized } from '../../src/formats/pack-quantized.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-deepseek-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/**
 * A quantized HF checkpoint `hf` → Megatron (`<hf>.meg`) → HF (`<hf>.back`): its safetensors must be
 * the oracle's dequantised `<hf>.ref` byte for byte, its config.json without quantization_config.
 */
async function roundTripToRef(hf: string, what: string): Promise<string> {
  const meg = `${hf}.meg`;
  await convertHfToMegatron(hf, meg, {});
  const back = `${hf}.back`;
  await convertMegatronToHf(meg, back, {});
  assert.ok((await readFile(join(`${hf}.ref`, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), what);
  const cfg = JSON.parse(await readFile(join(back, 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(cfg.quantization_config, undefined);
  return back;
}

/** The whole of `t`'s bytes. */
async function readAll(t: { byteLength: number; shape: readonly number[]; read(box: { start: number[]; size: number[] }, out: Uint8Array): Promise<void> }): Promise<Buffer> {
  const out = new Uint8Array(t.byteLength);
  await t.read({ start: t.shape.map(() => 0), size: [...t.shape] }, out);
  return Buffer.from(out.buffer, out.byteOffset, out.byteLength);
}

interface Load {
  max_abs_diff: number;
  mtp_loaded: boolean;
  mtp_forward?: boolean;
  mtp_max_abs_diff?: number;
}

for (const [c, mtp] of [['v3', true], ['v3_noq', false]] as const) {
  test(`${c}: megatron-core strictly loads the MLA checkpoint (TE keys and local-spec names${mtp ? ', MTP block' : ''}) with transformers' logits; HF → Megatron → HF is byte-identical`, async () => {
    const hf = join(tmp, c);
    await runOracle('deepseek_oracle.py', ['make', hf, c]);
    for (const spec of ['te', 'local'] as const) {
      const meg = join(tmp, `${c}.${spec}`);
      await convertHfToMegatron(hf, meg, { dtype: 'F32', megatronSpec: spec });
      const r = JSON.parse(await runOracle('deepseek_oracle.py', ['load', join(meg, 'iter_0000000'), hf, ...(mtp ? ['--mtp'] : []), ...(spec === 'local' ? ['--local-names'] : [])])) as Load;
      assert.ok(r.max_abs_diff < 1e-5, `${spec}: megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
      if (mtp) {
        assert.equal(r.mtp_loaded, true);
        assert.equal(r.mtp_forward, true);
        assert.ok(r.mtp_max_abs_diff! < 1e-5, `${spec}: MTP block output differs by ${r.mtp_max_abs_diff}`);
      }
      const back = `${meg}.back`;
      await convertMegatronToHf(meg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${spec}: round trip is not byte-identical`);
    }
    // Legacy rank files: MLA heads over TP, the decoder's and the MTP layer's experts over EP, layers over PP.
    for (const layout of [{ tp: 2, ep: 2 }, { tp: 2, ep: 4, etp: 1 }, { pp: c === 'v3' ? 3 : 2, ep: 2 }]) {
      const leg = join(tmp, `${c}.legacy-${Object.entries(layout).flat().join('')}`);
      await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', ...layout });
      const back = `${leg}.back`;
      await convertMegatronToHf(leg, back, {});
      assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${JSON.stringify(layout)}: legacy round trip is not byte-identical`);
    }
  });
}

test("shardshift's legacy rank files at EP=2 (MTP experts local to each rank) load strictly into each rank of megatron-core's model, logits and MTP output equal transformers'", async () => {
  const hf = join(tmp, 'v3');
  const leg = join(tmp, 'v3.legacy-local-ep2');
  await convertHfToMegatron(hf, leg, { dtype: 'F32', ckptFormat: 'torch', megatronSpec: 'local', ep: 2 });
  const r = JSON.parse(await runOracle('deepseek_oracle.py', ['load_legacy', leg, hf, '--ep', '2', '--mtp'], { timeoutMs: 240_000 })) as { max_abs_diff: number; mtp_max_abs_diff: number };
  assert.ok(r.max_abs_diff < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff}`);
  assert.ok(r.mtp_max_abs_diff < 1e-5, `MTP output differs by ${r.mtp_max_abs_diff}`);
});

test('FP8 block-scaled checkpoint → Megatron (bf16) → HF equals the reference dequantisation byte for byte, config without quantization_config', async () => {
  const hf = join(tmp, 'fp8');
  await runOracle('deepseek_oracle.py', ['make', hf, 'v3_fp8']);
  const back = await roundTripToRef(hf, 'not the reference bf16 bytes');
  const r = JSON.parse(await runOracle('deepseek_oracle.py', ['compare', back, `${hf}.ref`])) as { max_abs_diff: number; missing_a: string[]; unexpected_a: string[] };
  assert.deepEqual([r.missing_a, r.unexpected_a, r.max_abs_diff], [[], [], 0]);
});

test('--quantize fp8 writes the hub FP8 layout back exactly as the reference block quantizer; an FP8 → bf16 → FP8 round trip keeps every e4m3 byte', async (t) => {
  const hf = join(tmp, 'fp8');
  const meg = `${hf}.meg`;
  const q = `${hf}.q`;
  await convertMegatronToHf(meg, q, { quantize: 'fp8' });
  const expect = `${hf}.expect`;
  await runOracle('fp8_oracle.py', ['quantize', `${hf}.ref`, expect]);
  // Tensor by tensor (the two writers order tensors differently): names, dtypes, shapes, bytes.
  const a = await openCheckpoint(join(q, 'model.safetensors'));
  const b = await openCheckpoint(join(expect, 'model.safetensors'));
  assert.deepEqual([...a.tensors.keys()].sort(), [...b.tensors.keys()].sort());
  for (const [n, x] of a.tensors) {
    const y = b.tensors.get(n)!;
    assert.deepEqual([x.dtype, x.shape], [y.dtype, y.shape], n);
    assert.ok((await readAll(x)).equals(await readAll(y)), `${n}: differs from the reference quantizer`);
  }
  await a.close();
  await b.close();
  const cfg = JSON.parse(await readFile(join(q, 'config.json'), 'utf8')) as { quantization_config: unknown };
  assert.deepEqual(cfg.quantization_config, { activation_scheme: 'dynamic', fmt: 'e4m3', quant_method: 'fp8', weight_block_size: [128, 128] });
  // Against the original FP8 checkpoint: every scale is recomputed from the bf16 block maximum
  // (the original came from float32 weights), so scales differ in their low bits; the e4m3 codes
  // do not move (a relative scale change far below half an e4m3 step).
  const r = JSON.parse(await runOracle('fp8_oracle.py', ['blocks', hf, q])) as { blocks: number; blocks_scale_differs: number; blocks_bytes_differ: number; values_differ: number };
  t.diagnostic(`FP8 → bf16 → FP8: ${r.blocks} blocks, ${r.blocks_scale_differs} with a different scale, ${r.blocks_bytes_differ} with different e4m3 bytes (${r.values_differ} values)`);
  assert.equal(r.blocks_bytes_differ, 0);
});

test('the exhaustive FP8 table derived from torch on this run: every byte value under every edge scale, bit for bit', async () => {
  const dir = join(tmp, 'table');
  await runOracle('deepseek_oracle.py', ['fp8_table', dir]);
  const view = withFp8Dequantized(await openCheckpoint(join(dir, 'fp8.safetensors')), { blockRows: 128, blockCols: 128 });
  const ref = await openCheckpoint(join(dir, 'ref.safetensors'));
  for (const n of ['w', 'v']) {
    assert.ok((await readAll(view.tensors.get(n)!)).equals(await readAll(ref.tensors.get(n)!)), `${n}: differs from torch's dequantisation`);
  }
  await view.close();
  await ref.close();
});

test('megatron-core DeepSeek-V3 saved at EP=2 × TP=2 with MTP → HF: clean load, megatron-core logits (and MTP output), every expert at its global index', async () => {
  const run = join(tmp, 'saved-v3-ep2-tp2');
  await runOracle('deepseek_oracle.py', ['save', run, 'v3', '--ep', '2', '--tp', '2', '--mtp'], { timeoutMs: 300_000 });
  const hf = `${run}.hf`;
  await convertMegatronToHf(run, hf, { hfModel: join(run, 'hf_ref'), dtype: 'F32' });
  const r = JSON.parse(await runOracle('deepseek_oracle.py', ['check_hf', hf, run])) as {
    max_abs_diff: number;
    missing: string[];
    unexpected: string[];
    experts_checked: number;
    experts_misplaced: string[];
    mtp_copies_exact: boolean;
    mtp_max_abs_diff: number;
  };
  assert.deepEqual([r.missing, r.unexpected, r.experts_misplaced], [[], [], []]);
  assert.equal(r.experts_checked, 24);
  assert.equal(r.mtp_copies_exact, true);
  assert.ok(r.max_abs_diff < 1e-5, `HF logits differ from megatron-core's by ${r.max_abs_diff}`);
  assert.ok(r.mtp_max_abs_diff < 1e-5, `MTP output differs from megatron-core's by ${r.mtp_max_abs_diff}`);
});

test('compressed-tensors INT4 (pack-quantized, group 32): the table derived from the package on this run decompresses bit for bit', async () => {
  const dir = join(tmp, 'int4-table');
  await runOracle('int4_oracle.py', ['table', dir]);
  const view = await withInt4Dequantized(await openCheckpoint(join(dir, 'int4.safetensors')), { groupSize: 32 });
  const ref = await openCheckpoint(join(dir, 'ref.safetensors'));
  for (const [n, b] of ref.tensors) {
    const a = view.tensors.get(n)!;
    assert.equal(a.dtype, b.dtype, n);
    assert.ok((await readAll(a)).equals(await readAll(b)), `${n}: differs from compressed-tensors' decompression`);
  }
  await view.close();
  await ref.close();
});

test('a Kimi K2-Thinking-layout checkpoint (INT4 routed experts) → Megatron → HF equals the package\'s decompression byte for byte', async () => {
  const hf = join(tmp, 'k2-thinking');
  const made = JSON.parse(await runOracle('int4_oracle.py', ['make', hf])) as { int4_weights: number };
  assert.ok(made.int4_weights > 0);
  await roundTripToRef(hf, 'not the decompressed bf16 bytes');
});
