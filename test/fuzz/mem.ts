/** An in-memory ByteSource for the fuzz targets. */
import { ShardshiftError } from '../../src/util/errors.js';
import type { ByteSource } from '../../src/io/file.js';

export function memSource(bytes: Uint8Array, name = 'fuzz-input'): ByteSource {
  return {
    name,
    size: bytes.length,
    read: async (position: number, length: number, into?: Uint8Array) => {
      if (position < 0 || length < 0 || position + length > bytes.length) throw new ShardshiftError('BAD_INPUT', `${name}: read of ${length} bytes at ${position} is past its end (${bytes.length})`);
      const out = into ?? new Uint8Array(length);
      out.set(bytes.subarray(position, position + length));
      return out;
    },
  };
}

