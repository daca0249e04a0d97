/**
 * merge-lora (PEFT backend) against real peft 0.21 + transformers: tiny random Llama, Qwen2 and GPT-2
 * bases; adapters made by peft for every supported LoraConfig variant with random non-zero
 * factors; the reference is `PeftModel.from_pretrained(base, adapter).merge_and_unload()` +
 * `save_pretrained`. shardshift's merged tensors must equal the reference's bit for bit (each test
 * prints how many elements differ and the largest distance in ulps of the tensor's dtype).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { mergeLora } from '../../src/plan/lora-convert.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { wholeBox } from '../../src/tensor/layout.js';
import type { DType } from '../../src/tensor/dtype.js';
import { cli } from '../helpers/cli.js';

interface Case {
  name: string;
  arch: 'llama' | 'llama_tied' | 'llama_wide' | 'qwen2' | 'gpt2';
  dtype: 'float32' | 'bfloat16' | 'float16';
  variant: string;
  adapter_dtype?: 'float32' | 'bfloat16' | 'float16';
  safe?: boolean;
  load_dtype?: 'float32' | 'bfloat16' | 'float16';
  ref?: boolean;
}

const MERGES: Case[] = [
  { name: 'llama-bf16-plain', arch: 'llama', dtype: 'bfloat16', variant: 'plain' },
  { name: 'llama-bf16-rslora', arch: 'llama', dtype: 'bfloat16', variant: 'rslora' },
  { name: 'llama-bf16-patterns', arch: 'llama', dtype: 'bfloat16', variant: 'patterns' },
  { name: 'llama-bf16-regex', arch: 'llama', dtype: 'bfloat16', variant: 'regex' },
  { name: 'llama-bf16-dora', arch: 'llama', dtype: 'bfloat16', variant: 'dora' },
  { name: 'llama-bf16-modules_to_save', arch: 'llama', dtype: 'bfloat16', variant: 'modules_to_save' },
  { name: 'llama-bf16-embedding', arch: 'llama', dtype: 'bfloat16', variant: 'embedding' },
  { name: 'llama-bf16-plain-bf16adapter', arch: 'llama', dtype: 'bfloat16', variant: 'plain', adapter_dtype: 'bfloat16' },
  { name: 'llama-bf16-plain-safe', arch: 'llama', dtype: 'bfloat16', variant: 'plain', safe: true },
  { name: 'llama-f32-plain', arch: 'llama', dtype: 'float32', variant: 'plain' },
  { name: 'llama-f32-rslora', arch: 'llama', dtype: 'float32', variant: 'rslora' },
  { name: 'llama-f32-patterns', arch: 'llama', dtype: 'float32', variant: 'patterns' },
  { name: 'llama-f32-dora', arch: 'llama', dtype: 'float32', variant: 'dora' },
  { name: 'llama-f32-embedding', arch: 'llama', dtype: 'float32', variant: 'embedding' },
  { name: 'llama-f32-rank500', arch: 'llama', dtype: 'float32', variant: 'big_rank' },
  { name: 'llama-f32-as-bf16', arch: 'llama', dtype: 'float32', variant: 'plain', load_dtype: 'bfloat16' },
  { name: 'llama-f16-plain', arch: 'llama', dtype: 'float16', variant: 'plain' },
  { name: 'llama-f16-dora', arch: 'llama', dtype: 'float16', variant: 'dora' },
  { name: 'llama_tied-bf16-embedding', arch: 'llama_tied', dtype: 'bfloat16', variant: 'embedding' },
  { name: 'qwen2-bf16-plain', arch: 'qwen2', dtype: 'bfloat16', variant: 'plain' },
  { name: 'qwen2-bf16-bias_all', arch: 'qwen2', dtype: 'bfloat16', variant: 'bias_all' },
  { name: 'qwen2-bf16-bias_lora_only', arch: 'qwen2', dtype: 'bfloat16', variant: 'bias_lora_only' },
  { name: 'qwen2-bf16-lora_bias', arch: 'qwen2', dtype: 'bfloat16', variant: 'lora_bias' },
  { name: 'qwen2-bf16-dora', arch: 'qwen2', dtype: 'bfloat16', variant: 'dora' },
  { name: 'qwen2-f32-plain-bf16adapter', arch: 'qwen2', dtype: 'float32', variant: 'plain', adapter_dtype: 'bfloat16' },
  { name: 'qwen2-f32-dora-bf16adapter', arch: 'qwen2', dtype: 'float32', variant: 'dora', adapter_dtype: 'bfloat16' },
  { name: 'qwen2-f32-lora_bias-safe', arch: 'qwen2', dtype: 'float32', variant: 'lora_bias', safe: true },
  { name: 'gpt2-bf16-fifo', arch: 'gpt2', dtype: 'bfloat16', variant: 'fifo' },
  { name: 'gpt2-bf16-fifo_dora', arch: 'gpt2', dtype: 'bfloat16', variant: 'fifo_dora' },
  { name: 'gpt2-f32-fifo', arch: 'gpt2', dtype: 'float32', variant: 'fifo' },
  { name: 'gpt2-f32-fifo_dora', arch: 'gpt2', dtype: 'float32', variant: 'fifo_dora' },
];

const OTHERS: Case[] = [
  { name: 'ia3', arch: 'llama', dtype: 'bfloat16', variant: 'ia3', ref: false },
  { name: 'pissa', arch: 'llama', dtype: 'float32', variant: 'pissa', ref: false },
  { name: 'wide', arch: 'llama_wide', dtype: 'bfloat16', variant: 'plain', ref: false },
];

let root: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'ss-lora-'));
  const spec = join(root, 'cases.json');
  await writeFile(spec, JSON.stringify([...MERGES, ...OTHERS]));
  await runOracle('lora_oracle.py', ['cases', root, spec], { timeoutMs: 900_000 });
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

const base = (c: Pick<Case, 'arch' | 'dtype'>): string => join(root, `base-${c.arch}-${c.dtype}`);

/** A float's bits as an integer on a scale where neighbouring values differ by 1 (ulps). */
function ordered(bits: number, width: 16 | 32): number {
  const signBit = width === 32 ? 0x80000000 : 0x8000;
  const mag = width === 32 ? bits & 0x7fffffff : bits & 0x7fff;
  return (bits & signBit) !== 0 ? -mag : mag;
}

interface TensorDiff {
  name: string;
  dtype: DType;
  n: number;
  diff: number;
  maxUlp: number;
}

/** Every tensor of two checkpoints compared element by element (ulps of the tensor's dtype). */
async function compareDirs(ref: string, ours: string): Promise<TensorDiff[]> {
  const a = await openCheckpoint(ref);
  const b = await openCheckpoint(ours);
  try {
    assert.deepEqual([...b.tensors.keys()].sort(), [...a.tensors.keys()].sort(), 'same tensor names as the reference');
    const out: TensorDiff[] = [];
    for (const ta of a.tensors.values()) {
      const tb = b.tensors.get(ta.name)!;
      assert.equal(tb.dtype, ta.dtype, `${ta.name} dtype`);
      assert.deepEqual(tb.shape, ta.shape, `${ta.name} shape`);
      const ba = new Uint8Array(ta.byteLength);
      const bb = new Uint8Array(tb.byteLength);
      await ta.read(wholeBox(ta.shape), ba);
      await tb.read(wholeBox(tb.shape), bb);
      let diff = 0;
      let maxUlp = 0;
      if (ta.dtype === 'F32' || ta.dtype === 'BF16' || ta.dtype === 'F16') {
        const w = ta.dtype === 'F32' ? 32 : 16;
        const va = w === 32 ? new Uint32Array(ba.buffer) : new Uint16Array(ba.buffer);
        const vb = w === 32 ? new Uint32Array(bb.buffer) : new Uint16Array(bb.buffer);
        for (let i = 0; i < va.length; i++) {
          if (va[i] === vb[i]) continue;
          diff++;
          maxUlp = Math.max(maxUlp, Math.abs(ordered(va[i]!, w) - ordered(vb[i]!, w)));
        }
        out.push({ name: ta.name, dtype: ta.dtype, n: va.length, diff, maxUlp });
      } else {
        for (let i = 0; i < ba.length; i++) if (ba[i] !== bb[i]) diff++;
        out.push({ name: ta.name, dtype: ta.dtype, n: ba.length, diff, maxUlp: diff ? Infinity : 0 });
      }
    }
    return out;
  } finally {
    await a.close();
    await b.close();
  }
}

for (const c of MERGES) {
  test(`${c.name}: merged tensors equal peft's merge_and_unload bit for bit`, async (t) => {
    const dir = join(root, c.name);
    const ours = join(dir, 'ours');
    const r = await mergeLora(base(c), join(dir, 'adapter'), ours, { safeMerge: c.safe, dtype: c.load_dtype === 'bfloat16' ? 'BF16' : undefined });
    assert.ok(r.bytesWritten > 0);
    const diffs = await compareDirs(join(dir, 'ref'), ours);
    const merged = await compareDirs(base(c), join(dir, 'ref')).catch(() => undefined);
    const changed = merged ? merged.filter((d) => d.diff > 0).length : -1;
    const n = diffs.reduce((s, d) => s + d.n, 0);
    const differing = diffs.reduce((s, d) => s + d.diff, 0);
    const maxUlp = Math.max(0, ...diffs.map((d) => d.maxUlp));
    t.diagnostic(`ulp-stats ${c.name}: ${differing} of ${n} elements differ from peft (max ${maxUlp} ulp); ${changed >= 0 ? `${changed} tensors changed by the merge` : ''}`);
    for (const d of diffs.filter((x) => x.diff)) t.diagnostic(`  ${d.name} ${d.dtype}: ${d.diff} of ${d.n} differ, max ${d.maxUlp} ulp`);
    if (merged) assert.ok(changed > 0, 'the adapter changes the base (a vacuous comparison otherwise)');
    assert.equal(differing, 0, `bit-identical to peft (${differing} elements differ, max ${maxUlp} ulp)`);
    // config and tokenizer carried from the base
    assert.deepEqual(JSON.parse(await readFile(join(ours, 'config.json'), 'utf8')), JSON.parse(await readFile(join(base(c), 'config.json'), 'utf8')));
    assert.ok((await readFile(join(ours, 'tokenizer_config.json'), 'utf8')).includes('carried as a side file'));
  });
}

test('real safetensors loads shardshift\'s merged output, and its logits equal the unmerged adapter applied by peft', async () => {
  const dir = join(root, 'llama-f32-plain');
  const r = JSON.parse(await runOracle('lora_oracle.py', ['logits_compare', base({ arch: 'llama', dtype: 'float32' }), join(dir, 'adapter'), join(dir, 'ours')])) as { max_abs_diff: number; max_abs: number };
  assert.ok(r.max_abs_diff < 1e-4 * Math.max(1, r.max_abs), `logits differ by ${r.max_abs_diff}`);
  const same = JSON.parse(await runOracle('lora_oracle.py', ['compare', join(dir, 'ref'), join(dir, 'ours')])) as { tensors: Record<string, { diff: number }> };
  assert.ok(Object.values(same.tensors).every((x) => x.diff === 0), 'safetensors (Python) reads the same values');
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => {
      res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

async function expectFailure(args: string[], re: RegExp, code = 1): Promise<string> {
  const out = args[args.length - 1]!;
  const r = await run(args);
  assert.equal(r.code, code, `exit code (stderr: ${r.stderr})`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one message line, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^shardshift: error: /);
  assert.match(lines[0]!, re);
  assert.ok(!existsSync(out), 'nothing written');
  assert.ok(!existsSync(`${out}.partial`), 'no partial output left');
  return lines[0]!;
}

test('CLI: merge-lora --json reports the plan; --dry-run writes nothing', async () => {
  const c = MERGES.find((x) => x.name === 'qwen2-bf16-dora')!;
  const dry = join(root, 'dry-out');
  const d = await run(['merge-lora', '--adapter', join(root, c.name, 'adapter'), '--base', base(c), '--dry-run', dry]);
  assert.equal(d.code, 0, d.stderr);
  assert.match(d.stdout, /DoRA|dora/);
  assert.match(d.stdout, /dry run: nothing written/);
  assert.ok(!existsSync(dry));
  const out = join(root, 'cli-out');
  const r = await run(['merge-lora', '--adapter', join(root, c.name, 'adapter'), '--base', base(c), '--json', out]);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout) as { plan: { notes: string[] }; bytesWritten: number };
  assert.ok(j.bytesWritten > 0);
  assert.ok(j.plan.notes.some((n) => /4 linear, 4 dora|dora/.test(n)), j.plan.notes.join('\n'));
  assert.ok(j.plan.notes.some((n) => /matches the base's directory name|is the base directory itself/.test(n)), j.plan.notes.join('\n'));
  const diffs = await compareDirs(join(root, c.name, 'ref'), out);
  assert.equal(diffs.reduce((s, x) => s + x.diff, 0), 0);
});

test('bad input: an IA3 adapter made by peft is refused by name', async () => {
  const msg = await expectFailure(['merge-lora', '--adapter', join(root, 'ia3', 'adapter'), '--base', base({ arch: 'llama', dtype: 'bfloat16' }), join(root, 'o-ia3')], /peft_type IA3 is not supported/);
  assert.match(msg, /adapter_config\.json/);
});

test('bad input: a PiSSA adapter (base-mutating init) is refused by name', async () => {
  await expectFailure(['merge-lora', '--adapter', join(root, 'pissa', 'adapter'), '--base', base({ arch: 'llama', dtype: 'float32' }), join(root, 'o-pissa')], /init_lora_weights "pissa" \(PiSSA\) rewrites the base weights/);
});

test('bad input: an adapter for a different base (shape mismatch) names the tensor and both shapes; --force-base does not help', async () => {
  const args = ['merge-lora', '--adapter', join(root, 'llama-bf16-plain', 'adapter'), '--base', base({ arch: 'llama_wide', dtype: 'bfloat16' })];
  const msg = await expectFailure([...args, join(root, 'o-wide')], /adapter does not fit the base/);
  assert.match(msg, /model\.layers\.0\.\w+\.\w+_proj\.weight: the adapter's lora_A \[8, \d+\] \/ lora_B \[\d+, 8\] need a base weight \[\d+, \d+\], the base has \[\d+, \d+\]/);
  await expectFailure([...args, '--force-base', join(root, 'o-wide2')], /adapter does not fit the base/);
});

test('base identity: peft recorded a local base — a byte-identical copy under another name is it, a copy with other weights is refused unless --force-base; then the merge is peft\'s', async () => {
  const c = MERGES.find((x) => x.name === 'llama-bf16-plain')!;
  const adapter = join(root, c.name, 'adapter');
  const same = join(root, 'same-weights-other-name');
  await cp(base(c), same, { recursive: true });
  const ok = await run(['merge-lora', '--adapter', adapter, '--base', same, '--json', join(root, 'o-same')]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok((JSON.parse(ok.stdout) as { plan: { notes: string[] } }).plan.notes.some((n) => /the base's weight files equal those of base_model_name_or_path/.test(n)));
  const renamed = join(root, 'some-other-model');
  await cp(base(c), renamed, { recursive: true });
  const st = join(renamed, 'model.safetensors');
  const bytes = await readFile(st);
  bytes[bytes.length - 1] = bytes.at(-1)! ^ 1;
  await writeFile(st, bytes);
  const msg = await expectFailure(['merge-lora', '--adapter', adapter, '--base', renamed, join(root, 'o-ident')], /trained on the local base ".*base-llama-bfloat16", and .*some-other-model holds other weights/);
  assert.match(msg, /--force-base/);
  const out = join(root, 'o-ident-forced');
  const r = await run(['merge-lora', '--adapter', adapter, '--base', renamed, '--force-base', '-q', out]);
  assert.equal(r.code, 0, r.stderr);
  // peft's merge of the true base, except the one element the copy altered.
  assert.ok((await compareDirs(join(root, c.name, 'ref'), out)).reduce((s, x) => s + x.diff, 0) <= 1);
  const same2 = join(root, 'o-same-q');
  assert.equal((await run(['merge-lora', '--adapter', adapter, '--base', same, '-q', same2])).code, 0);
  assert.equal((await compareDirs(join(root, c.name, 'ref'), same2)).reduce((s, x) => s + x.diff, 0), 0);
  assert.deepEqual((await readdir(root)).filter((n) => n.includes('.partial')), []);
});
