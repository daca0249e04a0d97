/**
 * OLMoE's bad inputs on the published OLMoE-1B-7B-0125 layout (test/published, truncated and
 * written sparse): each refused by name before anything is written.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { truncatedPublished, writeSparseCheckpoint, type TensorSpec } from '../helpers/published.js';
import { runCli } from '../helpers/cli.js';

let tmp: string;
let config: Record<string, unknown>;
let tensors: TensorSpec[];
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-olmoe-'));
  ({ config, tensors } = await truncatedPublished('olmoe-1b-7b-0125'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

let n = 0;
async function convert(cfg: Record<string, unknown>, list: readonly TensorSpec[]): Promise<{ code: number | null; stderr: string; out: string }> {
  const dir = join(tmp, `case-${++n}`);
  await writeSparseCheckpoint(dir, cfg, list, { data: 'holes' });
  const out = join(tmp, `out-${n}`);
  return { ...(await runCli(['convert', '--to', 'megatron', dir, out, '--dry-run'])), out };
}

test('OLMoE with clip_qkv, or with grouped KV heads, is refused by name: megatron-core cannot compute either the same way', async () => {
  const a = await convert({ ...config, clip_qkv: 8 }, tensors);
  assert.equal(a.code, 1, a.stderr);
  assert.match(a.stderr, /clip_qkv=8; megatron-core's attention does not clamp q\/k\/v/);
  const b = await convert({ ...config, num_key_value_heads: 4 }, tensors);
  assert.equal(b.code, 1, b.stderr);
  assert.match(b.stderr, /num_key_value_heads \(4\) differs from num_attention_heads \(16\); Megatron-Bridge's OLMoE attention sizes its full-width k norm by the query heads/);
  for (const r of [a, b]) assert.ok(await stat(r.out).then(() => false, () => true));
});

test('a q_norm of one head (Qwen3-style) in an OLMoE checkpoint is a shape error naming the tensor', async () => {
  const r = await convert(config, tensors.map((t): TensorSpec => (t[0] === 'model.layers.0.self_attn.q_norm.weight' ? [t[0], t[1], [128]] : t)));
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /model\.layers\.0\.self_attn\.q_norm\.weight/);
  assert.match(r.stderr, /2048/);
});

test('legacy rank files at TP > 1 are refused (the OLMoE attention cannot run a TP shard); TP 1 plans', async () => {
  const dir = join(tmp, 'tp');
  await writeSparseCheckpoint(dir, config, tensors, { data: 'holes' });
  const r = await runCli(['convert', '--to', 'megatron', dir, join(tmp, 'tp-out'), '--dry-run', '--ckpt-format', 'torch', '--tp', '2']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /--ckpt-format torch --tp 2: Megatron-Bridge's OLMoE attention normalises q and k over all heads/);
  const ok = await runCli(['convert', '--to', 'megatron', dir, join(tmp, 'tp-out'), '--dry-run', '--ckpt-format', 'torch', '--ep', '8']);
  assert.equal(ok.code, 0, ok.stderr);
});
