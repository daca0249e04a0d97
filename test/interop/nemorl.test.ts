/**
 * NeMo RL policy checkpoints → HF: runs laid out as NeMo RL writes them (real dcp.save of a
 * model after one training step, with optimizer state and the run's tokenizer), in DTensor v1
 * (wrapped under "model") and v2 (policy/weights/model, flat) layouts, and the Megatron backend
 * (torch_dist saved by megatron-core). The HF result runs in transformers with the trained
 * model's logits.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { cli } from '../helpers/cli.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-nemorl-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

for (const [layout, c] of [
  ['v1', 'llama_gqa'],
  ['v2', 'qwen3_qknorm'],
] as const) {
  test(`DTensor ${layout} (${c}): convert_dcp_to_hf flags → HF with the trained model's logits and the run's tokenizer`, async () => {
    const step = join(tmp, `step_${layout}`);
    await runOracle('nemorl_oracle.py', ['make', step, layout, c]);
    const out = join(tmp, `${layout}-hf`);
    const r = await run(['dcp-to-hf', `--config=${join(step, 'config.yaml')}`, `--dcp-ckpt-path=${join(step, 'policy', 'weights')}`, `--hf-ckpt-path=${out}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /Saved HF checkpoint to:/);
    const cmp = JSON.parse(await runOracle('models_oracle.py', ['compare_hf', out, join(step, 'trained-reference')])) as { max_abs_diff: number };
    assert.equal(cmp.max_abs_diff, 0);
    assert.match(await readFile(join(out, 'tokenizer_config.json'), 'utf8'), /the run's own tokenizer/);
  });
}

test('Megatron-backend runs (policy/weights/iter_*) go through the torch_dist reader', async () => {
  const step = join(tmp, 'step_meg');
  const weights = join(step, 'policy', 'weights');
  await mkdir(join(step, 'policy'), { recursive: true });
  await runOracle('megatron_oracle.py', ['save', weights, 'llama'], { timeoutMs: 180_000 });
  const out = join(tmp, 'meg-hf');
  const r = await run(['steps', 'run', 'convert/dcp_to_hf', `dcp_ckpt_path=${weights}`, `hf_model_name=${join(weights, 'hf_ref')}`, `hf_ckpt_path=${out}`, 'dtype=float32']);
  assert.equal(r.code, 0, r.stderr);
  const cmp = JSON.parse(await runOracle('megatron_oracle.py', ['check_hf', out, weights])) as { max_abs_diff: number; missing: string[]; unexpected: string[] };
  assert.deepEqual([cmp.missing, cmp.unexpected], [[], []]);
  assert.ok(cmp.max_abs_diff < 1e-5);
});

test('bad input: optimizer state only, and a run with no weights', async () => {
  const step = join(tmp, 'step_v1');
  let r = await run(['dcp-to-hf', `--config=${join(step, 'config.yaml')}`, `--dcp-ckpt-path=${join(step, 'policy', 'optimizer')}`, `--hf-ckpt-path=${join(tmp, 'x1')}`]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /holds no model weights — only optimizer state \(optim\.state\./);
  await mkdir(join(tmp, 'empty', 'policy', 'weights'), { recursive: true });
  r = await run(['dcp-to-hf', `--dcp-ckpt-path=${join(tmp, 'empty', 'policy', 'weights')}`, `--hf-ckpt-path=${join(tmp, 'x2')}`, `--hf-model-name=${join(tmp, 'hf-llama_gqa')}`]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /no weights: neither .*\.metadata \(DTensor v1\) nor .*model\/\.metadata \(DTensor v2\) nor an iter_\* Megatron checkpoint/);
});
