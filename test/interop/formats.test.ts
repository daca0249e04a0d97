/**
 * Format interop against real torch: fixtures written by torch.save, dcp.save (one process and
 * two gloo ranks) and safetensors are read by shardshift bit for bit; everything shardshift
 * writes loads in torch (torch.load(weights_only=True), dcp_to_torch_save, dcp.load,
 * safetensors.load_file) with every tensor bit-identical to the source.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import { digestPath, sortKeys, type TensorDigest } from '../helpers/describe.js';
import { convert } from '../../src/plan/convert.js';
import type { FormatName } from '../../src/formats/types.js';

interface Dump {
  tensors: Record<string, TensorDigest>;
  objects: Record<string, string>;
}

const FIXTURES: Record<string, FormatName> = {
  'assorted.pt': 'torch',
  'module_state.pt': 'torch',
  dcp_single: 'dcp',
  dcp_multi: 'dcp',
  'all_dtypes.safetensors': 'safetensors',
  sharded: 'safetensors',
};

let tmp: string;
const dumps = new Map<string, Dump>();

async function dump(format: FormatName, path: string): Promise<Dump> {
  return JSON.parse(await runOracle('formats_oracle.py', ['dump', format, path])) as Dump;
}

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-interop-'));
  await runOracle('formats_oracle.py', ['make', join(tmp, 'fx')]);
  for (const [name, fmt] of Object.entries(FIXTURES)) dumps.set(name, await dump(fmt, join(tmp, 'fx', name)));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

for (const [name, fmt] of Object.entries(FIXTURES)) {
  test(`torch-written ${name} (${fmt}) is read bit for bit`, async () => {
    const want = dumps.get(name)!;
    assert.deepEqual(sortKeys(await digestPath(join(tmp, 'fx', name))), sortKeys(want.tensors));
  });

  for (const to of ['safetensors', 'torch', 'dcp'] as const) {
    test(`${name} → ${to} loads in torch bit-identical`, async () => {
      const want = dumps.get(name)!;
      const out = join(tmp, `${name}.${to}`);
      const hasC128 = Object.values(want.tensors).some((t) => t.dtype === 'C128');
      if (to === 'safetensors' && hasC128) {
        await assert.rejects(convert(join(tmp, 'fx', name), out, { to }), /C128/);
        return;
      }
      await convert(join(tmp, 'fx', name), out, { to, maxMemory: 2 << 20, dcpFiles: to === 'dcp' ? 3 : undefined });
      const got = await dump(to, out);
      assert.deepEqual(sortKeys(got.tensors), sortKeys(want.tensors));
      if (to !== 'safetensors') assert.deepEqual(Object.keys(got.objects).sort(), Object.keys(want.objects).sort());
      if (to === 'dcp') {
        // The API users call: dcp.load into a template state dict.
        const wantFile = join(tmp, `${name}.want.json`);
        await writeFile(wantFile, JSON.stringify(want));
        const loaded = JSON.parse(await runOracle('formats_oracle.py', ['dcpload', out, wantFile])) as Dump;
        assert.deepEqual(sortKeys(loaded.tensors), sortKeys(want.tensors));
        assert.deepEqual(loaded.objects, want.objects);
      }
    });
  }
}

test('dcp_multi: the two ranks\' chunks reassemble to the full tensors torch saved', async () => {
  const full = await dump('torch', join(tmp, 'fx', 'dcp_multi.expected.pt'));
  const got = await digestPath(join(tmp, 'fx', 'dcp_multi'));
  assert.deepEqual(sortKeys(got), sortKeys(full.tensors));
});

test('round trip safetensors → torch → dcp → safetensors keeps every byte of tensor data', async () => {
  const a = join(tmp, 'fx', 'sharded');
  await convert(a, join(tmp, 'rt1'), { to: 'torch', maxShardSize: 2000 });
  await convert(join(tmp, 'rt1'), join(tmp, 'rt2'), { to: 'dcp', dcpFiles: 2 });
  await convert(join(tmp, 'rt2'), join(tmp, 'rt3'), { to: 'safetensors', maxShardSize: 3000 });
  const want = dumps.get('sharded')!;
  assert.deepEqual(sortKeys((await dump('safetensors', join(tmp, 'rt3'))).tensors), sortKeys(want.tensors));
  // Side files travel with directory outputs.
  assert.equal(JSON.parse(await readFile(join(tmp, 'rt3', 'config.json'), 'utf8')).hidden_size, 8);
  // And a single-file round trip reproduces the original safetensors file byte for byte
  // (same tensor order, offsets, header padding), but for the metadata torch formats cannot keep.
  await convert(join(tmp, 'fx', 'all_dtypes.safetensors'), join(tmp, 'ad.pt'), { to: 'torch' });
  await convert(join(tmp, 'ad.pt'), join(tmp, 'ad.dcp'), { to: 'dcp' });
  await convert(join(tmp, 'ad.dcp'), join(tmp, 'ad.safetensors'), { to: 'safetensors' });
  const orig = await readFile(join(tmp, 'fx', 'all_dtypes.safetensors'));
  const back = await readFile(join(tmp, 'ad.safetensors'));
  const dataOf = (b: Buffer): Buffer => b.subarray(8 + Number(b.readBigUInt64LE(0)));
  assert.ok(dataOf(orig).equals(dataOf(back)), 'tensor data region identical');
});

test('zip64: torch loads shardshift\'s >4 GiB archive, and shardshift reads torch\'s', async () => {
  const { writeSparseTorchZip64, BIG } = await import('../helpers/zip64.js');
  const { openCheckpoint } = await import('../../src/checkpoints/registry.js');
  const ours = join(tmp, 'zip64-ours.pt');
  await writeSparseTorchZip64(ours);
  const r = JSON.parse(await runOracle('formats_oracle.py', ['zip64check', ours])) as { big_shape: number[]; big_tail: number[]; after: number[] };
  assert.deepEqual(r, { big_shape: [BIG], big_tail: [0, 0, 0, 0, 0, 0, 0, 0], after: [1, 2, 3, 4] });
  await rm(ours);

  const theirs = join(tmp, 'zip64-torch.pt');
  await runOracle('formats_oracle.py', ['zip64make', theirs]);
  const src = await openCheckpoint(theirs);
  try {
    const tail = new Uint8Array(8);
    await src.tensors.get('big')!.read({ start: [BIG - 8], size: [8] }, tail);
    assert.deepEqual([...tail], [0, 1, 2, 3, 4, 5, 6, 7]);
    const after = new Uint8Array(16);
    await src.tensors.get('after')!.read({ start: [0], size: [4] }, after);
    assert.deepEqual([...new Float32Array(after.buffer)], [1, 2, 3, 4]);
  } finally {
    await src.close();
    await rm(theirs);
  }
});

test('module state_dict → torch keeps the OrderedDict and its _metadata (module versions)', async () => {
  const out = join(tmp, 'module_state_copy.pt');
  await convert(join(tmp, 'fx', 'module_state.pt'), out, { to: 'torch' });
  const a = await runOracle('formats_oracle.py', ['statedict_metadata', join(tmp, 'fx', 'module_state.pt')]);
  const b = await runOracle('formats_oracle.py', ['statedict_metadata', out]);
  assert.deepEqual(JSON.parse(b), JSON.parse(a));
  assert.equal(JSON.parse(b).type, 'OrderedDict');
});

test('a legacy (pre-1.6) torch.save file is recognised and refused by name', async () => {
  const f = join(tmp, 'legacy.pt');
  await runOracle('formats_oracle.py', ['legacy', f]);
  await assert.rejects(convert(f, join(tmp, 'legacy-out'), { to: 'safetensors' }), /legacy\.pt: legacy \(pre-1\.6\) torch\.save pickle-stream format is not supported/);
});
