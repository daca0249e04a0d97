import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import {
  unpickle, pickle, toPlain, storageFromPersistentId, enumClass, UnpicklingError, PicklingError,
  PyByteArray, PyComplex, PyDict, PyFloat, PyGlobal, PyObject, PySet, PySlice, PyTuple, StorageRef, TensorRef, TorchSize,
  type PyValue, type UnpickleOptions,
} from '../../src/pickle/index.js';

// ---------------------------------------------------------------------------------------------
// Helpers

/** Bytes from parts: numbers are bytes, strings are latin-1 text, arrays are spliced in. */
function b(...parts: Array<number | string | Uint8Array | number[]>): Uint8Array {
  const out: number[] = [];
  for (const p of parts) {
    if (typeof p === 'number') out.push(p);
    else if (typeof p === 'string') {
      for (const ch of p) {
        const c = ch.charCodeAt(0);
        assert.ok(c <= 0xff && ch.length === 1, `not latin-1: ${ch}`);
        out.push(c);
      }
    } else out.push(...p);
  }
  return Uint8Array.from(out);
}
const u32 = (n: number): number[] => [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff];
const u64 = (n: number): number[] => [...u32(n % 2 ** 32), ...u32(Math.floor(n / 2 ** 32))];
const hex = (x: Uint8Array): string => Buffer.from(x).toString('hex');
const G = (module: string, name: string): PyGlobal => new PyGlobal(module, name);
const T = (...items: PyValue[]): PyTuple => new PyTuple(items);

function load(data: Uint8Array, opts?: UnpickleOptions): PyValue {
  return unpickle(data, opts);
}

function rejects(data: Uint8Array, pattern: RegExp, opts?: UnpickleOptions): UnpicklingError {
  let err: unknown;
  try {
    unpickle(data, opts);
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof UnpicklingError, `expected an UnpicklingError matching ${pattern}, got ${String(err)}`);
  assert.match(err.message, pattern);
  return err;
}

/** persistentLoad that returns one StorageRef per key (as a zip reader would). */
function storages(): (pid: PyValue) => PyValue {
  const cache = new Map<string, StorageRef>();
  return (pid) => {
    const s = storageFromPersistentId(pid);
    const seen = cache.get(s.key);
    if (seen) return seen;
    cache.set(s.key, s);
    return s;
  };
}

interface Fixtures {
  protocol_cases: Array<{ name: string; plain: unknown; pickles: Record<string, string> }>;
  pickler_goldens: Array<{ name: string; hex: string }>;
  torch_save: { data_pkl: string; plain: unknown };
}
const fixtures = JSON.parse(readFileSync(join(repoRoot, 'test', 'fixtures', 'pickles.json'), 'utf8')) as Fixtures;
const fromB64 = (s: string): Uint8Array => new Uint8Array(Buffer.from(s, 'base64'));

// ---------------------------------------------------------------------------------------------
// Opcode families, hand-built

test('ints: BININT1/2, BININT, LONG1/LONG4, INT and LONG text, bools', () => {
  assert.equal(load(b('K', 5, '.')), 5);
  assert.equal(load(b('M', 0, 1, '.')), 256);
  assert.equal(load(b('J', 0xff, 0xff, 0xff, 0xff, '.')), -1);
  assert.equal(load(b('J', 0x00, 0x80, 0xff, 0xff, '.')), -32768);
  assert.equal(load(b(0x8a, 0, '.')), 0);
  assert.equal(load(b(0x8a, 1, 0xff, '.')), -1);
  assert.equal(load(b(0x8a, 2, 0x00, 0x80, '.')), -32768);
  assert.equal(load(b(0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 1, '.')), 2n ** 64n);
  assert.equal(load(b(0x8a, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, '.')), 2 ** 53 - 1);
  assert.equal(load(b(0x8a, 7, 0, 0, 0, 0, 0, 0, 0x20, '.')), 2n ** 53n);
  assert.equal(load(b(0x8b, ...u32(1), 0x7f, '.')), 127);
  assert.equal(load(b('I42\n.')), 42);
  assert.equal(load(b('I-7\n.')), -7);
  assert.equal(load(b('I00\n.')), false);
  assert.equal(load(b('I01\n.')), true);
  assert.equal(load(b('I123456789012345678901234567890\n.')), 123456789012345678901234567890n);
  assert.equal(load(b('L12345678901234567890L\n.')), 12345678901234567890n);
  assert.equal(load(b('L5\n.')), 5);
  assert.equal(load(b('N.')), null);
  assert.equal(load(b(0x88, '.')), true);
  assert.equal(load(b(0x89, '.')), false);
  rejects(b('I12x\n.'), /invalid int literal "12x" \(at byte 0\)/);
});

test('floats: BINFLOAT and FLOAT text', () => {
  assert.deepEqual(load(b('G', 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, '.')), new PyFloat(1.5));
  assert.deepEqual(load(b('F1.25\n.')), new PyFloat(1.25));
  assert.deepEqual(load(b('F-1e300\n.')), new PyFloat(-1e300));
  assert.deepEqual(load(b('Finf\n.')), new PyFloat(Infinity));
  assert.deepEqual(load(b('F-inf\n.')), new PyFloat(-Infinity));
  assert.ok(Number.isNaN((load(b('Fnan\n.')) as PyFloat).value));
  rejects(b('F0x10\n.'), /invalid float literal/);
});

test('strings: STRING/BINSTRING/SHORT_BINSTRING (latin-1), UNICODE, BINUNICODE variants', () => {
  assert.equal(load(b("S'a\\nb\\x41\\'c\\101\\q'\n.")), "a\nbA'cA\\q");
  assert.equal(load(b('S"hi"\n.')), 'hi');
  rejects(b('Shi\n.'), /STRING opcode argument must be quoted/);
  assert.equal(load(b('T', ...u32(3), 'a', 0xff, 'b', '.')), 'a\u00ffb');
  assert.equal(load(b('U', 2, 0xe9, 'x', '.')), '\u00e9x');
  assert.equal(load(b('V\\u00e9\\U0001f600 \\\\u0041 \\\\\\u0042 a\\b\n.')), 'é😀 \\\\u0041 \\\\B a\\b');
  const uni = new TextEncoder().encode('ünï日本😀');
  assert.equal(load(b('X', ...u32(uni.length), uni, '.')), 'ünï日本😀');
  assert.equal(load(b(0x8c, uni.length, uni, '.')), 'ünï日本😀');
  assert.equal(load(b(0x8d, ...u64(uni.length), uni, '.')), 'ünï日本😀');
  assert.equal(load(b('X', ...u32(5), 'a', 0xed, 0xa0, 0x80, 'b', '.')), 'a\ud800b', 'surrogatepass');
  rejects(b('X', ...u32(2), 0xc3, 0x28, '.'), /not valid UTF-8/);
});

test('bytes: SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8', () => {
  assert.deepEqual(load(b('C', 3, 'abc', '.')), b('abc'));
  assert.deepEqual(load(b('B', ...u32(2), 0, 0xff, '.')), b(0, 0xff));
  assert.deepEqual(load(b(0x8e, ...u64(1), 'z', '.')), b('z'));
  assert.deepEqual(load(b(0x96, ...u64(2), 'hi', '.')), new PyByteArray(b('hi')));
});

test('containers: tuples, lists, dicts (tuple keys), sets', () => {
  assert.deepEqual(load(b(')', '.')), T());
  assert.deepEqual(load(b('K', 1, 0x85, '.')), T(1));
  assert.deepEqual(load(b('K', 1, 'K', 2, 0x86, '.')), T(1, 2));
  assert.deepEqual(load(b('K', 1, 'K', 2, 'K', 3, 0x87, '.')), T(1, 2, 3));
  assert.deepEqual(load(b('(K', 1, 'K', 2, 'K', 3, 'K', 4, 't.')), T(1, 2, 3, 4));
  assert.deepEqual(load(b(']K', 1, 'a.')), [1]);
  assert.deepEqual(load(b('](K', 1, 'K', 2, 'e.')), [1, 2]);
  assert.deepEqual(load(b('(K', 1, 'K', 2, 'l.')), [1, 2]);
  assert.deepEqual(load(b('}U', 1, 'aK', 1, 's.')), PyDict.from({ a: 1 }));
  assert.deepEqual(load(b('(U', 1, 'aK', 1, 'U', 1, 'bK', 2, 'd.')), PyDict.from({ a: 1, b: 2 }));
  assert.deepEqual(load(b('}(U', 1, 'aK', 1, 'U', 1, 'bK', 2, 'u.')), PyDict.from({ a: 1, b: 2 }));
  const d = load(b('}K', 1, 'K', 2, 0x86, 'U', 1, 'vs.')) as PyDict;
  assert.deepEqual(d.entries, [[T(1, 2), 'v']]);
  assert.deepEqual(load(b(0x8f, '(K', 1, 'K', 2, 'K', 1, 0x90, '.')), new PySet([1, 2], false));
  assert.deepEqual(load(b('(K', 5, 0x91, '.')), new PySet([5], true));
  rejects(b('(K', 1, 'd.'), /odd number of items/);
  rejects(b(']', '(K', 1, 0x90, '.'), /ADDITEMS on \[\], which is not a set/);
});

test('stack: POP, POP_MARK, DUP, MARK', () => {
  assert.equal(load(b('K', 1, 'K', 2, '0.')), 1);
  assert.equal(load(b('K', 1, '(K', 2, 'K', 3, '1.')), 1);
  assert.deepEqual(load(b('K', 1, '2', 0x86, '.')), T(1, 1));
  assert.equal(load(b('K', 1, '(0.')), 1, 'POP removes an empty mark');
  rejects(b('0.'), /POP finds the stack empty/);
  rejects(b('(R.'), /REDUCE finds the stack empty/);
  rejects(b('1.'), /POP_MARK without a MARK/);
});

test('memo: PUT/GET, BINPUT/BINGET, LONG_BINPUT/LONG_BINGET, MEMOIZE', () => {
  assert.equal(load(b('K', 7, 'p0\n0g0\n.')), 7);
  assert.equal(load(b('K', 7, 'q', 5, '0h', 5, '.')), 7);
  assert.equal(load(b('K', 7, 'r', ...u32(70000), '0j', ...u32(70000), '.')), 7);
  assert.equal(load(b(0x80, 4, 'K', 7, 0x94, 'K', 8, 0x94, '00h', 1, '.')), 8);
  const shared = load(b(']q', 0, 'h', 0, 'h', 0, 0x86, '.')) as PyTuple;
  assert.equal(shared.items[0], shared.items[1], 'BINGET returns the same object');
});

test('FRAME is validated', () => {
  assert.equal(load(b(0x80, 4, 0x95, ...u64(3), 'K', 7, '.')), 7);
  rejects(b(0x80, 4, 0x95, ...u64(30), 'K', 7, '.'), /pickle ends early at byte 14 \(FRAME declares 30 bytes/);
  rejects(b(0x80, 4, 0x95, ...u64(2), 'M', 1, 0, '.'), /BININT2 reads past the end of its frame \(byte 13\)/);
  assert.equal(load(b(0x80, 4, 0x95, ...u64(1), 'K', 7, '.')), 7, 'as CPython: an argument may follow a frame that ends after its opcode');
  rejects(b(0x80, 4, 0x95, ...u64(2), 0x95, ...u64(0), '.'), /new FRAME begins before the end of the current one/);
});

test('PROTO: protocols above 5 are refused', () => {
  rejects(b(0x80, 6, 'N.'), /unsupported pickle protocol: 6/);
});

test('GLOBAL / STACK_GLOBAL: values, Python 2 names at protocols < 3', () => {
  assert.deepEqual(load(b(0x80, 2, 'ctorch\nfloat32\n.')), G('torch', 'float32'));
  assert.deepEqual(load(b(0x80, 4, 0x8c, 5, 'torch', 0x8c, 7, 'float32', 0x93, '.')), G('torch', 'float32'));
  assert.deepEqual(load(b(0x80, 2, 'c__builtin__\nset\n]K', 1, 'a', 0x85, 'R.')), new PySet([1], false));
  rejects(b(0x80, 3, 'c__builtin__\nset\n]', 0x85, 'R.'), /not allowed: __builtin__\.set/);
  rejects(b(0x80, 4, 'K', 1, 'K', 2, 0x93, '.'), /STACK_GLOBAL needs a module and a name that are str/);
});

test('INST, OBJ, NEWOBJ, NEWOBJ_EX, BUILD through the allow-list', () => {
  assert.deepEqual(load(b('(F1.0\nF2.0\ni__builtin__\ncomplex\n.')), new PyComplex(1, 2));
  const ns = new PyObject('argparse', 'Namespace', PyDict.from({ a: 1 }));
  assert.deepEqual(load(b("(iargparse\nNamespace\n(dp0\nS'a'\nI1\nsb.")), ns);
  assert.deepEqual(load(b('(cargparse\nNamespace\no}U', 1, 'aK', 1, 'sb.')), ns);
  assert.deepEqual(load(b(0x80, 2, 'cargparse\nNamespace\n)', 0x81, '}U', 1, 'aK', 1, 'sb.')), ns);
  assert.deepEqual(load(b(0x80, 4, 0x8c, 8, 'argparse', 0x8c, 9, 'Namespace', 0x93, ')}', 0x92, '.')), new PyObject('argparse', 'Namespace'));
  rejects(b(0x80, 2, 'cargparse\nNamespace\nK', 1, 0x85, 0x81, '.'), /argparse\.Namespace\.__new__ takes no arguments/);
  rejects(b(0x80, 2, 'ctorch\nfloat32\n)', 0x81, '.'), /torch\.float32, which is not an allowed class/);
  rejects(b(0x80, 2, 'cargparse\nNamespace\n)R.'), /pickle calls argparse\.Namespace, which may not be called/);
  rejects(b(0x80, 2, '}K', 1, 'b.'), /BUILD sets state 1 on \{\}, which is not an allowed object/);
  rejects(b(0x80, 2, 'cargparse\nNamespace\n)', 0x81, 'K', 1, 'b.'), /argparse\.Namespace: state must be a dict/);
});

test('PERSID and BINPERSID go to persistentLoad; without it they are errors', () => {
  const persistentLoad = (pid: PyValue): PyValue => ['pid', pid];
  assert.deepEqual(load(b('Pabc\n.'), { persistentLoad }), ['pid', 'abc']);
  assert.deepEqual(load(b(0x80, 2, 'K', 3, 'Q.'), { persistentLoad }), ['pid', 3]);
  rejects(b('Pabc\n.'), /persistent id "abc", but no persistentLoad was given/);
  const e = rejects(b(0x80, 2, 'K', 3, 'Q.'), /persistent id 3: no such storage \(at byte 4 of ckpt\.pt:archive\/data\.pkl\)/, {
    persistentLoad: () => { throw new Error('no such storage'); }, source: 'ckpt.pt:archive/data.pkl',
  });
  assert.equal(e.pos, 4);
});

test('EXT1/2/4, out-of-band buffers and unknown opcodes are refused by name', () => {
  rejects(b(0x80, 2, 0x82, 7, '.'), /extension code 7 \(EXT1/);
  rejects(b(0x80, 2, 0x83, 0x34, 0x12, '.'), /extension code 4660 \(EXT2/);
  rejects(b(0x80, 2, 0x84, ...u32(99999), '.'), /extension code 99999 \(EXT4/);
  rejects(b(0x80, 5, 0x97, '.'), /out-of-band buffer \(protocol 5 NEXT_BUFFER\)/);
  rejects(b(0x80, 5, 'C', 1, 'a', 0x98, '.'), /out-of-band buffer \(protocol 5 READONLY_BUFFER\)/);
  rejects(b(0xff, '.'), /unknown opcode 0xff/);
});

test('extraGlobals add entries (one table entry per class) but cannot allow blocked modules', () => {
  const extraGlobals = { 'megatron.core.enums.ModelType': enumClass([1, 2]) };
  assert.deepEqual(
    load(b('cmegatron.core.enums\nModelType\n(I1\ntR.'), { extraGlobals }),
    new PyObject('megatron.core.enums', 'ModelType', new PyDict(), [1], 'call'),
  );
  rejects(b('cmegatron.core.enums\nModelType\n(I3\ntR.'), /megatron\.core\.enums\.ModelType: 3 is not a valid ModelType/, { extraGlobals });
  rejects(b('cmegatron.core.enums\nModelType\n(I1\ntR.'), /not allowed: megatron\.core\.enums\.ModelType/);
  rejects(b('N.'), /extraGlobals may not allow os\.system/, { extraGlobals: { 'os.system': { kind: 'function', call: () => null } } });
  rejects(b('N.'), /extraGlobals may not allow builtins\.eval/, { extraGlobals: { 'builtins.eval': { kind: 'function', call: () => null } } });
});

// ---------------------------------------------------------------------------------------------
// Golden fixtures (CPython pickles of protocols 0–5)

test('fixtures: every protocol 0–5 pickle of the golden structures reads back to its plain form', () => {
  assert.ok(fixtures.protocol_cases.length >= 3);
  for (const c of fixtures.protocol_cases) {
    assert.deepEqual(Object.keys(c.pickles).sort(), ['0', '1', '2', '3', '4', '5']);
    for (const [proto, b64] of Object.entries(c.pickles)) {
      const v = unpickle(fromB64(b64), { source: `${c.name}@${proto}` });
      assert.deepStrictEqual(toPlain(v), c.plain, `${c.name} protocol ${proto}`);
    }
  }
});

test('fixtures: the DCP Metadata fixture has the expected structure', () => {
  const md = unpickle(fromB64(fixtures.protocol_cases.find((c) => c.name === 'metadata')!.pickles['2']!)) as PyObject;
  assert.equal(md.qualname, 'torch.distributed.checkpoint.metadata.Metadata');
  const sdm = md.attr('state_dict_metadata') as PyDict;
  assert.deepEqual([...sdm.stringEntries()].map(([k]) => k), ['model.w', 'model.b', 'step']);
  const w = sdm.get('model.w') as PyObject;
  const props = w.attr('properties') as PyObject;
  assert.ok(props.state instanceof PyTuple && props.state.items.length === 5, 'TensorProperties keeps its tuple state');
  assert.deepEqual(props.state.items[0], G('torch', 'float32'));
  assert.deepEqual(props.state.items[1], G('torch', 'strided'));
  assert.ok(w.attr('size') instanceof TorchSize);
  const storageData = md.attr('storage_data') as PyDict;
  const [firstKey, firstInfo] = storageData.entries[0]!;
  assert.equal((firstKey as PyObject).attr('fqn'), 'model.w');
  assert.deepEqual((firstKey as PyObject).attr('offset'), new TorchSize([0, 0]));
  assert.equal((firstInfo as PyObject).attr('relative_path'), '__0_0.distcp');
});

test('fixtures: torch.save data.pkl reads into TensorRefs and re-pickles to the same bytes', () => {
  const data = fromB64(fixtures.torch_save.data_pkl);
  const sd = unpickle(data, { persistentLoad: storages() }) as PyDict;
  assert.deepStrictEqual(toPlain(sd), fixtures.torch_save.plain);
  assert.equal(sd.kind, 'OrderedDict');
  const w = sd.get('w') as TensorRef;
  const wt = sd.get('w_t') as TensorRef;
  assert.equal(w.storage, wt.storage);
  assert.deepEqual(wt.stride, [1, 4]);
  assert.equal((sd.get('fp8') as TensorRef).dtype, 'F8_E4M3');
  assert.ok((sd.get('fp8') as TensorRef).storage.untyped);
  assert.equal(hex(pickle(sd)), hex(data));
});

// ---------------------------------------------------------------------------------------------
// Malicious and malformed pickles

test('malicious: os.system / posix.system through __reduce__', () => {
  const e = rejects(b("cos\nsystem\n(S'echo pwned'\ntR."), /^pickle calls a global that is not allowed: os\.system \(at byte 0\)$/);
  assert.equal(e.global, 'os.system');
  // What CPython writes for `(os.system, ('echo pwned',))` on Linux, protocols 0 and 4.
  rejects(b('cposix\nsystem\np0\n(Vecho pwned\np1\ntp2\nRp3\n.'), /not allowed: posix\.system/);
  rejects(
    b(0x80, 4, 0x95, 0x25, 0, 0, 0, 0, 0, 0, 0, 0x8c, 5, 'posix', 0x94, 0x8c, 6, 'system', 0x94, 0x93, 0x94, 0x8c, 10, 'echo pwned', 0x94, 0x85, 0x94, 'R', 0x94, '.'),
    /not allowed: posix\.system \(at byte 28\)/,
  );
  rejects(b(0x80, 2, 'csubprocess\nPopen\n.'), /not allowed: subprocess\.Popen/);
});

test('malicious: builtins.eval, builtins.getattr (also under their Python 2 names)', () => {
  rejects(b("c__builtin__\neval\n(S'1+1'\ntR."), /not allowed: builtins\.eval \(written as __builtin__\.eval\)/);
  rejects(b(0x80, 4, 0x8c, 8, 'builtins', 0x8c, 4, 'eval', 0x93, '.'), /not allowed: builtins\.eval/);
  rejects(b(0x80, 4, 0x8c, 8, 'builtins', 0x8c, 7, 'getattr', 0x93, '.'), /not allowed: builtins\.getattr/);
});

test('malicious: a look-alike of an allowed module (torch._utils.evil)', () => {
  const e = rejects(b(0x80, 2, 'ctorch._utils\nevil\n)R.'), /not allowed \(a look-alike of the allowed torch\._utils names\): torch\._utils\.evil/);
  assert.equal(e.global, 'torch._utils.evil');
  rejects(b(0x80, 2, 'ccollections\ndefaultdict\n.'), /look-alike .*: collections\.defaultdict/);
});

test('malicious: SETITEM(S) on a non-dict (torch CVE) and APPEND on a non-list', () => {
  rejects(b(0x80, 2, '](K', 1, 'K', 2, 'u.'), /SETITEMS on \[\], which is not a dict/);
  rejects(b(0x80, 2, ']K', 1, 'K', 2, 's.'), /SETITEM on \[\], which is not a dict/);
  rejects(b(0x80, 2, 'ctorch\nfloat32\n(K', 1, 'K', 2, 'u.'), /SETITEMS on torch\.float32, which is not a dict/);
  rejects(b(0x80, 2, '}K', 1, 'a.'), /APPEND to \{\}, which is not a list/);
  rejects(b(0x80, 2, ')(K', 1, 'e.'), /APPENDS to \(\), which is not a list/);
});

test('malformed: every truncation of the golden pickles is refused as ending early', () => {
  const all = fixtures.protocol_cases.flatMap((c) => Object.values(c.pickles).map(fromB64));
  all.push(fromB64(fixtures.torch_save.data_pkl));
  let n = 0;
  for (const data of all.slice(0, 40)) {
    const step = Math.max(1, Math.floor(data.length / 300));
    for (let len = 0; len < data.length; len += step) {
      rejects(data.subarray(0, len), new RegExp(`^pickle ends early at byte ${len} `), { persistentLoad: storages() });
      n++;
    }
  }
  assert.ok(n > 1000);
});

test('malformed: nesting beyond the limit (tuples, lists, MARKs)', () => {
  const tuples = b(')', ...new Array<number>(1500).fill(0x85), '.');
  rejects(tuples, /nests containers deeper than the limit of 1000 levels/);
  assert.ok(unpickle(tuples, { limits: { nesting: 2000 } }) instanceof PyTuple);
  rejects(b(...new Array<number>(1500).fill(0x5d), ...new Array<number>(1499).fill(0x61), '.'), /deeper than the limit of 1000/);
  rejects(b(...new Array<number>(1001).fill(0x28), '.'), /MARKs nest deeper than the limit of 1000 \(at byte 1000\)/);
  rejects(b(...new Array<number>(20).fill(0x4e), '.'), /stack grows beyond the limit of 10 items/, { limits: { stack: 10 } });
});

test('malformed: huge memo indices, missing memo entries', () => {
  rejects(b('N', 'r', 0xff, 0xff, 0xff, 0xff, '.'), /memo index 4294967295 is beyond the limit of 100000000 entries/);
  rejects(b('j', 0xff, 0xff, 0xff, 0xff, '.'), /memo index 4294967295 is beyond the limit/);
  rejects(b('h', 5, '.'), /memo has no entry 5 \(at byte 0\)/);
  rejects(b('Np-1\n.'), /negative memo index -1/);
  rejects(b('N', 'q', 20, '.'), /memo index 20 is beyond the limit of 10 entries/, { limits: { memo: 10 } });
});

test('malformed: exponential sharing and cycles are refused', () => {
  rejects(b(')', ...new Array<number>(64).fill(0).flatMap(() => [0x32, 0x86]), '.'), /expands to more than 1000000 containers/);
  rejects(b(']q', 0, 'h', 0, 'a.'), /cyclic structure/);
  rejects(b('}q', 0, 'K', 1, 'h', 0, 's.'), /cyclic structure/);
});

test('tensor rebuilds are validated strictly', () => {
  const pid = '(U\x07storagectorch\nFloatStorage\nU\x010U\x03cpuK\x04tQ';
  const v2 = (args: string): Uint8Array => b(0x80, 2, 'ctorch._utils\n_rebuild_tensor_v2\n(', pid, args, 't', 'R.');
  const hooks = 'ccollections\nOrderedDict\n)R';
  const ok = load(v2(`K\x00K\x02K\x02\x86K\x02K\x01\x86\x89${hooks}`), { persistentLoad: storages() }) as TensorRef;
  assert.deepEqual([ok.dtype, ok.shape, ok.stride, ok.storageOffset, ok.storage.key], ['F32', [2, 2], [2, 1], 0, '0']);
  rejects(v2(`K\x01K\x02K\x02\x86K\x02K\x01\x86\x89${hooks}`), /_rebuild_tensor_v2: tensor .* needs 20 bytes of storage '0', which holds 16/, { persistentLoad: storages() });
  rejects(v2(`K\x00K\x02\x85K\x01K\x01\x86\x89${hooks}`), /size has 1 dims but stride has 2/, { persistentLoad: storages() });
  rejects(v2(`K\x00K\x02\x85K\x01\x85K\x01${hooks}`), /requires_grad must be a bool, got 1/, { persistentLoad: storages() });
  rejects(v2(`K\x00K\x02\x85K\x01\x85\x89]`), /backward_hooks must be an OrderedDict/, { persistentLoad: storages() });
  rejects(v2(`K\x00F2.0\n\x85K\x01\x85\x89${hooks}`), /size\[0\] must be an int, got 2\.0/, { persistentLoad: storages() });
  rejects(b(0x80, 2, 'ctorch._utils\n_rebuild_tensor_v2\n(K\x00K\x00)', ')', '\x89', hooks, 'tR.'), /storage must be a storage \(from a persistent id\), got 0/);
  rejects(b(0x80, 2, 'ctorch._tensor\n_rebuild_from_type_v2\n(ctorch._utils\n_rebuild_tensor_v2\nctorch\nfloat32\n)Nt', 'R.'), /type must be torch\.Tensor or torch\.nn\.parameter\.Parameter/);
  rejects(b(0x80, 2, 'ctorch._tensor\n_rebuild_from_type_v2\n(c_codecs\nencode\nctorch\nTensor\n)Nt', 'R.'), /func must be a torch\._utils tensor rebuild function/);
  rejects(b(0x80, 2, "(U\x07storagecos\nsystem\nU\x010U\x03cpuK\x04tQ."), /not allowed: os\.system/, { persistentLoad: storages() });
  rejects(b(0x80, 2, "(U\x07storagectorch\nfloat32\nU\x010U\x03cpuK\x04tQ."), /storage type torch\.float32 is not supported/, { persistentLoad: storages() });
  rejects(b(0x80, 2, "(U\x07storagectorch\nFloatStorage\nU\x05../..U\x03cpuK\x04tQ."), /storage key "\.\.\/\.\." is not a plain record name/, { persistentLoad: storages() });
});

// ---------------------------------------------------------------------------------------------
// The pickler

const DCP = 'torch.distributed.checkpoint.metadata';

/** The TS twin of reference_metadata() in test/oracle/pickle_oracle.py. */
function referenceMetadata(): PyObject {
  const obj = (name: string, fields: Record<string, PyValue>, module = DCP): PyObject => new PyObject(module, name, PyDict.from(fields));
  const size = (...xs: number[]): TorchSize => new TorchSize(xs);
  const contiguous = new PyObject(DCP, '_MEM_FORMAT_ENCODING', new PyDict(), [0], 'call');
  const props = (dtype: string, rg: boolean): PyObject => new PyObject(DCP, 'TensorProperties', T(G('torch', dtype), G('torch', 'strided'), rg, contiguous, false));
  const chunk = (o: number[], s: number[]): PyObject => obj('ChunkStorageMetadata', { offsets: size(...o), sizes: size(...s) });
  const index = (fqn: string, offset?: number[], i?: number): PyObject =>
    obj('MetadataIndex', offset ? { fqn, index: i ?? null, offset: size(...offset) } : { fqn, index: i ?? null });
  const info = (path: string, offset: number, length: number, td?: string[]): PyObject =>
    obj('_StorageInfo', td ? { relative_path: path, offset, length, transform_descriptors: td } : { relative_path: path, offset, length }, 'torch.distributed.checkpoint.filesystem');
  return obj('Metadata', {
    state_dict_metadata: PyDict.from({
      'model.w': obj('TensorStorageMetadata', { properties: props('float32', false), size: size(4, 6), chunks: [chunk([0, 0], [2, 6]), chunk([2, 0], [2, 6])] }),
      'model.b': obj('TensorStorageMetadata', { properties: props('bfloat16', true), size: size(6), chunks: [chunk([0], [6])] }),
      step: obj('BytesStorageMetadata', {}),
    }),
    planner_data: PyDict.from({ 'model.w': T('model', 'w'), 'model.b': T('model', 'b'), step: T('step') }),
    storage_data: PyDict.from([
      [index('model.w', [0, 0], 0), info('__0_0.distcp', 0, 100)],
      [index('model.w', [2, 0], 1), info('__1_0.distcp', 0, 100)],
      [index('model.b', [0], 0), info('__0_0.distcp', 100, 50, ['stream.zstd/1'])],
      [index('step'), info('__0_0.distcp', 150, 20)],
    ]),
    storage_meta: obj('StorageMeta', {
      checkpoint_id: new PyObject('pathlib', 'PosixPath', new PyDict(), ['/', 'ckpt', 'run1'], 'call'),
      save_id: 'save-1', load_id: null, modules: ['model'],
    }),
    version: '1.0.0',
  });
}

/** The TS twins of golden_values() in test/oracle/make_pickle_fixtures.py. */
function goldenValues(): Record<string, PyValue> {
  const shared = [1];
  const pair = T(1, 2);
  return {
    ints: [0, 1, 255, 256, 65535, 65536, -1, -(2 ** 31), 2 ** 31 - 1, 2 ** 31, -(2 ** 31) - 1, 2n ** 53n + 1n, 2n ** 63n, -(2n ** 63n), 2n ** 70n, -(2n ** 70n), 2n ** 2100n],
    floats: [0, -0, 1.5, -2.25e-300, Infinity, -Infinity, NaN].map((x) => new PyFloat(x)),
    strings: ['', 'a', 'ünï', '😀', 'a', 'a\ud800b', 'x'.repeat(300), 'ünï'],
    bytes: [new Uint8Array(0), b(0, 0xff), b('abc'), b('abc'), b('a'), b('a'), new Uint8Array(0)],
    tuples: [T(), T(1), T(1, 2), T(1, 2, 3), T(1, 2, 3, 4)],
    containers: PyDict.from({
      list1: [1], list2: [1, 2], dict1: PyDict.from({ a: 1 }),
      tuple_keys: PyDict.from([[T(1, 2), 'a'], [T('x'), [1]], [3, 'i']]),
      ordered: PyDict.from([['b', 1], ['a', 2]], 'OrderedDict'), empty_od: new PyDict('OrderedDict'),
      nested: PyDict.from({ a: PyDict.from({ b: [new PyDict()] }) }),
    }),
    sets: [new PySet([], false), new PySet([1, 2, 3], false), new PySet([], true), new PySet([5], true)],
    misc: [new PyComplex(1.5, -2), new PySlice(1, null, 2), new PySlice(null, 5, null), new PyByteArray(b('ab', 0xff)), new PyByteArray(new Uint8Array(0))],
    shared: [shared, shared, T(shared), pair, pair],
    torch_values: [new TorchSize([3, 4]), new TorchSize([]), G('torch', 'float32'), G('torch', 'bfloat16'), G('torch', 'strided'), G('torch', 'strided')],
    namespace: new PyObject('argparse', 'Namespace', PyDict.from({ lr: new PyFloat(0.1), name: 'run' })),
    big_list: Array.from({ length: 1001 }, (_, i) => i),
    big_dict: PyDict.from(Array.from({ length: 300 }, (_, i): [PyValue, PyValue] => [`k${i}`, i])),
    metadata: referenceMetadata(),
  };
}

test('pickler: writes the same bytes as CPython at protocol 2 (golden values)', () => {
  const values = goldenValues();
  assert.deepEqual(fixtures.pickler_goldens.map((g) => g.name).sort(), Object.keys(values).sort());
  for (const g of fixtures.pickler_goldens) assert.equal(hex(pickle(values[g.name]!)), g.hex, g.name);
});

function goldenStateDict(fp8Typed: boolean): PyDict {
  const s0 = new StorageRef('0', 'F32', 'cpu', 12, false);
  return PyDict.from({
    w: new TensorRef(s0, 0, [3, 4], [4, 1], 'F32'),
    w_t: new TensorRef(s0, 0, [4, 3], [1, 4], 'F32'),
    bf16: new TensorRef(new StorageRef('1', 'BF16', 'cpu', 6, false), 0, [2, 3], [3, 1], 'BF16'),
    fp8: new TensorRef(fp8Typed ? new StorageRef('2', 'F8_E4M3', 'cpu', 4, false) : new StorageRef('2', 'U8', 'cpu', 4, true), 0, [4], [1], 'F8_E4M3'),
    u64: new TensorRef(new StorageRef('3', 'U8', 'cpu', 16, true), 0, [2], [1], 'U64'),
    p: new TensorRef(new StorageRef('4', 'F32', 'cpu', 2, false), 0, [2], [1], 'F32', true, true),
    n: 5,
  }, 'OrderedDict');
}

test('pickler: a state dict of TensorRefs is byte-identical to torch.save\'s data.pkl', () => {
  const data = hex(fromB64(fixtures.torch_save.data_pkl));
  assert.equal(hex(pickle(goldenStateDict(false))), data);
  assert.equal(hex(pickle(goldenStateDict(true))), data, 'a typed fp8 storage is written untyped, in bytes');
});

test('pickler: round trips (big ints, floats, tuple keys, OrderedDict, objects, sets)', () => {
  const values: PyValue[] = [
    null, true, false, 0, -1, 2 ** 53 - 1, -(2 ** 53 - 1), 2n ** 53n, -(2n ** 64n), 2n ** 4000n, -(2n ** 4000n) + 1n,
    new PyFloat(1.5), new PyFloat(-0), new PyFloat(Infinity), 'ünï\ud800\u0000', b(0, 1, 2, 0xff),
    T(), T(T(1, 2), [3, T()]), [[[]]],
    PyDict.from([[T(1, 'a'), PyDict.from([[T(), [1, 2]], [2n ** 80n, new PyFloat(2)]])], ['k', PyDict.from({ x: null }, 'OrderedDict')]]),
    PyDict.from(Array.from({ length: 2500 }, (_, i): [PyValue, PyValue] => [i, `v${i}`])),
    new PySet(['a', 1, T(2)], false), new PySet([], true), new PyComplex(0.5, -1), new PySlice(null, 3, -1), new PyByteArray(b('xyz')),
    new TorchSize([1, 2, 3]), G('torch', 'float8_e4m3fn'), G('torch', 'sparse_coo'), G('torch', 'contiguous_format'),
    new PyObject('argparse', 'Namespace', PyDict.from({ a: [1], b: T() })),
    referenceMetadata(),
  ];
  for (const v of values) assert.deepStrictEqual(unpickle(pickle(v)), v, toPlainString(v));
});

function toPlainString(v: PyValue): string {
  return JSON.stringify(toPlain(v), (_k, x: unknown) => (typeof x === 'bigint' ? x.toString() : x))?.slice(0, 200) ?? '';
}

test('pickler: TensorRefs sharing one StorageRef are written against one storage and read back sharing it', () => {
  const s = new StorageRef('0', 'BF16', 'cpu', 24, false);
  const u = new StorageRef('1', 'U8', 'cpu', 64, true);
  const sd = PyDict.from({
    a: new TensorRef(s, 0, [4, 6], [6, 1], 'BF16'),
    a_t: new TensorRef(s, 0, [6, 4], [1, 6], 'BF16'),
    a_row: new TensorRef(s, 6, [6], [1], 'BF16'),
    u32: new TensorRef(u, 0, [4, 4], [4, 1], 'U32'),
    u16_view: new TensorRef(u, 4, [8], [1], 'U16'),
    p: new TensorRef(s, 0, [24], [1], 'BF16', true, true),
    p_state: new TensorRef(s, 0, [24], [1], 'BF16', false, true, PyDict.from({ tensor_model_parallel: true })),
    t_state: new TensorRef(s, 0, [2, 2], [2, 1], 'BF16', false, false, PyDict.from({ tag: 'x' })),
  });
  const data = pickle(sd);
  const text = Buffer.from(data).toString('latin1');
  assert.equal(text.split('X\x07\x00\x00\x00storage').length - 1, 1, "the 'storage' tag is written once, then BINGET");
  assert.equal(text.split('BFloat16Storage').length - 1, 1);
  assert.equal(text.split('UntypedStorage').length - 1, 1);
  const back = unpickle(data, { persistentLoad: storages() }) as PyDict;
  assert.deepStrictEqual(back, sd);
  const tensors = [...back.stringEntries()].map(([, t]) => t as TensorRef);
  for (const t of tensors.slice(1, 3)) assert.equal(t.storage, tensors[0]!.storage);
  assert.equal(tensors[3]!.storage, tensors[4]!.storage);
});

test('pickler: refuses values that are not Python values', () => {
  assert.throws(() => pickle(1.5 as PyValue), (e: unknown) => e instanceof PicklingError && /1\.5 is not a Python int/.test(e.message));
  const s = new StorageRef('0', 'BF16', 'cpu', 4, false);
  assert.throws(() => pickle(new TensorRef(s, 0, [2], [1], 'F32')), /tensor of F32 on typed storage '0' of BF16/);
  assert.throws(() => pickle(new StorageRef('0', 'F4', 'cpu', 3, false)), /F4 cannot be stored in a torch file/);
  assert.throws(() => pickle(new PyGlobal('a\nb', 'c')), PicklingError);
  let deep: PyValue = [];
  for (let i = 0; i < 1100; i++) deep = [deep];
  assert.throws(() => pickle(deep), /nests containers deeper than 1000 levels/);
  assert.throws(() => pickle(null, { protocol: 4 as 2 }), /protocol 4 is not supported/);
});

test('toPlain: JSON-friendly forms', () => {
  assert.deepStrictEqual(toPlain(PyDict.from([[T(1), new PyFloat(NaN)], ['x', 2n ** 70n]])), {
    __dict__: [[[1], { __float__: 'nan' }], ['x', { __int__: '1180591620717411303424' }]],
  });
  assert.deepStrictEqual(toPlain(new TensorRef(new StorageRef('7', 'F16', 'cuda:0', 4, false), 1, [3], [1], 'F16')), {
    __tensor__: { dtype: 'F16', shape: [3], stride: [1], offset: 1, storage: '7', requires_grad: false, parameter: false },
  });
  assert.deepStrictEqual(toPlain(PyDict.from([['__proto__', 1]])), JSON.parse('{"__proto__": 1}'));
  assert.equal(JSON.stringify(toPlain(referenceMetadata())).includes('"__class__":"torch.distributed.checkpoint.metadata.Metadata"'), true);
});
