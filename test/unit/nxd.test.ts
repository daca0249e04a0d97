/**
 * NxD shards without Python: HF → NxD (tp 2, pp 2, kv_size_multiplier 2, qkv_linear and
 * fuse_qkv, hf and megatron styles) → HF is bit-identical; xser and plain shards hold the same
 * tensors; the layout facts (file names, markers, PP assignment, trn1 Q order); bad inputs.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm, readdir, readFile, open, unlink, cp } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { openNxdShards, writeNxdShards } from '../../src/nxd/shards.js';
import { copyOf } from '../../src/lazy/expr.js';
import { writeOutput } from '../../src/exec/output.js';
import { convertHfToNxd, convertNxdToHf, type NxdConvertOptions } from '../../src/plan/nxd-convert.js';
import { ppRankOfLayer } from '../../src/nxd/layout.js';
import { wholeBox } from '../../src/tensor/layout.js';
import type { SourceTensor } from '../../src/lazy/types.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
const config = join(example, 'config.json');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-nxd-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

async function bytesOf(t: SourceTensor): Promise<Buffer> {
  const out = new Uint8Array(t.byteLength);
  await t.read(wholeBox(t.shape), out);
  return Buffer.from(out);
}

/** Every tensor of `a` equals `b`'s (names, dtypes, shapes, bytes). */
async function assertSameTensors(a: Map<string, SourceTensor> | ReadonlyMap<string, SourceTensor>, b: ReadonlyMap<string, SourceTensor>, what: string): Promise<number> {
  assert.deepEqual([...a.keys()].sort(), [...b.keys()].sort(), `${what}: names`);
  for (const [n, t] of a) {
    const u = b.get(n)!;
    assert.equal(t.dtype, u.dtype, `${what}: ${n} dtype`);
    assert.deepEqual(t.shape, u.shape, `${what}: ${n} shape`);
    assert.ok((await bytesOf(t)).equals(await bytesOf(u)), `${what}: ${n} bytes differ`);
  }
  return a.size;
}

const CASES: Array<[string, NxdConvertOptions]> = [
  ['hf qkv_linear kvm2 trn2', { modelStyle: 'hf', qkvLinear: true, kvSizeMultiplier: 2, hwBackend: 'trn2' }],
  ['hf qkv_linear+fuse_qkv kvm2 trn2', { modelStyle: 'hf', qkvLinear: true, fuseQkv: true, kvSizeMultiplier: 2, hwBackend: 'trn2' }],
  ['hf separate q/k/v', { modelStyle: 'hf' }],
  ['megatron qkv_linear', { modelStyle: 'megatron', qkvLinear: true, hwBackend: 'trn1' }],
];

for (const [label, o] of CASES) {
  test(`HF → NxD (tp 2, pp 2, ${label}) → HF is bit-identical; xser and plain shards hold identical tensors`, async () => {
    const slug = label.replace(/[^a-z0-9]+/g, '-');
    const plain = join(tmp, `${slug}-plain`);
    const xser = join(tmp, `${slug}-xser`);
    await convertHfToNxd(example, plain, { ...o, tp: 2, pp: 2 });
    await convertHfToNxd(example, xser, { ...o, tp: 2, pp: 2, xser: true });
    const a = await openNxdShards(plain);
    const b = await openNxdShards(xser);
    try {
      assert.equal(a.xser, false);
      assert.equal(b.xser, true);
      for (const r of a.ranks) await assertSameTensors(r.tensors, b.rank(r.tp, r.pp).tensors, `${label} ${r.file}`);
    } finally {
      await a.close();
      await b.close();
    }
    for (const src of [plain, xser]) {
      const back = `${src}-hf`;
      await convertNxdToHf(src, back, { config, hwBackend: o.hwBackend });
      const orig = await openCheckpoint(example);
      const got = await openCheckpoint(back);
      try {
        assert.equal(await assertSameTensors(orig.tensors, got.tensors, `${label} round trip`), 21);
      } finally {
        await orig.close();
        await got.close();
      }
    }
  });
}

test('file layout: markers, two-digit rank names, xser tensor files and .info.pt; PP keeps global layer numbers', async () => {
  const out = join(tmp, 'hf-qkv-linear-kvm2-trn2-xser');
  assert.ok(existsSync(join(out, 'checkpoint')) && existsSync(join(out, 'done')));
  const model = (await readdir(join(out, 'model'))).sort();
  assert.deepEqual(model.filter((n) => n.endsWith('.pt') && !n.endsWith('.info.pt')), [
    'dp_rank_00_tp_rank_00_pp_rank_00.pt',
    'dp_rank_00_tp_rank_00_pp_rank_01.pt',
    'dp_rank_00_tp_rank_01_pp_rank_00.pt',
    'dp_rank_00_tp_rank_01_pp_rank_01.pt',
  ]);
  assert.ok(model.includes('dp_rank_00_tp_rank_01_pp_rank_01.pt.info.pt'));
  assert.ok((await readdir(join(out, 'model', 'dp_rank_00_tp_rank_01_pp_rank_01.pt.tensors'))).includes('tensor_0.pt'));
  const sh = await openNxdShards(out);
  try {
    const last = [...sh.rank(1, 1).tensors.keys()];
    assert.ok(last.includes('model.layers.1.self_attn.qkv_proj.weight_q') && last.includes('lm_head.weight') && last.includes('model.norm.weight'));
    assert.ok(!last.some((n) => n.includes('layers.0.') || n.includes('embed_tokens')));
    const first = [...sh.rank(0, 0).tensors.keys()];
    assert.ok(first.includes('model.embed_tokens.weight') && first.includes('model.layers.0.mlp.gate_up_proj.weight'));
    assert.deepEqual(sh.rank(0, 0).tensors.get('model.layers.0.self_attn.qkv_proj.weight_k')!.shape, [16, 32]); // 2 kv × 8 × kvm 2 / tp 2
  } finally {
    await sh.close();
  }
  // create_partitions: the remainder goes to the last stages (30 layers / 4 → 7, 7, 8, 8).
  const L = Array.from({ length: 30 }, (_, i) => i);
  const counts = [0, 0, 0, 0];
  for (const i of L) counts[ppRankOfLayer(L, 4, i)]!++;
  assert.deepEqual(counts, [7, 7, 8, 8]);
});

test('bad input: tp_size not dividing the heads, trn1 without kv·kvm = tp, no --hw_backend → usage errors (exit 2)', async () => {
  const base = ['nxd-convert', '--model_style', 'hf', '--input_dir', example, '--config', config, '--convert_from_full_state', '--pp_size', '1'];
  let r = await run([...base, '--hw_backend', 'trn1', '--output_dir', join(tmp, 'bad1'), '--tp_size', '3']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--tp_size 3 does not divide num_attention_heads 4/);
  r = await run([...base, '--hw_backend', 'trn1', '--output_dir', join(tmp, 'bad2'), '--tp_size', '2', '--qkv_linear', 'True', '--kv_size_multiplier', '2']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /trn1 Q-head order .* 2 × 2 ≠ 2/);
  // TP above the KV heads without replication: the message names the flags that make it work.
  r = await run([...base, '--hw_backend', 'trn1', '--output_dir', join(tmp, 'bad4'), '--tp_size', '4']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--tp_size 4 does not divide num_key_value_heads 2 .*: --qkv_linear --kv_size_multiplier 2 --hw_backend trn1\|trn2/);
  r = await run([...base, '--output_dir', join(tmp, 'bad3'), '--tp_size', '2']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /hw_backend is required/);
  assert.ok(!existsSync(join(tmp, 'bad1')) && !existsSync(join(tmp, 'bad2')));
});

test('bad input: a missing rank file, an xser reference to a missing tensor file, replicas that disagree → one clear error, exit 1', async () => {
  // Missing rank file.
  const miss = join(tmp, 'missing-rank');
  await cp(join(tmp, 'hf-qkv-linear-kvm2-trn2-plain'), miss, { recursive: true });
  await unlink(join(miss, 'model', 'dp_rank_00_tp_rank_01_pp_rank_00.pt'));
  let r = await run(['convert', '--to', 'hf', miss, join(tmp, 'out-miss'), '--hf-model', example, '--hw-backend', 'trn2']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /rank file\(s\) missing for tp_size 2 × pp_size 2: dp_rank_00_tp_rank_01_pp_rank_00\.pt/);
  // xser reference to a missing tensor file.
  const xs = join(tmp, 'missing-tensor');
  await cp(join(tmp, 'hf-qkv-linear-kvm2-trn2-xser'), xs, { recursive: true });
  await unlink(join(xs, 'model', 'dp_rank_00_tp_rank_00_pp_rank_01.pt.tensors', 'tensor_2.pt'));
  r = await run(['nxd-convert', '--input_dir', join(xs, 'model'), '--output_dir', join(tmp, 'out-xs'), '--config', config, '--tp_size', '2', '--pp_size', '2', '--kv_size_multiplier', '2', '--qkv_linear', 'True', '--load_xser', 'True', '--hw_backend', 'trn2', '--convert_to_full_state']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /dp_rank_00_tp_rank_00_pp_rank_01\.pt: tensor model\.layers\.1\.\S+ is an xser TensorReference \{'tid': 2\} but \S+tensor_2\.pt is missing/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  // KV replicas that disagree: flip one byte of rank 1's K (the second replica) in a plain shard.
  const rep = join(tmp, 'bad-replica');
  await cp(join(tmp, 'hf-qkv-linear-kvm2-trn2-plain'), rep, { recursive: true });
  const sh = await openNxdShards(rep);
  const k = sh.rank(1, 0).tensors.get('model.layers.0.self_attn.qkv_proj.weight_k')!;
  await sh.close();
  const f = await open(join(rep, 'model', 'dp_rank_00_tp_rank_01_pp_rank_00.pt'), 'r+');
  const b = Buffer.alloc(1);
  await f.read(b, 0, 1, k.piece.byteOffset + 3);
  b[0]! ^= 0x40;
  await f.write(b, 0, 1, k.piece.byteOffset + 3);
  await f.close();
  r = await run(['convert', '--to', 'hf', rep, join(tmp, 'out-rep'), '--hf-model', example, '--hw-backend', 'trn2']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /model\.layers\.0\.self_attn\.k_proj\.weight: KV replica 1 .* differs from replica 0/);
  assert.ok(!existsSync(join(tmp, 'out-rep', 'model.safetensors')));
  // kv_size_multiplier given but not what the shapes say.
  r = await run(['convert', '--to', 'hf', join(tmp, 'hf-qkv-linear-kvm2-trn2-plain'), join(tmp, 'out-kvm'), '--hf-model', example, '--hw-backend', 'trn2', '--kv-size-multiplier', '1']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /replicated 2× .* --kv_size_multiplier says 1/);
});

test('NxD → HF: a tensor the converter partitions by name that the family table lacks (an attention bias) is refused by name; an unknown one is kept replicated', async () => {
  const src = join(tmp, 'hf-separate-q-k-v-plain');
  /** The source's shards with `extra` (named after layer 0's input norm's data) added on pp rank 0. */
  const withExtra = async (out: string, extra: string): Promise<void> => {
    const sh = await openNxdShards(src);
    try {
      const ranks = sh.ranks.map((r) => {
        const ts = [...r.tensors].map(([n, t]) => copyOf(n, t));
        const norm = [...r.tensors].find(([n]) => n.endsWith('.input_layernorm.weight'))?.[1];
        if (r.pp === 0) ts.push(copyOf(extra, norm!));
        return { tp: r.tp, pp: r.pp, tensors: ts };
      });
      await writeOutput(src, out, 'dir', writeNxdShards(ranks, { xser: false }), [], {});
    } finally {
      await sh.close();
    }
  };
  await withExtra(join(tmp, 'with-bias'), 'model.layers.0.self_attn.q_proj.bias');
  let r = await run(['convert', '--to', 'hf', join(tmp, 'with-bias'), join(tmp, 'out-bias'), '--hf-model', example]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /model\.layers\.0\.self_attn\.q_proj\.bias in dp_rank_00_tp_rank_0[01]_pp_rank_00\.pt: not a parameter of \S*config\.json's model that NxD's converter lays out/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.ok(!existsSync(join(tmp, 'out-bias')));
  // A name the converter replicates: the first copy, as the converter keeps it.
  await withExtra(join(tmp, 'with-scale'), 'model.layers.0.extra_scale');
  r = await run(['convert', '--to', 'hf', join(tmp, 'with-scale'), join(tmp, 'out-scale'), '--hf-model', example]);
  assert.equal(r.code, 0, r.stderr);
  const got = await openCheckpoint(join(tmp, 'out-scale'));
  const orig = await openCheckpoint(example);
  try {
    assert.ok((await bytesOf(got.tensors.get('model.layers.0.extra_scale')!)).equals(await bytesOf(orig.tensors.get('model.layers.0.input_layernorm.weight')!)));
    assert.equal(got.tensors.size, 22);
  } finally {
    await got.close();
    await orig.close();
  }
});

/** The README's side-by-side table: every example of NxDT's conversion docs, scaled to the tiny model (tp 8 → 2, pp 4 → 2, 32 layers → 2). */
test('README: each NxDT converter example, with the command name replaced, round-trips the original bytes', async () => {
  const full = join(tmp, 'docs', 'hf');
  let r = await run(['convert', '--to', 'torch', example, join(full, 'pytorch_model.bin'), '-q']);
  assert.equal(r.code, 0, r.stderr);
  const sizes = ['--tp_size', '2', '--pp_size', '2'];
  const same = async (ckpt: string, what: string): Promise<void> => {
    const a = await openCheckpoint(example);
    const b = await openCheckpoint(ckpt);
    try {
      assert.equal(await assertSameTensors(a.tensors, b.tensors, what), 21);
    } finally {
      await a.close();
      await b.close();
    }
  };
  const d = (n: string): string => join(tmp, 'docs', n);
  // 1. HF style: HF → NxDT, then NxDT → HF.
  r = await run(['nxd-convert', '--model_style', 'hf', '--hw_backend', 'trn1', '--input_dir', join(full, 'pytorch_model.bin'), '--output_dir', d('converted_hf_style_hf_to_nxdt_tp8pp4/'), '--save_xser', 'True', '--config', config, ...sizes, '--n_layers', '2', '--kv_size_multiplier', '1', '--qkv_linear', 'True', '--convert_from_full_state']);
  assert.equal(r.code, 0, r.stderr);
  r = await run(['nxd-convert', '--model_style', 'hf', '--hw_backend', 'trn1', '--input_dir', d('converted_hf_style_hf_to_nxdt_tp8pp4/model'), '--output_dir', d('converted_hf_style_nxdt_to_hf_tp8pp4/'), '--load_xser', 'True', '--config', config, ...sizes, '--kv_size_multiplier', '1', '--qkv_linear', 'True', '--convert_to_full_state']);
  assert.equal(r.code, 0, r.stderr);
  await same(d('converted_hf_style_nxdt_to_hf_tp8pp4/checkpoint.pt'), 'hf style');
  // 2. Megatron style: the docs' input_dir is the previous full-state output directory (checkpoint.pt).
  r = await run(['nxd-convert', '--model_style', 'megatron', '--hw_backend', 'trn1', '--input_dir', d('converted_hf_style_nxdt_to_hf_tp8pp4/'), '--output_dir', d('meg_nxdt_hf3_nxdt3'), '--config', config, '--save_xser', 'True', ...sizes, '--n_layers', '2', '--kv_size_multiplier', '1', '--qkv_linear', 'True', '--convert_from_full_state']);
  assert.equal(r.code, 0, r.stderr);
  r = await run(['nxd-convert', '--model_style', 'megatron', '--hw_backend', 'trn1', '--input_dir', d('meg_nxdt_hf3_nxdt3/model'), '--output_dir', d('megatron-tp8pp4-nxdt-to-hf4'), '--load_xser', 'True', '--config', config, ...sizes, '--kv_size_multiplier', '1', '--qkv_linear', 'True', '--convert_to_full_state']);
  assert.equal(r.code, 0, r.stderr);
  await same(d('megatron-tp8pp4-nxdt-to-hf4/checkpoint.pt'), 'megatron style');
  // 3. "Conversion Example" (--convert_from_full_state given twice): the same files as 1.
  r = await run(['nxd-convert', '--model_style', 'hf', '--hw_backend', 'trn1', '--input_dir', join(full, 'pytorch_model.bin'), '--output_dir', d('nxdt_checkpoint'), '--save_xser', 'True', '--convert_from_full_state', '--config', config, ...sizes, '--n_layers', '2', '--kv_size_multiplier', '1', '--qkv_linear', 'True', '--convert_from_full_state']);
  assert.equal(r.code, 0, r.stderr);
  const ls = async (p: string): Promise<string[]> => (await readdir(p, { recursive: true })).map(String).filter((n) => !n.startsWith('shardshift')).sort();
  assert.deepEqual(await ls(d('nxdt_checkpoint')), await ls(d('converted_hf_style_hf_to_nxdt_tp8pp4')));
  // 4. --hf_model_name instead of --input_dir (a local directory here; hub ids download), --qkv_linear False.
  r = await run(['nxd-convert', '--model_style', 'hf', '--hw_backend', 'trn1', '--hf_model_name', example, '--output_dir', d('from_hub'), '--save_xser', 'True', '--config', config, ...sizes, '--n_layers', '2', '--kv_size_multiplier', '1', '--qkv_linear', 'False', '--convert_from_full_state']);
  assert.equal(r.code, 0, r.stderr);
  const sh = await openNxdShards(d('from_hub'));
  assert.ok(sh.rank(0, 0).tensors.has('model.layers.0.self_attn.q_proj.weight'), 'qkv_linear False: separate q/k/v_proj');
  await sh.close();
  r = await run(['nxd-convert', '--hw_backend', 'trn1', '--input_dir', d('from_hub/model'), '--output_dir', d('from_hub_back'), '--load_xser', 'True', '--config', config, ...sizes, '--convert_to_full_state']);
  assert.equal(r.code, 0, r.stderr);
  await same(d('from_hub_back/checkpoint.pt'), '--hf_model_name');
  // --n_layers is checked against the config.
  r = await run(['nxd-convert', '--hw_backend', 'trn1', '--input_dir', join(full, 'pytorch_model.bin'), '--output_dir', d('bad-layers'), '--config', config, '--n_layers', '32', '--convert_from_full_state']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--n_layers 32 disagrees with num_hidden_layers 2/);
});

test('--hw-backend must be given when trn1 and trn2 differ; convert --to hf carries the reference model\'s side files', async () => {
  let r = await run(['convert', '--to', 'nxd', example, join(tmp, 'hw-missing'), '--tp', '4', '--qkv-linear', '--kv-size-multiplier', '2']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /give --hw_backend trn1 or trn2: with qkv_linear, 2 KV heads and tp_size 4/);
  const nxd = join(tmp, 'hw-trn1');
  r = await run(['convert', '--to', 'nxd', example, nxd, '--tp', '4', '--qkv-linear', '--kv-size-multiplier', '2', '--hw-backend', 'trn1', '-q']);
  assert.equal(r.code, 0, r.stderr);
  r = await run(['convert', '--to', 'hf', nxd, join(tmp, 'hw-back-none'), '--hf-model', example]);
  assert.equal(r.code, 2, r.stderr);
  const back = join(tmp, 'hw-back');
  r = await run(['convert', '--to', 'hf', nxd, back, '--hf-model', example, '--hw-backend', 'trn1', '-q']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(existsSync(join(back, 'config.json')) && existsSync(join(back, 'generation_config.json')));
  const a = await openCheckpoint(example);
  const b = await openCheckpoint(back);
  try {
    assert.equal(await assertSameTensors(a.tensors, b.tensors, 'trn1 tp 4 kvm 2'), 21);
  } finally {
    await a.close();
    await b.close();
  }
});

test('Megatron on the other side: HF → Megatron (TP2 legacy) → NxD (tp 2, pp 2, kvm 2, fuse_qkv) → Megatron torch_dist → HF keeps every byte', async () => {
  const meg = join(tmp, 'mx.meg');
  let r = await run(['convert', '--to', 'megatron', example, meg, '--ckpt-format', 'torch', '--tp', '2', '-q']);
  assert.equal(r.code, 0, r.stderr);
  const nxd = join(tmp, 'mx.nxd');
  r = await run(['convert', '--to', 'nxd', meg, nxd, '--tp', '2', '--pp', '2', '--qkv-linear', '--fuse-qkv', '--kv-size-multiplier', '2', '--hw-backend', 'trn2', '--xser', '-q']);
  assert.equal(r.code, 0, r.stderr);
  const back = join(tmp, 'mx.meg2');
  r = await run(['convert', '--to', 'megatron', nxd, back, '--hf-model', example, '--qkv-linear', '--fuse-qkv', '--hw-backend', 'trn2', '-q']);
  assert.equal(r.code, 0, r.stderr);
  const hf = join(tmp, 'mx.hf');
  r = await run(['convert', '--to', 'hf', back, hf, '-q']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(example, 'model.safetensors'))), 'byte-identical to the original');
  // Without a config an NxD source is refused with the fix in the message.
  r = await run(['convert', '--to', 'megatron', nxd, join(tmp, 'mx.bad'), '-q']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /does not record its model config; give --hf-model/);
});
