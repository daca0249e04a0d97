/** Legacy Megatron files without Python: round trips at several TP×PP, and bad input. */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, cp } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { writeTorch } from '../../src/formats/torch.js';
import { PyDict, PyGlobal, PyObject } from '../../src/pickle/values.js';
import { writeOutput } from '../../src/exec/output.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-legacy-unit-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }));
  });
}

test('HF → legacy at TP×PP ∈ {1×1, 2×1, 1×2, 2×2} → HF is byte-identical', async () => {
  for (const [tp, pp] of [[1, 1], [2, 1], [1, 2], [2, 2]] as const) {
    const meg = join(tmp, `rt-${tp}-${pp}`);
    const back = `${meg}.hf`;
    assert.equal((await run(['convert', '-q', '--to', 'megatron', '--ckpt-format', 'torch', '--tp', String(tp), '--pp', String(pp), example, meg])).code, 0);
    const ranks = tp * pp;
    for (let t = 0; t < tp; t++) for (let p = 0; p < pp; p++) {
      const name = pp > 1 ? `mp_rank_${String(t).padStart(2, '0')}_${String(p).padStart(3, '0')}` : `mp_rank_${String(t).padStart(2, '0')}`;
      assert.ok(existsSync(join(meg, 'iter_0000000', name, 'model_optim_rng.pt')), `${ranks} rank files: ${name}`);
    }
    assert.equal((await run(['convert', '-q', '--to', 'hf', meg, back])).code, 0);
    assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))), `TP=${tp} PP=${pp}`);
  }
});

test('a missing rank file is named', async () => {
  const meg = join(tmp, 'missing-rank');
  await cp(join(tmp, 'rt-2-2'), meg, { recursive: true });
  await rm(join(meg, 'iter_0000000', 'mp_rank_01_001'), { recursive: true });
  const r = await run(['convert', '--to', 'hf', meg, join(tmp, 'o1')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /rank file\(s\) missing for a TP=2 PP=2 checkpoint: mp_rank_01_001/);
  assert.ok(!existsSync(join(tmp, 'o1')));
});

test('TP shards of the wrong shape are named with both ranks', async () => {
  const meg = join(tmp, 'bad-shard');
  await cp(join(tmp, 'rt-2-1'), meg, { recursive: true });
  // Replace rank 1 with rank 1 of a TP=2 conversion of another model shape (a TP=1 file holds full tensors).
  await rm(join(meg, 'iter_0000000', 'mp_rank_01'), { recursive: true });
  await cp(join(tmp, 'rt-1-1', 'iter_0000000', 'mp_rank_00'), join(meg, 'iter_0000000', 'mp_rank_01'), { recursive: true });
  const r = await run(['convert', '--to', 'hf', meg, join(tmp, 'o2')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /mismatched TP shards of [\w.]+: BF16 \[\d+(, \d+)*\] in mp_rank_00 but BF16 \[\d+(, \d+)*\] in mp_rank_01/);
});

test('an args pickle naming a disallowed global is refused by name', async () => {
  const meg = join(tmp, 'evil-args');
  const d = new PyDict();
  d.set('args', new PyObject('argparse', 'Namespace', PyDict.from({ hook: new PyGlobal('subprocess', 'Popen') })));
  d.set('model', new PyDict('OrderedDict'));
  const { files } = writeTorch([], { singleFile: 'model_optim_rng.pt', tree: d });
  await writeOutput(example, meg, 'dir', [{ ...files[0]!, relPath: 'iter_0000001/mp_rank_00/model_optim_rng.pt' }], [], {});
  const r = await run(['convert', '--to', 'hf', meg, join(tmp, 'o3')]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /mp_rank_00\/model_optim_rng\.pt: pickle calls a global that is not allowed: subprocess\.Popen/);
});

test('pre-megatron-core names (language_model.encoder…) are read', async () => {
  const { openCheckpoint } = await import('../../src/checkpoints/registry.js');
  const { copyOf } = await import('../../src/lazy/expr.js');
  const { PyFloat } = await import('../../src/pickle/values.js');
  // Re-lay the TP=1 file with Megatron-LM's pre-mcore key names and nesting.
  const orig = await openCheckpoint(join(tmp, 'rt-1-1', 'iter_0000000', 'mp_rank_00', 'model_optim_rng.pt'));
  const rename: Array<[RegExp, string]> = [
    [/^model\.embedding\.word_embeddings\.weight$/, 'model.language_model.embedding.word_embeddings.weight'],
    [/^model\.output_layer\.weight$/, 'model.language_model.output_layer.weight'],
    [/^model\.decoder\.final_layernorm\.weight$/, 'model.language_model.encoder.final_norm.weight'],
    [/^model\.decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.layer_norm_weight$/, 'model.language_model.encoder.layers.$1.input_norm.weight'],
    [/^model\.decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.weight$/, 'model.language_model.encoder.layers.$1.self_attention.query_key_value.weight'],
    [/^model\.decoder\.layers\.(\d+)\.self_attention\.linear_proj\.weight$/, 'model.language_model.encoder.layers.$1.self_attention.dense.weight'],
    [/^model\.decoder\.layers\.(\d+)\.mlp\.linear_fc1\.layer_norm_weight$/, 'model.language_model.encoder.layers.$1.post_attention_norm.weight'],
    [/^model\.decoder\.layers\.(\d+)\.mlp\.linear_fc1\.weight$/, 'model.language_model.encoder.layers.$1.mlp.dense_h_to_4h.weight'],
    [/^model\.decoder\.layers\.(\d+)\.mlp\.linear_fc2\.weight$/, 'model.language_model.encoder.layers.$1.mlp.dense_4h_to_h.weight'],
  ];
  try {
    const targets = [];
    const lm = { embedding: new PyDict(), encoder: new PyDict(), output_layer: new PyDict() };
    for (const t of orig.tensors.values()) {
      const r = rename.find(([re]) => re.test(t.name));
      assert.ok(r, `rename rule for ${t.name}`);
      const name = t.name.replace(r[0], r[1]);
      targets.push(copyOf(name, t));
      const rest = name.slice('model.language_model.'.length);
      if (rest.startsWith('embedding.')) lm.embedding.set('word_embeddings', PyDict.from({ weight: null }));
      else if (rest.startsWith('output_layer.')) lm.output_layer.set('weight', null);
      else lm.encoder.set(rest.slice('encoder.'.length), null);
    }
    const tree = PyDict.from({
      args: orig.objects.get('args')!.value,
      checkpoint_version: new PyFloat(3.0),
      iteration: 0,
      model: PyDict.from({ language_model: PyDict.from({ embedding: lm.embedding, encoder: lm.encoder, output_layer: lm.output_layer }) }),
    });
    const { files } = writeTorch(targets, { singleFile: 'model_optim_rng.pt', tree });
    await writeOutput(example, join(tmp, 'premcore'), 'dir', [{ ...files[0]!, relPath: 'iter_0000003/mp_rank_00/model_optim_rng.pt' }], [{ from: join(example, 'config.json'), to: 'iter_0000003/hf/config.json' }], {});
  } finally {
    await orig.close();
  }
  const back = join(tmp, 'premcore.hf');
  const r = await run(['convert', '--to', 'hf', join(tmp, 'premcore'), back]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok((await readFile(join(example, 'model.safetensors'))).equals(await readFile(join(back, 'model.safetensors'))));
});
