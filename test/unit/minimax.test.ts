/**
 * MiniMax-M2's bad inputs and plan facts on the published MiniMax-M2.7 layout (test/published:
 * the hub's names, shapes and FP8 dtypes, truncated to two layers and eight experts, written
 * sparse): each refusal names what it refuses, with nothing written.
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
  tmp = await mkdtemp(join(tmpdir(), 'ss-minimax-'));
  ({ config, tensors } = await truncatedPublished('minimax-m2.7'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

let n = 0;
async function convert(cfg: Record<string, unknown>, list: readonly TensorSpec[], ...extra: string[]): Promise<{ code: number | null; stdout: string; stderr: string; out: string }> {
  const dir = join(tmp, `case-${++n}`);
  await writeSparseCheckpoint(dir, cfg, list, { data: 'holes' });
  const out = join(tmp, `out-${n}`);
  return { ...(await runCli(['convert', '--to', 'megatron', dir, out, ...extra])), out };
}
const absent = (p: string): Promise<boolean> => stat(p).then(() => false, () => true);

test('MTP tensors in a MiniMax-M2 checkpoint are refused by name (no Megatron mapping); --drop-mtp leaves them out by a named rule', async () => {
  const H = config.hidden_size as number;
  const mtp: TensorSpec[] = [['model.mtp.0.eh_proj.weight', 'BF16', [H, 2 * H]], ['model.mtp.0.enorm.weight', 'BF16', [H]]];
  const r = await convert(config, [...tensors, ...mtp]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /holds 2 multi-token-prediction tensor\(s\) \(model\.mtp\.0\.eh_proj\.weight, model\.mtp\.0\.enorm\.weight\); MiniMax-M2's MTP modules have no Megatron mapping .* --drop-mtp converts the model without them/);
  assert.ok(await absent(r.out));
  const d = await convert(config, [...tensors, ...mtp], '--dry-run', '--json', '--drop-mtp');
  assert.equal(d.code, 0, d.stderr);
  const plan = (JSON.parse(d.stdout) as { plan: { skipped: Array<{ name: string; reason: string }> } }).plan;
  assert.deepEqual(plan.skipped.map((s) => [s.name, s.reason]), mtp.map((t) => [t[0], 'multi-token prediction layer dropped (--drop-mtp)']));
});

test('lightning attention layers, another router score and a shared expert are refused by field name; nothing is written', async () => {
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ attn_type_list: [0, 1] }, /attn_type_list holds non-softmax \(lightning\) attention layers/],
    [{ scoring_func: 'softmax' }, /scoring_func "softmax"; MiniMax-M2's router .* scores with a sigmoid/],
    [{ shared_intermediate_size: 512 }, /shared_intermediate_size 512: MiniMax-M2 checkpoints have no shared expert/],
    [{ rotary_dim: 63 }, /rotary_dim 63 is not an even number of dims of the 128-dim heads/],
  ];
  for (const [edit, re] of cases) {
    const r = await convert({ ...config, ...edit }, tensors);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, re);
    assert.ok(await absent(r.out));
  }
});

test('legacy rank files at more TP ranks than KV heads are refused (the k norm would be shared by ranks); the plan keeps the expert bias float32', async () => {
  const r = await convert(config, tensors, '--ckpt-format', 'torch', '--tp', '16', '--dry-run');
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /--tp 16: .* splits its full-width k norm by KV head, and with more TP ranks than its 8 KV heads/);
  const ok = await convert(config, tensors, '--dry-run', '--json');
  assert.equal(ok.code, 0, ok.stderr);
  const plan = (JSON.parse(ok.stdout) as { plan: { dtypeExceptions: Array<{ name: string; dtype: string }> } }).plan;
  assert.ok(plan.dtypeExceptions.some((x) => x.name === 'decoder.layers.mlp.router.expert_bias' || (x.name.endsWith('mlp.router.expert_bias') && x.dtype === 'F32')), JSON.stringify(plan.dtypeExceptions));
});
