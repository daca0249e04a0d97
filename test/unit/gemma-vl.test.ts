/**
 * Gemma 2 / 3 and the VL wrappers' refusals on their published layouts (test/published, truncated,
 * written sparse): each one message naming what it refuses, exit 1, nothing written.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { truncatedPublished, writeSparseCheckpoint, type TensorSpec } from '../helpers/published.js';
import { runCli } from '../helpers/cli.js';

let tmp: string;
const models = new Map<string, { config: Record<string, unknown>; tensors: TensorSpec[] }>();
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-gemma-vl-'));
  for (const id of ['gemma-2-9b', 'gemma-3-1b', 'gemma-3-27b', 'qwen3-vl-30b-a3b', 'qwen2.5-vl-7b']) models.set(id, await truncatedPublished(id));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

let n = 0;
async function convert(id: string, edit: (c: Record<string, unknown>) => Record<string, unknown>, ...extra: string[]): Promise<{ code: number | null; stdout: string; stderr: string; out: string }> {
  const { config, tensors } = models.get(id)!;
  const dir = join(tmp, `case-${++n}`);
  await writeSparseCheckpoint(dir, edit({ ...config }), tensors, { data: 'holes' });
  const out = join(tmp, `out-${n}`);
  return { ...(await runCli(['convert', '--to', 'megatron', dir, out, '--dry-run', ...extra])), out };
}
const absent = (p: string): Promise<boolean> => stat(p).then(() => false, () => true);

test('Gemma 2: another activation or a sliding pattern Megatron-Bridge cannot express is refused by name', async () => {
  const a = await convert('gemma-2-9b', (c) => ({ ...c, hidden_activation: 'gelu' }));
  assert.equal(a.code, 1, a.stderr);
  assert.match(a.stderr, /hidden_activation "gelu"; Gemma 2's map carries the tanh-approximated GeGLU/);
  const layers = (models.get('gemma-2-9b')!.config.num_hidden_layers as number);
  const b = await convert('gemma-2-9b', (c) => ({ ...c, layer_types: Array.from({ length: layers }, () => 'full_attention') }));
  assert.equal(b.code, 1, b.stderr);
  assert.match(b.stderr, /Megatron-Bridge's Gemma 2 attention slides on every other layer from layer 0/);
  for (const r of [a, b]) assert.ok(await absent(r.out));
});

test('Gemma 3: soft-capping and a local / global pattern other than 5 : 1 are refused by name', async () => {
  const a = await convert('gemma-3-1b', (c) => ({ ...c, final_logit_softcapping: 30.0 }));
  assert.equal(a.code, 1, a.stderr);
  assert.match(a.stderr, /final_logit_softcapping 30; Megatron-Bridge's Gemma 3 model has no soft-capping/);
  const layers = (models.get('gemma-3-1b')!.config.num_hidden_layers as number);
  const b = await convert('gemma-3-1b', (c) => ({ ...c, layer_types: Array.from({ length: layers }, (_, i) => (i % 2 ? 'full_attention' : 'sliding_attention')) }));
  assert.equal(b.code, 1, b.stderr);
  assert.match(b.stderr, /interleaves 5 sliding-window layers with 1 global one/);
});

test('a Gemma 3 VL config that leaves vocab_size and the norm eps to transformers plans with its defaults (262208 rows)', async () => {
  const { config } = models.get('gemma-3-27b')!;
  assert.equal((config.text_config as Record<string, unknown>).vocab_size, undefined, 'the published text_config names no vocab_size');
  const r = await convert('gemma-3-27b', (c) => c, '--json');
  assert.equal(r.code, 0, r.stderr);
  const notes = (JSON.parse(r.stdout) as { plan: { notes: string[] } }).plan.notes;
  assert.ok(notes.some((x) => /^vocab 262208 → padded 262272/.test(x)), notes.join('\n'));
});

test('VL wrappers refuse legacy rank files by name (their Megatron model keeps the language model under language_model.)', async () => {
  for (const id of ['qwen3-vl-30b-a3b', 'qwen2.5-vl-7b', 'gemma-3-27b']) {
    const r = await convert(id, (c) => c, '--ckpt-format', 'torch');
    assert.equal(r.code, 1, `${id}: ${r.stderr}`);
    assert.match(r.stderr, /is a vision-language wrapper .* legacy rank files are not written for; use --ckpt-format torch_dist/, id);
  }
});
