/** The bounded-memory executor: chunking, ordering, CRCs and the buffer budget. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { chunkBoxes, Executor } from '../../src/exec/executor.js';
import { boxNumel, contiguousStrides, type Box } from '../../src/tensor/layout.js';
import { tensorSlot, type TargetTensor } from '../../src/lazy/types.js';

/** A tensor whose byte i is (i * 7 + 3) mod 251, produced box by box; counts live buffers. */
function patterned(name: string, shape: number[], item: number, live: { now: number; max: number }): TargetTensor {
  const strides = contiguousStrides(shape);
  const numel = shape.reduce((a, b) => a * b, 1);
  return { kind: 'produced',
    name,
    dtype: item === 2 ? 'BF16' : 'U8',
    shape,
    byteLength: numel * item,
    describe: 'pattern',
    produce: async (b: Box, out: Uint8Array) => {
      live.now++;
      live.max = Math.max(live.max, live.now);
      await new Promise((r) => setTimeout(r, 1));
      const n = boxNumel(b);
      assert.equal(out.length, n * item);
      // Walk the box in C order.
      const idx = b.size.map(() => 0);
      for (let e = 0; e < n; e++) {
        let flat = 0;
        for (let d = 0; d < shape.length; d++) flat += (b.start[d]! + idx[d]!) * strides[d]!;
        for (let k = 0; k < item; k++) out[e * item + k] = ((flat * item + k) * 7 + 3) % 251;
        for (let d = shape.length - 1; d >= 0; d--) {
          if (++idx[d]! < b.size[d]!) break;
          idx[d] = 0;
        }
      }
      live.now--;
    },
  };
}

test('chunkBoxes covers the tensor exactly, in C order, each box within the chunk size', () => {
  const cases: Array<[number[], number]> = [[[1000, 300], 4096], [[3, 5, 7000], 1000], [[10_000_000], 1 << 20], [[], 64], [[0, 5], 64], [[4, 3], 1 << 20]];
  for (const [shape, chunk] of cases) {
    const boxes = chunkBoxes({ name: 't', dtype: 'U8', shape }, chunk);
    const numel = shape.reduce((a, b) => a * b, 1);
    let covered = 0;
    let lastFlat = -1;
    const strides = contiguousStrides(shape);
    for (const b of boxes) {
      const n = boxNumel(b);
      assert.ok(n <= chunk || boxes.length === 1, `box of ${n} > chunk ${chunk}`);
      const flat = b.start.reduce((a, s, d) => a + s * strides[d]!, 0);
      assert.ok(flat > lastFlat || n === 0);
      lastFlat = flat;
      covered += n;
    }
    assert.equal(covered, numel, `shape [${shape}]`);
  }
});

test('sub-byte dtypes are chunked on whole bytes', () => {
  const boxes = chunkBoxes({ name: 'f4', dtype: 'F4', shape: [8, 3001] }, 4096);
  assert.ok(boxes.length > 1);
  for (const b of boxes) assert.equal((boxNumel(b) * 4) % 8, 0);
});

test('a tensor 6× the budget streams through a 1 MiB pool bit-exactly, with CRC', async () => {
  const tmp = await mkdtemp(join(tmpdir(), 'ss-exec-'));
  try {
    const live = { now: 0, max: 0 };
    const t = patterned('big', [3 * 1024, 1024], 2, live); // 6 MiB of BF16
    const slot = tensorSlot(t, true);
    const ex = new Executor({ maxMemory: 1 << 20 });
    assert.equal(ex.chunkBytes, 1 << 20);
    const head = new Uint8Array([1, 2, 3]);
    await ex.writeFile(join(tmp, 'f'), { relPath: 'f', size: 3 + t.byteLength + 4, parts: [head, slot, () => Uint8Array.from([slot.crc & 255, 0, 0, 0])] });
    const bytes = await readFile(join(tmp, 'f'));
    assert.equal(bytes.length, 3 + t.byteLength + 4);
    const body = bytes.subarray(3, 3 + t.byteLength);
    for (let i = 0; i < body.length; i += 9973) assert.equal(body[i], (i * 7 + 3) % 251, `byte ${i}`);
    assert.equal(slot.crc, crc32(body));
    assert.equal(bytes[bytes.length - 4], slot.crc & 255);
    // Two 1 MiB buffers at most were ever filled at once (budget 1 MiB → pool of 2 minimum-size chunks).
    assert.ok(live.max <= 2, `at most 2 chunks in flight, saw ${live.max}`);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
});
