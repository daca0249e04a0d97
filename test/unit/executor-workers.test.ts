/**
 * The executor's off-main-thread paths, forced on for small files: SHA-256 on the hash worker,
 * casts on the tinypool, O_DIRECT staging blocks with an unaligned tail, all-zero chunks left as
 * holes, CRCs for computed parts — every combination must give the same bytes and digest as the
 * plain inline path.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { Executor, executorTuning } from '../../src/exec/executor.js';
import { workerTuning } from '../../src/tensor/pool.js';
import { castTo, produceBox } from '../../src/lazy/expr.js';
import { castBytes } from '../../src/tensor/cast.js';
import { tensorSlot, type OutputFile, type ProducedTensor, type TargetTensor } from '../../src/lazy/types.js';
import { boxNumel, contiguousStrides, type Box } from '../../src/tensor/layout.js';

const saved = { e: { ...executorTuning }, w: { ...workerTuning } };
after(() => {
  Object.assign(executorTuning, saved.e);
  Object.assign(workerTuning, saved.w);
});

/** A BF16 tensor with pseudo-random finite bytes, or all zeros. */
function tensor(name: string, shape: number[], zero = false): ProducedTensor {
  const numel = shape.reduce((a, b) => a * b, 1);
  const strides = contiguousStrides(shape);
  return { kind: 'produced',
    name,
    dtype: 'BF16',
    shape,
    byteLength: numel * 2,
    describe: 'pattern',
    produce: async (b: Box, out: Uint8Array) => {
      const n = boxNumel(b);
      assert.equal(out.length, n * 2);
      const flat0 = b.start.reduce((a, s, d) => a + s * strides[d]!, 0);
      for (let e = 0; e < n; e++) {
        const x = flat0 + e;
        out[2 * e] = zero ? 0 : (x * 131 + 7) & 255;
        out[2 * e + 1] = zero ? 0 : ((x * 17 + 3) & 255) & 0xbf;
      }
    },
  };
}

function fileOf(): { f: OutputFile; expect: () => Promise<Uint8Array> } {
  const a = tensor('a', [1500, 1024]); // 3 MB
  const z = tensor('z', [512, 1024], true); // 1 MiB of zeros
  const c = castTo(tensor('c', [700, 1000]), 'F32'); // 2.8 MB of F32
  const slotA = tensorSlot(a, true);
  const slotC = tensorSlot(c, true);
  const head = new Uint8Array([9, 8, 7, 6, 5]);
  const parts = [head, slotA, () => Uint8Array.from([slotA.crc & 255, (slotA.crc >>> 8) & 255]), tensorSlot(z), slotC, () => Uint8Array.from([slotC.crc & 255, 1, 2])];
  const size = 5 + a.byteLength + 2 + z.byteLength + c.byteLength + 3;
  const expect = async (): Promise<Uint8Array> => {
    const whole = async (t: TargetTensor): Promise<Uint8Array> => {
      const out = new Uint8Array(t.byteLength);
      await produceBox(t, { start: t.shape.map(() => 0), size: [...t.shape] }, out);
      return out;
    };
    const ab = await whole(a);
    const zb = new Uint8Array(z.byteLength);
    const src = new Uint8Array(700 * 1000 * 2);
    await produceBox(tensor('c', [700, 1000]), { start: [0, 0], size: [700, 1000] }, src);
    const cb = castBytes(src, 'BF16', 'F32');
    const ca = crc32(ab);
    const cc = crc32(cb);
    return Buffer.concat([head, ab, Uint8Array.from([ca & 255, (ca >>> 8) & 255]), zb, cb, Uint8Array.from([cc & 255, 1, 2])]);
  };
  return { f: { relPath: 'f.bin', size, parts }, expect };
}

const modes: Array<{ name: string; e: Partial<typeof executorTuning>; w: Partial<typeof workerTuning>; budget: number }> = [
  { name: 'inline hashing, buffered writes, inline casts', e: { directBlocks: 0 }, w: { hashWorkerMinBytes: Infinity, castThreads: 0 }, budget: 4 << 20 },
  { name: 'hash worker, buffered writes, cast pool', e: { directBlocks: 0 }, w: { hashWorkerMinBytes: 0, castWorkerMinBytes: 0 }, budget: 4 << 20 },
  { name: 'buffered writes with early write-back every 64 KiB', e: { directBlocks: 0, writeBackBytes: 64 << 10 }, w: { hashWorkerMinBytes: 0, castWorkerMinBytes: 0 }, budget: 4 << 20 },
  { name: 'hash worker, O_DIRECT blocks with an unaligned tail, cast pool', e: { directBlocks: 3, directBlock: 1 << 20, directMinBudget: 0 }, w: { hashWorkerMinBytes: 0, castWorkerMinBytes: 0 }, budget: 4 << 20 },
];

test('every executor path writes the same bytes and SHA-256, with CRCs and holes', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'ss-exw-'));
  try {
    let want: Uint8Array | undefined;
    for (const m of modes) {
      Object.assign(executorTuning, saved.e, m.e);
      Object.assign(workerTuning, saved.w, m.w);
      const { f, expect } = fileOf();
      want ??= await expect();
      const path = join(tmp, `${modes.indexOf(m)}.bin`);
      const ex = new Executor({ maxMemory: m.budget });
      const hex = await ex.writeFile(path, f);
      const got = await readFile(path);
      assert.equal(got.length, want.length, m.name);
      assert.ok(Buffer.compare(got, want) === 0, `${m.name}: bytes differ`);
      assert.equal(hex, createHash('sha256').update(want).digest('hex'), `${m.name}: digest`);
      assert.equal((await stat(path)).size, f.size);
      // A second file through the same executor (arena and staging reused).
      const again = fileOf();
      const hex2 = await ex.writeFile(path + '.2', again.f);
      assert.equal(hex2, hex, `${m.name}: second file`);
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});

test('a failing tensor leaves the executor usable: its error surfaces, the next file is intact', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'ss-exw-'));
  try {
    for (const m of modes) {
      Object.assign(executorTuning, saved.e, m.e);
      Object.assign(workerTuning, saved.w, m.w);
      const bad: TargetTensor = { ...tensor('bad', [4000, 1000]), produce: async (b) => { if (b.start[0]! > 1000) throw new Error('boom'); } };
      const ex = new Executor({ maxMemory: m.budget });
      await assert.rejects(ex.writeFile(join(tmp, `bad${modes.indexOf(m)}.bin`), { relPath: 'bad.bin', size: bad.byteLength, parts: [tensorSlot(bad)] }), /boom/);
      const { f, expect } = fileOf();
      const hex = await ex.writeFile(join(tmp, `ok${modes.indexOf(m)}.bin`), f);
      assert.equal(hex, createHash('sha256').update(await expect()).digest('hex'), m.name);
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});
