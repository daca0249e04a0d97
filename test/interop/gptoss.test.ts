/**
 * GPT-OSS against real megatron-core 0.16.1 on CPU and transformers 5:
 * - HF → Megatron (local-spec keys) loads into megatron-core's GPTModel configured as
 *   Megatron-Bridge's GPT-OSS provider (biases, learnable softmax offset = sinks, clamped
 *   quick-GEGLU, sliding-window layers) with `dist_checkpointing.load(strict=RAISE_ALL)`;
 *   logits equal transformers';
 * - HF → Megatron (TE keys, and local keys) → HF gives back model.safetensors byte for byte.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { withMxfp4Dequantized } from '../../src/formats/mxfp4.js';
import { wholeBox } from '../../src/tensor/layout.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-gptoss-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('gpt_oss: megatron-core strictly loads every key with transformers\' logits; HF → Megatron → HF is byte-identical', async (t) => {
  const hf = join(tmp, 'hf');
  await runOracle('gptoss_oracle.py', ['make', hf]);
  const local = join(tmp, 'local');
  await convertHfToMegatron(hf, local, { dtype: 'F32', megatronSpec: 'local' });
  const r = JSON.parse(await runOracle('gptoss_oracle.py', ['load', join(local, 'iter_0000000'), hf])) as { keys: string[]; forward_error?: string; max_abs_diff?: number; max_abs?: number };
  for (const k of ['decoder.layers.self_attention.core_attention.softmax_offset', 'decoder.layers.self_attention.linear_proj.bias', 'decoder.layers.mlp.router.bias', 'decoder.layers.mlp.experts.experts.linear_fc1.bias', 'decoder.layers.mlp.experts.experts.linear_fc2.bias']) {
    assert.ok(r.keys.includes(k), `megatron-core's sharded state dict has no ${k}`);
  }
  assert.equal(r.forward_error, undefined);
  t.diagnostic(`strict load of ${r.keys.length} keys; max |logits − transformers'| = ${r.max_abs_diff} (max |logit| ${r.max_abs})`);
  assert.ok(r.max_abs_diff! < 1e-5, `megatron-core logits differ from transformers' by ${r.max_abs_diff} (max |logit| ${r.max_abs})`);
  const te = join(tmp, 'te');
  await convertHfToMegatron(hf, te, { dtype: 'F32' });
  for (const [meg, name] of [[te, 'te'], [local, 'local']] as const) {
    const back = join(tmp, `${name}.back`);
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `${name} keys: round trip is not byte-identical`);
  }
});

test('MXFP4: every scale byte and nibble dequantises bit for bit as transformers\' convert_moe_packed_tensors', async () => {
  const dir = join(tmp, 'table');
  await runOracle('gptoss_oracle.py', ['mxfp4_table', dir]);
  const packed = withMxfp4Dequantized(await openCheckpoint(join(dir, 'packed.safetensors')));
  const expected = await openCheckpoint(join(dir, 'expected.safetensors'));
  try {
    const got = packed.tensors.get('w')!;
    const want = expected.tensors.get('w')!;
    assert.deepEqual(got.shape, want.shape);
    const a = new Uint8Array(got.byteLength);
    const b = new Uint8Array(want.byteLength);
    await got.read(wholeBox(got.shape), a);
    await want.read(wholeBox(want.shape), b);
    assert.ok(Buffer.from(a).equals(Buffer.from(b)), 'whole tensor');
    // A sub-box (rows and a column range inside one block) reads the same bytes.
    const box = { start: [1, 37, 2], size: [1, 20, 5] };
    const sa = new Uint8Array(200);
    const sb = new Uint8Array(200);
    await got.read(box, sa);
    await want.read(box, sb);
    assert.ok(Buffer.from(sa).equals(Buffer.from(sb)), 'sub-box');
  } finally {
    await packed.close();
    await expected.close();
  }
});

test('MXFP4 GPT-OSS checkpoint → Megatron → HF: the bf16 experts equal transformers\' dequantisation bit for bit', async () => {
  const hf = join(tmp, 'hf.q');
  await runOracle('gptoss_oracle.py', ['make', hf]);
  const q = join(tmp, 'mxfp4');
  await runOracle('gptoss_oracle.py', ['mxfp4', hf, q]);
  const meg = join(tmp, 'mxfp4.meg');
  await convertHfToMegatron(q, meg, {});
  const back = join(tmp, 'mxfp4.hf');
  await convertMegatronToHf(meg, back, { dtype: 'BF16' });
  const out = await openCheckpoint(back);
  const deq = await openCheckpoint(`${q}.dequantized.safetensors`);
  try {
    assert.ok(deq.tensors.size >= 2);
    for (const [n, want] of deq.tensors) {
      const got = out.tensors.get(n);
      assert.ok(got, `${n} in the export`);
      assert.deepEqual(got.shape, want.shape, n);
      const a = new Uint8Array(got.byteLength);
      const b = new Uint8Array(want.byteLength);
      await got.read(wholeBox(got.shape), a);
      await want.read(wholeBox(want.shape), b);
      assert.ok(Buffer.from(a).equals(Buffer.from(b)), `${n} differs from transformers' dequantisation`);
    }
  } finally {
    await out.close();
    await deq.close();
  }
});

test('GPT-OSS export --quantize mxfp4: the hub layout back, loading in transformers as the MXFP4 source does', async (t) => {
  const hf = join(tmp, 'hf.q2');
  await runOracle('gptoss_oracle.py', ['make', hf]);
  const q = join(tmp, 'mxfp4.2');
  await runOracle('gptoss_oracle.py', ['mxfp4', hf, q]);
  const meg = join(tmp, 'mxfp4.2.meg');
  await convertHfToMegatron(q, meg, {});
  const back = join(tmp, 'mxfp4.2.hf');
  const r = await convertMegatronToHf(meg, back, { quantize: 'mxfp4' });
  assert.ok(r.plan.notes?.some((n) => /MXFP4: 8 expert weights quantised/.test(n)), r.plan.notes?.join('\n'));
  const cfg = JSON.parse(await readFile(join(back, 'config.json'), 'utf8')) as { quantization_config?: { quant_method?: string } };
  assert.equal(cfg.quantization_config?.quant_method, 'mxfp4');
  // Block by block against the source's MXFP4 (made by another quantizer): a block differs only
  // where the rounding-up rule picks a smaller scale (largest code ≤ 3.0) or the block is zero.
  const src = await openCheckpoint(join(q, 'model.safetensors'));
  const out = await openCheckpoint(back);
  try {
    let blocksSeen = 0;
    let differ = 0;
    for (const [n, want] of src.tensors) {
      if (!n.endsWith('_blocks')) continue;
      const sn = n.replace(/_blocks$/, '_scales');
      const [a, b, sa, sb] = await Promise.all([want, out.tensors.get(n)!, src.tensors.get(sn)!, out.tensors.get(sn)!].map(async (x) => {
        assert.ok(x, `${n} / ${sn} in the export`);
        const buf = new Uint8Array(x.byteLength);
        await x.read(wholeBox(x.shape), buf);
        return buf;
      }));
      assert.deepEqual(out.tensors.get(n)!.shape, want.shape);
      for (let k = 0; k < sa!.length; k++) {
        blocksSeen++;
        const x = a!.subarray(k * 16, k * 16 + 16);
        const y = b!.subarray(k * 16, k * 16 + 16);
        if (sa![k] === sb![k] && x.every((v, i) => v === y[i])) continue;
        differ++;
        let maxCode = 0;
        for (const v of x) maxCode = Math.max(maxCode, v & 7, v >> 4 & 7);
        assert.ok(maxCode <= 5, `${n} block ${k}: bytes differ with largest code ${maxCode}`);
      }
    }
    t.diagnostic(`${blocksSeen} MXFP4 blocks, ${differ} re-scaled (largest code ≤ 3.0 or zero)`);
  } finally {
    await src.close();
    await out.close();
  }
  const same = JSON.parse(await runOracle('gptoss_oracle.py', ['load_same', q, back])) as { params: number; differing: string[]; max_abs_diff: number; experts_dtype: string };
  t.diagnostic(`transformers: ${same.params} parameters, experts ${same.experts_dtype}, logits max |Δ| ${same.max_abs_diff}`);
  assert.deepEqual(same.differing, []);
  assert.equal(same.max_abs_diff, 0);
});

