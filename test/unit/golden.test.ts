/**
 * Pure-TypeScript checks against the committed golden fixtures (files written by real torch,
 * safetensors and DCP, with the digests torch computed): every tensor shardshift reads matches
 * torch bit for bit, and conversions among the formats keep every byte.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { digestPath, sortKeys, type TensorDigest } from '../helpers/describe.js';
import { convert } from '../../src/plan/convert.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';
import type { FormatName } from '../../src/formats/types.js';

const dir = join(repoRoot, 'test', 'fixtures', 'golden');
const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Record<string, { format: FormatName; tensors: Record<string, TensorDigest>; objects: Record<string, string> }>;
const fixtures = Object.entries(expected).filter(([k]) => !k.startsWith('_'));

for (const [name, want] of fixtures) {
  test(`golden ${name}: every tensor matches torch bit for bit`, async () => {
    const got = await digestPath(join(dir, name));
    assert.deepEqual(sortKeys(got), sortKeys(want.tensors));
  });

  test(`golden ${name}: format detected as ${want.format}, non-tensor entries found`, async () => {
    const src = await openCheckpoint(join(dir, name));
    try {
      assert.equal(src.format, want.format);
      assert.deepEqual([...src.objects.keys()].sort(), Object.keys(want.objects).sort());
    } finally {
      await src.close();
    }
  });

  for (const to of ['safetensors', 'torch', 'dcp'] as const) {
    const hasC128 = Object.values(want.tensors).some((t) => t.dtype === 'C128');
    test(`golden ${name} → ${to}: bit-identical tensors`, async () => {
      const tmp = await mkdtemp(join(tmpdir(), 'ss-golden-'));
      try {
        const out = join(tmp, 'out');
        if (to === 'safetensors' && hasC128) {
          await assert.rejects(convert(join(dir, name), out, { to }), /safetensors cannot store C128/);
          return;
        }
        await convert(join(dir, name), out, { to, maxMemory: 4 << 20 });
        assert.deepEqual(sortKeys(await digestPath(out)), sortKeys(want.tensors));
      } finally {
        await rm(tmp, { recursive: true, force: true });
      }
    });
  }
}

test('golden assorted.pt → torch keeps the nesting and the non-tensor values', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'ss-golden-'));
  try {
    await convert(join(dir, 'assorted.pt'), join(tmp, 'a.pt'), { to: 'torch' });
    const src = await openCheckpoint(join(tmp, 'a.pt'));
    try {
      assert.deepEqual([...src.objects.keys()].sort(), Object.keys(expected['assorted.pt']!.objects).sort());
      assert.equal(src.objects.get('meta.step')?.value, 5);
      assert.equal(src.objects.get('meta.name')?.value, 'tiny');
      assert.equal(src.objects.get('meta.big')?.value, 2n ** 70n);
    } finally {
      await src.close();
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});

test('safetensors written by shardshift are byte-identical to the safetensors library\'s own file', async () => {
  // The shard was written by safetensors.torch.save_file with metadata {"format": "pt"}; going
  // through torch.save and back must reproduce it exactly (order, offsets, header, padding).
  const tmp = await mkdtemp(join(tmpdir(), 'ss-golden-'));
  try {
    const orig = join(dir, 'sharded', 'model-00001-of-00002.safetensors');
    await convert(orig, join(tmp, 'x.pt'), { to: 'torch' });
    await convert(join(tmp, 'x.pt'), join(tmp, 'x.safetensors'), { to: 'safetensors' });
    assert.ok(readFileSync(orig).equals(readFileSync(join(tmp, 'x.safetensors'))));
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});
