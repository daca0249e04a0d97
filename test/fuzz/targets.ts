/**
 * Fuzz targets (issue 16): structure-aware generators for what shardshift parses from untrusted
 * checkpoints — pickles at the opcode level, safetensors headers, zip directories, torch archives
 * — and the function each is fed to. A run may succeed or fail with a typed error (a
 * ShardshiftError or UnpicklingError: one readable message); anything else thrown is a defect,
 * as are hangs, memory blow-ups and crashes (counted by scripts/fuzz.mjs).
 */
import fc from 'fast-check';
import { pickle, unpickle } from '../../src/pickle/index.js';
import { PyDict, StorageRef, TensorRef } from '../../src/pickle/values.js';
import { UnpicklingError } from '../../src/pickle/errors.js';
import { ShardshiftError } from '../../src/util/errors.js';
import { parseHeader } from '../../src/formats/safetensors.js';
import { readZipIndex, readEntryChecked } from '../../src/io/zip.js';
import { openTorchArchive } from '../../src/formats/torch-archive.js';
import { memSource } from './mem.js';
import { archive, FILE_TARGETS } from './files.js';

export { memSource };

export interface FuzzTarget {
  readonly name: string;
  readonly input: fc.Arbitrary<unknown>;
  run(input: unknown): Promise<void>;
}

function bytesTarget(name: string, input: fc.Arbitrary<Uint8Array>, run: (b: Uint8Array) => Promise<void>): FuzzTarget {
  return { name, input, run: (b) => run(b as Uint8Array) };
}

export function isTyped(e: unknown): boolean {
  return e instanceof ShardshiftError || e instanceof UnpicklingError;
}

const u8 = fc.integer({ min: 0, max: 255 });
const u32le = (n: number): number[] => [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, (n >>> 24) & 255];
const str = fc.oneof(fc.constantFrom('', 'a', 'weight', 'model.layers.0', '__reduce__', 'storage'), fc.string({ maxLength: 12 }));
const latin = (s: string): number[] => [...Buffer.from(s, 'utf8')];
const GLOBALS: Array<[string, string]> = [
  ['collections', 'OrderedDict'],
  ['torch._utils', '_rebuild_tensor_v2'],
  ['torch._utils', '_rebuild_parameter'],
  ['torch', 'FloatStorage'],
  ['torch', 'BFloat16Storage'],
  ['builtins', 'set'],
  ['builtins', 'eval'],
  ['os', 'system'],
  ['posix', 'system'],
  ['subprocess', 'Popen'],
  ['_codecs', 'encode'],
  ['functools', 'partial'],
  ['operator', 'attrgetter'],
  ['torch', 'load'],
  ['argparse', 'Namespace'],
  ['numpy.core.multiarray', '_reconstruct'],
];

/** One pickle opcode with plausible (or hostile) arguments. */
const opcode: fc.Arbitrary<readonly number[]> = fc.oneof(
  fc.constantFrom(
    [0x28], // MARK
    [0x2e], // STOP
    [0x4e], // NONE
    [0x88], // NEWTRUE
    [0x5d], // EMPTY_LIST
    [0x7d], // EMPTY_DICT
    [0x29], // EMPTY_TUPLE
    [0x8f], // EMPTY_SET
    [0x61], // APPEND
    [0x65], // APPENDS
    [0x73], // SETITEM
    [0x75], // SETITEMS
    [0x90], // ADDITEMS
    [0x91], // FROZENSET
    [0x85], // TUPLE1
    [0x86], // TUPLE2
    [0x87], // TUPLE3
    [0x74], // TUPLE
    [0x6c], // LIST
    [0x64], // DICT
    [0x94], // MEMOIZE
    [0x32], // DUP
    [0x30], // POP
    [0x31], // POP_MARK
    [0x93], // STACK_GLOBAL
    [0x52], // REDUCE
    [0x62], // BUILD
    [0x81], // NEWOBJ
    [0x92], // NEWOBJ_EX
    [0x51], // BINPERSID
  ),
  fc.tuple(fc.integer({ min: 0, max: 6 })).map(([p]) => [0x80, p]), // PROTO
  u8.map((x) => [0x4b, x]), // BININT1
  fc.integer().map((x) => [0x4a, ...u32le(x)]), // BININT
  u8.map((x) => [0x71, x]), // BINPUT
  u8.map((x) => [0x68, x]), // BINGET
  fc.integer({ min: 0, max: 2 ** 32 - 1 }).map((x) => [0x6a, ...u32le(x)]), // LONG_BINGET (hostile indices)
  str.map((s) => [0x8c, latin(s).length & 255, ...latin(s)]), // SHORT_BINUNICODE
  fc.tuple(fc.integer({ min: 0, max: 2 ** 32 - 1 }), fc.uint8Array({ maxLength: 8 })).map(([n, d]) => [0x58, ...u32le(n), ...d]), // BINUNICODE, claimed length
  fc.uint8Array({ maxLength: 16 }).map((d) => [0x43, d.length, ...d]), // SHORT_BINBYTES
  fc.uint8Array({ maxLength: 9 }).map((d) => [0x8a, d.length, ...d]), // LONG1
  fc.constantFrom(...GLOBALS).map(([m, n]) => [0x63, ...latin(m), 10, ...latin(n), 10]), // GLOBAL
  fc.integer({ min: 0, max: 2 ** 32 - 1 }).map((n) => [0x95, ...u32le(n), 0, 0, 0, 0]), // FRAME
  fc.uint8Array({ minLength: 1, maxLength: 4 }).map((d) => [...d]), // raw bytes
);

export const picklesArb: fc.Arbitrary<Uint8Array> = fc
  .tuple(fc.array(opcode, { maxLength: 60 }), fc.boolean())
  .map(([ops, stop]) => Uint8Array.from([0x80, 2, ...ops.flat(), ...(stop ? [0x2e] : [])]));

const mutation = fc.oneof(
  fc.tuple(fc.nat(), u8).map(([at, b]) => ({ kind: 'set' as const, at, b })),
  fc.nat().map((at) => ({ kind: 'cut' as const, at })),
  fc.tuple(fc.nat(), fc.integer({ min: 0, max: 2 ** 32 - 1 })).map(([at, v]) => ({ kind: 'u32' as const, at, v })),
);

function mutate(base: Uint8Array, ms: ReadonlyArray<{ kind: 'set' | 'cut' | 'u32'; at: number; b?: number; v?: number }>): Uint8Array {
  let out = Uint8Array.from(base);
  for (const m of ms) {
    if (out.length === 0) break;
    const at = m.at % out.length;
    if (m.kind === 'set') out[at] = m.b!;
    else if (m.kind === 'cut') out = out.subarray(0, at);
    else for (let k = 0; k < 4 && at + k < out.length; k++) out[at + k] = (m.v! >>> (8 * k)) & 255;
  }
  return out;
}

const DTYPES = ['F32', 'F16', 'BF16', 'F64', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL', 'F8_E4M3', 'F8_E5M2', 'F4', 'X9', ''];
const dim = fc.oneof(fc.integer({ min: 0, max: 8 }), fc.constantFrom(2 ** 31, 2 ** 53, -1, 1e300));
const headerEntry = fc.record({
  dtype: fc.oneof(fc.constantFrom(...DTYPES), fc.integer()),
  shape: fc.oneof(fc.array(dim, { maxLength: 4 }), fc.constant('x')),
  data_offsets: fc.oneof(fc.tuple(fc.integer({ min: -4, max: 600 }), fc.integer({ min: -4, max: 600 })), fc.constant([0]), fc.constant(null)),
});

/** A consistent header (contiguous offsets, real dtypes) for the generator to start from. */
const validHeader = fc.array(fc.tuple(str, fc.constantFrom('F32', 'BF16', 'I64', 'U8', 'F8_E4M3'), fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 3 })), { maxLength: 5 }).map((ts) => {
  const item: Record<string, number> = { F32: 4, BF16: 2, I64: 8, U8: 1, F8_E4M3: 1 };
  const h: Record<string, unknown> = {};
  let off = 0;
  for (const [name, dtype, shape] of ts) {
    const n = shape.reduce((a, b) => a * b, 1) * item[dtype]!;
    h[name] = { dtype, shape, data_offsets: [off, off + n] };
    off += n;
  }
  return { h, dataLen: off };
});

const validSafetensors: fc.Arbitrary<Uint8Array> = fc.tuple(validHeader, fc.array(mutation, { maxLength: 3 })).map(([{ h, dataLen }, ms]) => {
  const json = Buffer.from(JSON.stringify(h));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return mutate(Uint8Array.from(Buffer.concat([len, json, Buffer.alloc(dataLen)])), ms);
});

const randomSafetensors: fc.Arbitrary<Uint8Array> = fc
  .tuple(fc.dictionary(str, headerEntry, { maxKeys: 6 }), fc.boolean(), fc.integer({ min: 0, max: 600 }), fc.integer({ min: -16, max: 16 }), fc.boolean())
  .map(([entries, meta, dataLen, lenSkew, garbage]) => {
    const h: Record<string, unknown> = { ...entries };
    if (meta) h.__metadata__ = { format: 'pt' };
    const json = garbage ? Buffer.from('{"a": [1, 2') : Buffer.from(JSON.stringify(h));
    const len = Buffer.alloc(8);
    len.writeBigInt64LE(BigInt(json.length + lenSkew));
    return Uint8Array.from(Buffer.concat([len, json, Buffer.alloc(dataLen)]));
  });

export const safetensorsArb: fc.Arbitrary<Uint8Array> = fc.oneof(validSafetensors, randomSafetensors);

/** A valid torch archive (a dict with one bf16 tensor) to mutate. */
function baseArchive(pkl: Uint8Array): Uint8Array {
  return archive([
    { name: 'archive/data.pkl', data: pkl },
    { name: 'archive/data/0', data: new Uint8Array(16) },
    { name: 'archive/version', data: Buffer.from('3\n') },
    { name: 'archive/byteorder', data: Buffer.from('little') },
  ]);
}

/** {'w': a bf16 [2, 4] tensor of storage '0'}, as the project's pickler writes it (what torch writes). */
const TENSOR_PKL = (() => {
  const d = new PyDict();
  d.set('w', new TensorRef(new StorageRef('0', 'BF16', 'cpu', 8, false), 0, [2, 4], [4, 1], 'BF16'));
  return pickle(d);
})();

export const zipArb: fc.Arbitrary<Uint8Array> = fc.array(mutation, { minLength: 1, maxLength: 6 }).map((ms) => mutate(baseArchive(TENSOR_PKL), ms));
export const archiveArb: fc.Arbitrary<Uint8Array> = picklesArb.map((pkl) => baseArchive(pkl));

export const TARGETS: readonly FuzzTarget[] = [
  bytesTarget('pickle (opcodes)', picklesArb, async (b) => void unpickle(b, { source: 'fuzz.pkl' })),
  bytesTarget('safetensors header', safetensorsArb, async (b) => {
    const n = b.length >= 8 ? Number(Buffer.from(b.subarray(0, 8)).readBigUInt64LE(0)) : 0;
    if (b.length < 8) throw new ShardshiftError('BAD_INPUT', 'short');
    void parseHeader('fuzz.safetensors', b.subarray(0, 8), b.subarray(8, 8 + Math.min(n, b.length)), b.length);
  }),
  bytesTarget('zip directory (mutated torch archive)', zipArb, async (b) => {
    const src = memSource(b, 'fuzz.pt');
    const idx = await readZipIndex(src);
    for (const e of idx.entries.values()) await readEntryChecked(src, e);
    await openTorchArchive(src);
  }),
  bytesTarget('torch archive (fuzzed data.pkl)', archiveArb, async (b) => void (await openTorchArchive(memSource(b, 'fuzz.pt')))),
  ...FILE_TARGETS,
];
