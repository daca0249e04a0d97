/**
 * NxD Training checkpoints against NxD's own converter (test/oracle/vendor, unmodified
 * checkpoint_converter.py run with real torch; see test/oracle/nxd_oracle.py for the CPU
 * stand-ins of its torch_xla / neuronx_distributed imports):
 * - `shardshift nxd-convert` given the converter's own flags writes shards holding exactly the
 *   converter's tensors (same names, order, dtypes, shapes, bytes) — hf and megatron styles, GQA
 *   and MHA, trn1 and trn2, kv_size_multiplier, fuse_qkv, plain and xser;
 * - shardshift reads the converter's shards (xser with TensorReference + tensor_N.pt, xser as the
 *   converter leaves it on CPU, plain) and the HF result gives transformers the original logits;
 * - the converter reads shardshift's shards back (including xser) to the original logits;
 * - Mistral and Qwen3 (whose layouts come from their family tables) as Llama is.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { cli } from '../helpers/cli.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-nxd-interop-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

async function converter(flags: string[], xserMode: 'cpu' | 'xla' = 'cpu'): Promise<void> {
  const prev = process.env.NXD_XSER;
  process.env.NXD_XSER = xserMode;
  try {
    await runOracle('nxd_oracle.py', ['convert', ...flags], { timeoutMs: 180_000 });
  } finally {
    if (prev === undefined) delete process.env.NXD_XSER;
    else process.env.NXD_XSER = prev;
  }
}

interface Logits {
  max_abs_diff: number;
  missing: string[];
  unexpected: string[];
}

const made = new Set<string>();
async function model(name: string): Promise<string> {
  const dir = join(tmp, `model-${name}`);
  if (!made.has(name)) {
    await runOracle('nxd_oracle.py', ['make', dir, name]);
    made.add(name);
  }
  return dir;
}

interface Case {
  label: string;
  model: 'gqa' | 'gqa8' | 'mha' | 'mqa' | 'mistral' | 'qwen3';
  flags: string[];
  xser?: 'cpu' | 'xla';
  /** The converter's own read-back works for this layout. */
  converterReadsBack: boolean;
}

const CASES: Case[] = [
  { label: 'hf, GQA 8q/2kv, trn1 Q order, tp 4 pp 2 kvm 2, xser (externalised)', model: 'gqa8', flags: ['--model_style', 'hf', '--hw_backend', 'trn1', '--tp_size', '4', '--pp_size', '2', '--kv_size_multiplier', '2', '--qkv_linear', 'True', '--save_xser', 'True'], xser: 'xla', converterReadsBack: true },
  { label: 'hf, GQA 4q/2kv, trn2, tp 2 pp 2 kvm 2, fuse_qkv', model: 'gqa', flags: ['--model_style', 'hf', '--hw_backend', 'trn2', '--tp_size', '2', '--pp_size', '2', '--kv_size_multiplier', '2', '--qkv_linear', 'True', '--fuse_qkv', 'True'], converterReadsBack: true },
  { label: 'hf, MQA 4q/1kv, trn1, tp 2 pp 2 kvm 2, fuse_qkv', model: 'mqa', flags: ['--model_style', 'hf', '--hw_backend', 'trn1', '--tp_size', '2', '--pp_size', '2', '--kv_size_multiplier', '2', '--qkv_linear', 'True', '--fuse_qkv', 'True'], converterReadsBack: false },
  { label: 'hf, MHA (non-GQA), trn2, tp 2, qkv_linear', model: 'mha', flags: ['--model_style', 'hf', '--hw_backend', 'trn2', '--tp_size', '2', '--pp_size', '1', '--qkv_linear', 'True'], converterReadsBack: true },
  { label: 'megatron, MHA (non-GQA, query_key_value), tp 2 pp 2, xser as the converter writes it on CPU', model: 'mha', flags: ['--model_style', 'megatron', '--hw_backend', 'trn1', '--tp_size', '2', '--pp_size', '2', '--save_xser', 'True'], xser: 'cpu', converterReadsBack: true },
  { label: 'megatron, GQA (query + key_value), tp 2 pp 2, qkv_linear', model: 'gqa', flags: ['--model_style', 'megatron', '--hw_backend', 'trn1', '--tp_size', '2', '--pp_size', '2', '--qkv_linear', 'True'], converterReadsBack: true },
  // Other dense families, through the family tables (the converter itself goes by names).
  { label: 'Mistral, hf, GQA 4q/2kv, trn2, tp 2 pp 2 kvm 2, fuse_qkv', model: 'mistral', flags: ['--model_style', 'hf', '--hw_backend', 'trn2', '--tp_size', '2', '--pp_size', '2', '--kv_size_multiplier', '2', '--qkv_linear', 'True', '--fuse_qkv', 'True'], converterReadsBack: true },
  { label: 'Qwen3 (q/k norms replicated), hf, GQA 4q/2kv, trn1, tp 2 pp 2, qkv_linear', model: 'qwen3', flags: ['--model_style', 'hf', '--hw_backend', 'trn1', '--tp_size', '2', '--pp_size', '2', '--qkv_linear', 'True'], converterReadsBack: true },
];

for (const c of CASES) {
  test(`NxD converter vs shardshift — ${c.label}`, async () => {
    const slug = c.label.replace(/[^A-Za-z0-9]+/g, '-').slice(0, 60);
    const m = await model(c.model);
    const cfg = join(m, 'config.json');
    const ref = join(m, 'ref_logits.json');
    const io = ['--input_dir', join(m, 'full', 'pytorch_model.bin'), '--config', cfg, '--n_layers', '4'];
    const theirs = join(tmp, `${slug}-conv`);
    const ours = join(tmp, `${slug}-ours`);
    await converter([...c.flags, ...io, '--output_dir', theirs, '--convert_from_full_state'], c.xser);
    const r = await run(['nxd-convert', ...c.flags, ...io, '--output_dir', ours, '--convert_from_full_state', '-q']);
    assert.equal(r.code, 0, r.stderr);
    // 1. The same shards, tensor for tensor, in the converter's key order.
    const dumpTheirs = await runOracle('nxd_oracle.py', ['dump', join(theirs, 'model')]);
    const dumpOurs = await runOracle('nxd_oracle.py', ['dump', join(ours, 'model')]);
    assert.deepEqual(JSON.parse(dumpOurs), JSON.parse(dumpTheirs));
    assert.equal(dumpOurs, dumpTheirs, 'key order within the shards');
    // 2. shardshift reads the converter's shards: transformers gets the original logits.
    const hf = join(tmp, `${slug}-hf`);
    const hw = c.flags[c.flags.indexOf('--hw_backend') + 1]!;
    const e = await run(['convert', '--to', 'hf', theirs, hf, '--hf-model', m, '--hw-backend', hw, '-q']);
    assert.equal(e.code, 0, e.stderr);
    const l1 = JSON.parse(await runOracle('nxd_oracle.py', ['logits', hf, cfg, ref])) as Logits;
    assert.equal(l1.max_abs_diff, 0, `logits from shardshift's export differ by ${l1.max_abs_diff}`);
    // 3. The converter's full-state file from shardshift's nxd-convert --convert_to_full_state.
    const full = join(tmp, `${slug}-full`);
    const readFlags = c.flags.filter((f, i, a) => f !== '--save_xser' && a[i - 1] !== '--save_xser');
    const load = c.flags.includes('--save_xser') ? ['--load_xser', 'True'] : [];
    const t = await run(['nxd-convert', ...readFlags, ...load, '--input_dir', join(theirs, 'model'), '--config', cfg, '--output_dir', full, '--convert_to_full_state', '-q']);
    assert.equal(t.code, 0, t.stderr);
    const l2 = JSON.parse(await runOracle('nxd_oracle.py', ['logits', join(full, 'checkpoint.pt'), cfg, ref])) as Logits;
    assert.deepEqual([l2.missing, l2.unexpected, l2.max_abs_diff], [[], [], 0]);
    // 4. The converter reads shardshift's shards back.
    if (c.converterReadsBack) {
      const back = join(tmp, `${slug}-conv-back`);
      await converter([...readFlags, ...load, '--input_dir', join(ours, 'model'), '--config', cfg, '--output_dir', back, '--convert_to_full_state']);
      const l3 = JSON.parse(await runOracle('nxd_oracle.py', ['logits', join(back, 'checkpoint.pt'), cfg, ref])) as Logits;
      assert.deepEqual([l3.missing, l3.unexpected, l3.max_abs_diff], [[], [], 0]);
    }
  });
}
