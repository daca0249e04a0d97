/**
 * HF ↔ Megatron without Python: the bundled example round-trips byte for byte, the QKV
 * interleave puts every head where Megatron expects it, and bad input fails clearly with nothing
 * written.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdtemp, readFile, rm, writeFile, rename } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { convertHfToMegatron } from '../../src/plan/model-convert.js';
import { openMegatron } from '../../src/megatron/checkpoint.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import { wholeBox } from '../../src/tensor/layout.js';
import { FAMILIES } from '../../src/models/registry.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-models-unit-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

async function exampleWithConfig(name: string, edit: (c: Record<string, unknown>) => void): Promise<string> {
  const d = join(tmp, name);
  await cp(example, d, { recursive: true });
  const c = JSON.parse(await readFile(join(d, 'config.json'), 'utf8')) as Record<string, unknown>;
  edit(c);
  await writeFile(join(d, 'config.json'), JSON.stringify(c));
  return d;
}

async function expectFail(args: string[], re: RegExp, code = 1): Promise<void> {
  const out = args[args.length - 1]!;
  const r = await run(args);
  assert.equal(r.code, code, r.stderr);
  assert.match(r.stderr, /^shardshift: error: /);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, re);
  assert.ok(!existsSync(out), 'nothing written');
}

test('example: HF → Megatron → HF reproduces model.safetensors byte for byte', async () => {
  const meg = join(tmp, 'rt.megatron');
  const back = join(tmp, 'rt.hf');
  assert.equal((await run(['convert', '--to', 'megatron', example, meg])).code, 0);
  assert.ok(existsSync(join(meg, 'latest_checkpointed_iteration.txt')));
  assert.ok(existsSync(join(meg, 'iter_0000000', 'metadata.json')));
  assert.ok(existsSync(join(meg, 'iter_0000000', 'common.pt')));
  assert.equal((await run(['convert', '--to', 'hf', meg, back])).code, 0);
  assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))));
  assert.ok(existsSync(join(back, 'generation_config.json')));
});

test('QKV rows are grouped per query group: [q heads of g; k_g; v_g]', async () => {
  // tiny-llama: 4 heads, 2 query groups, head dim 8 → per group 2 q heads, 1 k, 1 v.
  const meg = join(tmp, 'qkv.megatron');
  await convertHfToMegatron(example, meg, {});
  const m = await openMegatron(meg);
  const hf = await openCheckpoint(example);
  try {
    const qkv = m.source.tensors.get('decoder.layers.self_attention.linear_qkv.weight')!;
    const layer1 = new Uint8Array(64 * 32 * 2);
    await qkv.read({ start: [1, 0, 0], size: [1, 64, 32] }, layer1);
    const get = async (n: string): Promise<Uint8Array> => {
      const t = hf.tensors.get(n)!;
      const b = new Uint8Array(t.byteLength);
      await t.read(wholeBox(t.shape), b);
      return b;
    };
    const q = await get('model.layers.1.self_attn.q_proj.weight');
    const k = await get('model.layers.1.self_attn.k_proj.weight');
    const v = await get('model.layers.1.self_attn.v_proj.weight');
    const rowBytes = 32 * 2;
    const rowsOf = (b: Uint8Array, r0: number, n: number): Buffer => Buffer.from(b.subarray(r0 * rowBytes, (r0 + n) * rowBytes));
    const expected = Buffer.concat([rowsOf(q, 0, 16), rowsOf(k, 0, 8), rowsOf(v, 0, 8), rowsOf(q, 16, 16), rowsOf(k, 8, 8), rowsOf(v, 8, 8)]);
    assert.ok(Buffer.from(layer1).equals(expected), 'interleaved per query group');
    const naive = Buffer.concat([Buffer.from(q), Buffer.from(k), Buffer.from(v)]);
    assert.ok(!Buffer.from(layer1).equals(naive), 'not the naive cat([q, k, v])');
  } finally {
    await m.source.close();
    await hf.close();
  }
});

test('a config whose heads do not divide', async () => {
  const d = await exampleWithConfig('bad-heads', (c) => {
    c.num_attention_heads = 4;
    c.num_key_value_heads = 3;
  });
  await expectFail(['convert', '--to', 'megatron', d, join(tmp, 'o1')], /num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)/);
});

test('a checkpoint missing a layer', async () => {
  const d = await exampleWithConfig('missing-layer', (c) => {
    c.num_hidden_layers = 3;
  });
  await expectFail(['convert', '--to', 'megatron', d, join(tmp, 'o2')], /missing: model\.layers\.2\./);
});

test('a tensor with the wrong shape for the config', async () => {
  const d = await exampleWithConfig('bad-shape', (c) => {
    c.intermediate_size = 48;
  });
  await expectFail(['convert', '--to', 'megatron', d, join(tmp, 'o3')], /model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight: shape \[\d+, \d+\] does not match the config, which needs/);
});

test('an unknown architecture', async () => {
  const d = await exampleWithConfig('unknown-arch', (c) => {
    c.architectures = ['FancyNewForCausalLM'];
  });
  await expectFail(['convert', '--to', 'megatron', d, join(tmp, 'o4')], /unknown architecture FancyNewForCausalLM; supported: LlamaForCausalLM/);
});

test('a run dir with no tracker file and several iter_* dirs', async () => {
  const meg = join(tmp, 'multi.megatron');
  await convertHfToMegatron(example, meg, {});
  await cp(join(meg, 'iter_0000000'), join(meg, 'iter_0000100'), { recursive: true });
  await rm(join(meg, 'latest_checkpointed_iteration.txt'));
  await expectFail(['convert', '--to', 'hf', meg, join(tmp, 'o5')], /no latest_checkpointed_iteration\.txt and 2 iteration directories \(iter_0000000, iter_0000100\); name one of them/, 2);
  // Naming one works, and the choice is printed in the plan.
  const r = await run(['convert', '--to', 'hf', '--dry-run', join(meg, 'iter_0000100'), join(tmp, 'o6')]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /note: iteration: iteration directory iter_0000100/);
});

test('an incomplete Megatron checkpoint (no metadata.json) is refused', async () => {
  const meg = join(tmp, 'incomplete.megatron');
  await convertHfToMegatron(example, meg, {});
  await rename(join(meg, 'iter_0000000', 'metadata.json'), join(meg, 'iter_0000000', 'x'));
  await expectFail(['convert', '--to', 'hf', meg, join(tmp, 'o7')], /no metadata\.json — Megatron writes it last, so this checkpoint is incomplete/);
});

test('export without any HF config falls back to the training args in common.pt', async () => {
  const meg = join(tmp, 'noref.megatron');
  await convertHfToMegatron(example, meg, {});
  await rm(join(meg, 'iter_0000000', 'hf'), { recursive: true });
  const out = join(tmp, 'noref.hf');
  const r = await run(['convert', '--to', 'hf', meg, out]);
  assert.equal(r.code, 0, r.stderr);
  const cfg = JSON.parse(await readFile(join(out, 'config.json'), 'utf8'));
  assert.equal(cfg.architectures[0], 'LlamaForCausalLM');
  assert.equal(cfg.num_key_value_heads, 2);
  assert.equal(cfg.vocab_size, 64);
  assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(out, 'model.safetensors'))));
});

test('the support matrix in the README lists every registered family, both directions', async () => {
  const readme = await readFile(join(repoRoot, 'README.md'), 'utf8');
  for (const f of FAMILIES) {
    const line = readme.split('\n').find((l) => l.startsWith(`| ${f.description} |`));
    assert.ok(line, `README support matrix has a row for ${f.description}`);
    assert.match(line!, new RegExp(`\\| ${f.architectures[0]} \\| ✔ \\| ✔ \\|`));
  }
});

test('export reads a Megatron-Bridge run_config.yaml model section when there is no HF config', async () => {
  const meg = join(tmp, 'mb.megatron');
  await convertHfToMegatron(example, meg, {});
  await rm(join(meg, 'iter_0000000', 'hf'), { recursive: true });
  await writeFile(
    join(meg, 'iter_0000000', 'run_config.yaml'),
    [
      'model:',
      '  _target_: megatron.bridge.models.llama.llama_provider.LlamaModelProvider',
      '  num_layers: 2',
      '  hidden_size: 32',
      '  ffn_hidden_size: 64',
      '  num_attention_heads: 4',
      '  num_query_groups: 2',
      '  kv_channels: 8',
      '  vocab_size: 64',
      '  seq_length: 128',
      '  layernorm_epsilon: 1.0e-05',
      '  share_embeddings_and_output_weights: false',
      '  activation_func:',
      '    _target_: torch.nn.functional.silu',
      '    _call_: false',
      'peft: null',
      '',
    ].join('\n'),
  );
  const out = join(tmp, 'mb.hf');
  const r = await run(['convert', '--to', 'hf', meg, out]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /wrote/);
  const cfg = JSON.parse(await readFile(join(out, 'config.json'), 'utf8'));
  assert.equal(cfg.max_position_embeddings, 128);
  assert.equal(cfg.rms_norm_eps, 1e-5);
  assert.equal(cfg.tie_word_embeddings, false);
  assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(out, 'model.safetensors'))));
});

test('per-layer torch_dist keys (decoder.layers.<i>.…) and optimizer / RNG entries: read, and skipped by name', async () => {
  // Re-lay the stacked checkpoint with per-layer keys (as megatron-core writes hybrid and
  // non-homogeneous models), adding optimizer state and RNG state beside the weights.
  const { writeMegatron } = await import('../../src/megatron/checkpoint.js');
  const { copyOf } = await import('../../src/lazy/expr.js');
  const { writeOutput } = await import('../../src/exec/output.js');
  const stacked = join(tmp, 'stacked.megatron');
  await convertHfToMegatron(example, stacked, {});
  const m = await openMegatron(stacked);
  try {
    const entries = [];
    for (const t of m.source.tensors.values()) {
      if (t.name.startsWith('decoder.layers.')) {
        const rest = t.name.slice('decoder.layers.'.length);
        for (let i = 0; i < t.shape[0]!; i++) {
          const tt = copyOf(`decoder.layers.${i}.${rest}`, t, [i]);
          entries.push({ name: tt.name, dtype: tt.dtype, shape: tt.shape, chunks: [{ offsets: tt.shape.map(() => 0), tensor: tt }] });
        }
      } else {
        const tt = copyOf(t.name, t);
        entries.push({ name: t.name, dtype: t.dtype, shape: t.shape, chunks: [{ offsets: t.shape.map(() => 0), tensor: tt }] });
      }
    }
    const emb = m.source.tensors.get('embedding.word_embeddings.weight')!;
    const opt = copyOf('optimizer.state.exp_avg.embedding.word_embeddings.weight', emb);
    entries.push({ name: opt.name, dtype: opt.dtype, shape: opt.shape, chunks: [{ offsets: [0, 0], tensor: opt }] });
    const files = writeMegatron(entries, { iteration: 7, args: {} });
    const perLayer = join(tmp, 'perlayer.megatron');
    await writeOutput(stacked, perLayer, 'dir', files, [{ from: join(stacked, 'iter_0000000', 'hf', 'config.json'), to: 'iter_0000007/hf/config.json' }], {});
  } finally {
    await m.source.close();
  }
  const out = join(tmp, 'perlayer.hf');
  const r = await run(['convert', '--to', 'hf', join(tmp, 'perlayer.megatron'), out]);
  assert.equal(r.code, 0, r.stderr);
  // Optimizer state is nothing the HF model needs: listed only with --verbose, as information.
  assert.doesNotMatch(r.stderr, /skipped/);
  const v = await run(['convert', '--to', 'hf', '-v', '--overwrite', join(tmp, 'perlayer.megatron'), out]);
  assert.equal(v.code, 0, v.stderr);
  assert.match(v.stderr, /^note: skipped optimizer state ×1 \(optimizer\.state\.exp_avg\.embedding\.word_embeddings\.weight\)$/m);
  assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(out, 'model.safetensors'))));
});

test('an unmapped source tensor fails the conversion, or is skipped and listed with --allow-unmapped', async () => {
  const { writeSafetensors } = await import('../../src/formats/safetensors.js');
  const { copyOf } = await import('../../src/lazy/expr.js');
  const { writeOutput } = await import('../../src/exec/output.js');
  const src = await openCheckpoint(example);
  const d = join(tmp, 'extra-tensor');
  try {
    const targets = [...src.tensors.values()].map((t) => copyOf(t.name, t));
    targets.push(copyOf('model.vision_tower.proj.weight', src.tensors.get('model.norm.weight')!));
    await writeOutput(example, d, 'dir', writeSafetensors(targets).files, [{ from: join(example, 'config.json'), to: 'config.json' }], {});
  } finally {
    await src.close();
  }
  await expectFail(['convert', '--to', 'megatron', d, join(tmp, 'o8')], /1 tensor\(s\) have no place in a llama Megatron model: model\.vision_tower\.proj\.weight \(--allow-unmapped skips them\)/);
  const r = await run(['convert', '--to', 'megatron', '--allow-unmapped', '--json', d, join(tmp, 'o9')]);
  assert.equal(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.deepEqual(j.plan.skipped, [{ name: 'model.vision_tower.proj.weight', reason: 'not mapped (--allow-unmapped)', carriesData: true }]);
  // Model data the output lacks is always listed, without --verbose and even with --quiet.
  const u = await run(['convert', '--to', 'megatron', '--allow-unmapped', '-q', d, join(tmp, 'o11')]);
  assert.equal(u.code, 0, u.stderr);
  assert.equal(u.stderr, 'note: skipped not mapped (--allow-unmapped) ×1 (model.vision_tower.proj.weight)\n');
  const events = r.stderr.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l));
  assert.ok(events.length > 0 && events.every((e: { event: string }) => ['status', 'progress', 'done'].includes(e.event)), 'stderr carries JSON events only');
  const progress = events.filter((e: { event: string }) => e.event === 'progress');
  assert.equal(progress[progress.length - 1].bytesDone, progress[progress.length - 1].bytesTotal);
  assert.equal(events[events.length - 1].event, 'done');
});
