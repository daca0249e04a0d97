/**
 * Megatron-Bridge LoRA checkpoints (saved by real megatron-core with the layout Megatron-Bridge's
 * ParallelLinearAdapter writes) against peft + transformers:
 * - `lora-to-hf --adapter-only` writes the same adapter_config.json and adapter_model.safetensors,
 *   byte for byte, as an independent Python implementation of Megatron-Bridge's save_hf_adapter
 *   split; PeftModel.from_pretrained loads it and its logits equal the merged model's;
 * - `lora-to-hf` (merged) equals peft's merge_and_unload of that adapter bit for bit;
 * - `merge-lora --backend megatron-bridge` writes a Megatron checkpoint whose HF export is the
 *   merged HF checkpoint byte for byte (and `--export-hf` writes the same).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile, unlink, readdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { convertHfToMegatron, convertMegatronToHf } from '../../src/plan/model-convert.js';
import { exportMbAdapterToPeft, mergeMbToHf, mergeMbToMegatron } from '../../src/plan/lora-mb.js';
import { mergeLora } from '../../src/plan/lora-convert.js';
import { cli } from '../helpers/cli.js';

interface Case {
  name: string;
  arch: 'qwen2' | 'llama';
  dtype: 'float32' | 'bfloat16';
  dim: number;
  alpha: number;
  targets: string[];
}

const CASES: Case[] = [
  { name: 'qwen2-f32-all', arch: 'qwen2', dtype: 'float32', dim: 8, alpha: 16, targets: ['linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2'] },
  { name: 'llama-bf16-qkv-fc1', arch: 'llama', dtype: 'bfloat16', dim: 4, alpha: 8, targets: ['linear_qkv', 'linear_fc1'] },
];

let root: string;
const dir = (c: Case, what: string): string => join(root, c.name, what);

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'ss-lora-mb-'));
  for (const c of CASES) {
    await runOracle('lora_oracle.py', ['make_base', dir(c, 'hf'), c.arch, c.dtype]);
    await convertHfToMegatron(dir(c, 'hf'), dir(c, 'megatron'), { dtype: c.dtype === 'float32' ? 'F32' : 'BF16' });
    await runOracle('lora_oracle.py', ['make_mb', dir(c, 'hf'), dir(c, 'lora'), String(c.dim), String(c.alpha), c.targets.join(',')], { timeoutMs: 600_000 });
    await runOracle('lora_oracle.py', ['mb_to_peft', dir(c, 'hf'), dir(c, 'lora'), dir(c, 'peft-ref')]);
    await runOracle('lora_oracle.py', ['merge', dir(c, 'hf'), dir(c, 'peft-ref'), dir(c, 'merged-ref')]);
  }
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

interface Cmp {
  only_ref: string[];
  only_ours: string[];
  tensors: Record<string, { n: number; diff: number; max_ulp: number }>;
}
async function compare(a: string, b: string): Promise<{ differing: number; n: number }> {
  const r = JSON.parse(await runOracle('lora_oracle.py', ['compare', a, b])) as Cmp;
  assert.deepEqual([r.only_ref, r.only_ours], [[], []], 'same tensor names');
  const t = Object.values(r.tensors);
  return { differing: t.reduce((s, x) => s + x.diff, 0), n: t.reduce((s, x) => s + x.n, 0) };
}

for (const c of CASES) {
  test(`${c.name}: adapter-only export equals Megatron-Bridge's save_hf_adapter layout byte for byte`, async () => {
    const out = dir(c, 'peft-ours');
    await exportMbAdapterToPeft(dir(c, 'lora'), out, { hfModel: dir(c, 'hf') });
    assert.equal(await readFile(join(out, 'adapter_config.json'), 'utf8'), await readFile(dir(c, 'peft-ref') + '/adapter_config.json', 'utf8'));
    assert.ok((await readFile(join(out, 'adapter_model.safetensors'))).equals(await readFile(join(dir(c, 'peft-ref'), 'adapter_model.safetensors'))), 'adapter_model.safetensors identical');
  });

  test(`${c.name}: merged HF export equals peft's merge_and_unload of the exported adapter bit for bit`, async (t) => {
    const out = dir(c, 'merged-ours');
    await mergeMbToHf(dir(c, 'megatron'), dir(c, 'lora'), out, { hfModel: dir(c, 'hf') });
    const r = await compare(dir(c, 'merged-ref'), out);
    t.diagnostic(`ulp-stats mb-${c.name}: ${r.differing} of ${r.n} elements differ from peft`);
    assert.equal(r.differing, 0);
    const changed = await compare(dir(c, 'hf'), out);
    assert.ok(changed.differing > 0, 'the adapter changes the model');
  });

  test(`${c.name}: merge-lora --backend megatron-bridge: the merged Megatron checkpoint exports to the merged HF checkpoint byte for byte`, async () => {
    const meg = dir(c, 'merged-megatron');
    await mergeMbToMegatron(dir(c, 'megatron'), dir(c, 'lora'), meg, { hfModel: dir(c, 'hf') });
    const back = dir(c, 'merged-megatron-hf');
    await convertMegatronToHf(meg, back, {});
    assert.ok((await readFile(join(back, 'model.safetensors'))).equals(await readFile(join(dir(c, 'merged-ours'), 'model.safetensors'))));
    const viaCli = dir(c, 'cli-meg');
    const r = await run(['merge-lora', '--backend', 'megatron-bridge', '--adapter', dir(c, 'lora'), '--base', dir(c, 'megatron'), '--hf-model', dir(c, 'hf'), '-q', viaCli, '--export-hf', dir(c, 'cli-hf')]);
    assert.equal(r.code, 0, r.stderr);
    assert.ok((await readFile(join(dir(c, 'cli-hf'), 'model.safetensors'))).equals(await readFile(join(dir(c, 'merged-ours'), 'model.safetensors'))));
    assert.ok(existsSync(join(viaCli, 'iter_0000000', 'hf', 'config.json')));
  });
}

test('the exported adapter applied by peft (unmerged) gives the merged model\'s logits (fp32 base, tolerance 1e-5 × max |logit|)', async () => {
  const c = CASES[0]!;
  const r = JSON.parse(await runOracle('lora_oracle.py', ['logits_compare', dir(c, 'hf'), dir(c, 'peft-ours'), dir(c, 'merged-ours')])) as { max_abs_diff: number; max_abs: number };
  assert.ok(r.max_abs_diff <= 1e-5 * Math.max(1, r.max_abs), `logits differ by ${r.max_abs_diff} (max |logit| ${r.max_abs})`);
});

test('the exported adapter records its base: merge-lora (peft) reproduces the merge; a base with other weights is refused unless --force-base', async () => {
  const c = CASES[0]!;
  const adapter = dir(c, 'peft-ours');
  assert.ok(existsSync(join(adapter, 'shardshift-adapter.json')));
  const out = join(root, 'peft-merge-of-export');
  const r = await mergeLora(dir(c, 'hf'), adapter, out);
  assert.ok(r.plan.notes!.some((n) => /base checksum recorded in shardshift-adapter\.json matches/.test(n)), r.plan.notes!.join('\n'));
  assert.ok((await readFile(join(out, 'model.safetensors'))).equals(await readFile(join(dir(c, 'merged-ours'), 'model.safetensors'))));
  // same name, same shapes, one weight changed
  const tampered = join(root, 'tampered', 'hf');
  await mkdir(join(root, 'tampered'));
  await cp(dir(c, 'hf'), tampered, { recursive: true });
  const f = join(tampered, 'model.safetensors');
  const buf = await readFile(f);
  buf[buf.length - 100] = buf[buf.length - 100]! ^ 0x40;
  await writeFile(f, buf);
  const bad = await run(['merge-lora', '--adapter', adapter, '--base', tampered, join(root, 'x-tampered')]);
  assert.equal(bad.code, 1, bad.stderr);
  assert.match(bad.stderr, /the adapter records the base it was exported for, and .* is not it: model\.safetensors has other contents .*--force-base/);
  assert.ok(!existsSync(join(root, 'x-tampered')));
  const forced = await run(['merge-lora', '--adapter', adapter, '--base', tampered, '--force-base', '-q', join(root, 'tampered-forced')]);
  assert.equal(forced.code, 0, forced.stderr);
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => {
      res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

test('lora-to-hf CLI (NeMo RL convert_lora_to_hf.py flags), and bad input: missing run_config.yaml, another base, another PEFT class', async () => {
  const c = CASES[1]!;
  const out = join(root, 'cli-adapter');
  const ok = await run(['lora-to-hf', '--adapter-only', '--adapter-ckpt', dir(c, 'lora'), '--hf-model-name', dir(c, 'hf'), '--hf-ckpt-path', out, '-q']);
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok((await readFile(join(out, 'adapter_model.safetensors'))).equals(await readFile(join(dir(c, 'peft-ours'), 'adapter_model.safetensors'))));
  const noBase = await run(['lora-to-hf', '--adapter-ckpt', dir(c, 'lora'), '--hf-model-name', dir(c, 'hf'), '--hf-ckpt-path', join(root, 'x1')]);
  assert.equal(noBase.code, 2);
  assert.match(noBase.stderr, /--base-ckpt is required/);

  // another base: the adapter's shapes do not fit (a qwen2 adapter on the llama config)
  const wrong = await run(['lora-to-hf', '--adapter-only', '--adapter-ckpt', dir(CASES[0]!, 'lora'), '--hf-model-name', dir(c, 'hf'), '--hf-ckpt-path', join(root, 'x2')]);
  assert.equal(wrong.code, 1, wrong.stderr);
  assert.match(wrong.stderr, /^shardshift: error: .*layer 0 self_attention\.linear_qkv: linear_in \[8, 64\] \/ linear_out \[128, 8\] do not fit the base model, which needs \[8, 32\] \/ \[64, 8\]/);
  assert.ok(!existsSync(join(root, 'x2')));

  // another PEFT class, then no run_config.yaml at all
  const iter = join(dir(c, 'lora'), 'iter_0000010');
  const rc = join(iter, 'run_config.yaml');
  const text = await readFile(rc, 'utf8');
  await writeFile(rc, text.replace('megatron.bridge.peft.lora.LoRA', 'megatron.bridge.peft.canonical_lora.CanonicalLoRA'));
  const canon = await run(['lora-to-hf', '--adapter-only', '--adapter-ckpt', dir(c, 'lora'), '--hf-model-name', dir(c, 'hf'), '--hf-ckpt-path', join(root, 'x3')]);
  assert.equal(canon.code, 1);
  assert.match(canon.stderr, /peft\._target_ megatron\.bridge\.peft\.canonical_lora\.CanonicalLoRA is not supported.*CanonicalLoRA keeps separate q\/k\/v adapters/);
  await unlink(rc);
  const none = await run(['lora-to-hf', '--adapter-only', '--adapter-ckpt', dir(c, 'lora'), '--hf-model-name', dir(c, 'hf'), '--hf-ckpt-path', join(root, 'x4')]);
  assert.equal(none.code, 1);
  assert.match(none.stderr, /no run_config\.yaml .*records its dim and alpha there/);
  await writeFile(rc, text);
  assert.deepEqual((await readdir(root)).filter((n) => /^x\d/.test(n) || n.includes('.partial')), []);
});

test('steps: convert/merge_lora with both backends gives the same bytes as the plain commands; export-adapter = lora-to-hf --adapter-only', async () => {
  const c = CASES[0]!;
  // megatron_bridge: merged Megatron plus an HF export.
  const meg = join(root, 'step-meg');
  const hf = join(root, 'step-hf');
  let r = await run(['steps', 'run', 'convert/merge_lora', '-c', 'default', 'backend=megatron_bridge', `lora_checkpoint=${dir(c, 'lora')}`, `base_megatron_path=${dir(c, 'megatron')}`, `hf_model_id=${dir(c, 'hf')}`, `output_megatron_path=${meg}`, `output_hf_path=${hf}`, 'export_hf=true', '-q']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(join(hf, 'model.safetensors'))).equals(await readFile(join(dir(c, 'merged-ours'), 'model.safetensors'))));
  assert.ok(existsSync(join(meg, 'latest_checkpointed_iteration.txt')));
  // hf_peft: the PEFT form of the same adapter into the HF base.
  const merged = join(root, 'step-peft-merged');
  r = await run(['steps', 'run', 'convert/merge_lora', 'backend=hf_peft', `lora_checkpoint=${dir(c, 'peft-ref')}`, `base_hf_path=${dir(c, 'hf')}`, `output_hf_path=${merged}`, '-q']);
  assert.equal(r.code, 0, r.stderr);
  const cmp = JSON.parse(await runOracle('lora_oracle.py', ['compare', dir(c, 'merged-ref'), merged])) as Cmp;
  assert.deepEqual([cmp.only_ref, cmp.only_ours], [[], []]);
  assert.ok(Object.values(cmp.tensors).every((t) => t.diff === 0), 'bit-identical to peft');
  // export-adapter
  const a = join(root, 'export-adapter');
  const b = join(root, 'lora-to-hf-adapter-only');
  assert.equal((await run(['export-adapter', '--adapter', dir(c, 'lora'), '--hf-model', dir(c, 'hf'), '-q', a])).code, 0);
  assert.equal((await run(['lora-to-hf', '--adapter-only', '--adapter-ckpt', dir(c, 'lora'), '--hf-model-name', dir(c, 'hf'), '--hf-ckpt-path', b, '-q'])).code, 0);
  assert.ok((await readFile(join(a, 'adapter_model.safetensors'))).equals(await readFile(join(b, 'adapter_model.safetensors'))));
});
