/** Writes a sparse torch archive over 4 GiB with shardshift's own writer (for zip64 tests). */
import { open } from 'node:fs/promises';
import { crc32 } from 'node:zlib';
import { writeTorch } from '../../src/formats/torch.js';
import type { TargetTensor } from '../../src/lazy/types.js';
import { produceBox } from '../../src/lazy/expr.js';

/** 4 GiB + 1 MiB: the big record's size and the next record's offset both need zip64. */
export const BIG = 2 ** 32 + (1 << 20);

export async function writeSparseTorchZip64(path: string): Promise<void> {
  const big: TargetTensor = { kind: 'produced', name: 'big', dtype: 'U8', shape: [BIG], byteLength: BIG, produce: async () => undefined, describe: 'zeros' };
  const after: TargetTensor = { kind: 'produced',
    name: 'after', dtype: 'F32', shape: [4], byteLength: 16, describe: 'values',
    produce: async (_b, out) => out.set(new Uint8Array(new Float32Array([1, 2, 3, 4]).buffer)),
  };
  const { files } = writeTorch([big, after], { singleFile: 'big.pt' });
  const fh = await open(path, 'w');
  try {
    let pos = 0;
    for (const part of files[0]!.parts) {
      if (part instanceof Uint8Array || typeof part === 'function') {
        const b = part instanceof Uint8Array ? part : part();
        await fh.write(b, 0, b.length, pos);
        pos += b.length;
      } else if (part.tensor.name === 'big') {
        // Leave a hole; its CRC is that of BIG zero bytes.
        const zeros = new Uint8Array(64 << 20);
        let c = 0;
        for (let left = BIG; left > 0; left -= zeros.length) c = crc32(zeros.subarray(0, Math.min(left, zeros.length)), c);
        part.crc = c;
        pos += BIG;
      } else {
        const b = new Uint8Array(part.tensor.byteLength);
        await produceBox(part.tensor, { start: [0], size: [...part.tensor.shape] }, b);
        part.crc = crc32(b);
        await fh.write(b, 0, b.length, pos);
        pos += b.length;
      }
    }
    await fh.truncate(pos);
  } finally {
    await fh.close();
  }
}
