/**
 * zip64: a torch archive over 4 GiB whose second record starts past 4 GiB, written by
 * shardshift's zip writer as a sparse file (the big record is a hole of zeros, so the test costs
 * disk blocks only for the headers) and read back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { writeSparseTorchZip64, BIG } from '../helpers/zip64.js';
import { openCheckpoint } from '../../src/checkpoints/registry.js';

test('a >4 GiB torch archive with zip64 offsets and sizes reads correctly', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'ss-zip64-'));
  try {
    const f = join(tmp, 'big.pt');
    await writeSparseTorchZip64(f);
    const src = await openCheckpoint(f);
    try {
      const big = src.tensors.get('big')!;
      assert.deepEqual(big.shape, [BIG]);
      assert.equal(big.byteLength, BIG);
      const after = src.tensors.get('after')!;
      const out = new Uint8Array(16);
      await after.read({ start: [0], size: [4] }, out);
      assert.deepEqual([...new Float32Array(out.buffer)], [1, 2, 3, 4]);
      const tail = new Uint8Array(8);
      await big.read({ start: [BIG - 8], size: [8] }, tail);
      assert.deepEqual([...tail], [0, 0, 0, 0, 0, 0, 0, 0]);
    } finally {
      await src.close();
    }
    // The file really needs zip64: its size is past 4 GiB.
    const fh = await open(f, 'r');
    assert.ok((await fh.stat()).size > 2 ** 32);
    await fh.close();
    assert.equal(typeof crc32, 'function');
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});
