import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runOracle } from '../helpers/oracle.js';
import {
  unpickle, pickle, toPlain, storageFromPersistentId,
  PyByteArray, PyComplex, PyDict, PyFloat, PyGlobal, PyObject, PySet, PySlice, PyTuple, StorageRef, TensorRef, TorchSize,
  type PyValue,
} from '../../src/pickle/index.js';
import { itemSize } from '../../src/tensor/dtype.js';

const work = mkdtempSync(join(tmpdir(), 'shardshift-pickle-'));
after(() => rmSync(work, { recursive: true, force: true }));

const G = (module: string, name: string): PyGlobal => new PyGlobal(module, name);
const T = (...items: PyValue[]): PyTuple => new PyTuple(items);
const b64 = (x: Uint8Array): string => Buffer.from(x).toString('base64');

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

async function oracle<T>(...args: string[]): Promise<T> {
  return JSON.parse(await runOracle('pickle_oracle.py', args)) as T;
}

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

/** A state dict as torch would pickle it: shared storages, views, v3 dtypes, Parameters. */
function tensorStateDict(): PyDict {
  const f32 = new StorageRef('0', 'F32', 'cpu', 24, false);
  const bf = new StorageRef('1', 'BF16', 'cpu', 6, false);
  const raw = new StorageRef('2', 'U8', 'cpu', 32, true);
  const fp8 = new StorageRef('3', 'F8_E5M2', 'cpu', 5, false); // typed: written untyped, in bytes
  const i64 = new StorageRef('4', 'I64', 'cpu', 3, false);
  const p = new StorageRef('5', 'F16', 'cpu', 4, false);
  return PyDict.from({
    w: new TensorRef(f32, 0, [4, 6], [6, 1], 'F32'),
    w_t: new TensorRef(f32, 0, [6, 4], [1, 6], 'F32'),
    w_rows: new TensorRef(f32, 12, [2, 6], [6, 1], 'F32'),
    w_col: new TensorRef(f32, 3, [4], [6], 'F32'),
    scalar: new TensorRef(f32, 5, [], [], 'F32'),
    bf16: new TensorRef(bf, 0, [2, 3], [3, 1], 'BF16', true),
    u32: new TensorRef(raw, 0, [2, 4], [4, 1], 'U32'),
    u16: new TensorRef(raw, 2, [12], [1], 'U16'),
    u64: new TensorRef(raw, 0, [4], [1], 'U64'),
    fp8: new TensorRef(fp8, 1, [4], [1], 'F8_E5M2'),
    i64: new TensorRef(i64, 0, [3], [1], 'I64'),
    param: new TensorRef(p, 0, [2, 2], [2, 1], 'F16', true, true),
    frozen: new TensorRef(p, 2, [2], [1], 'F16', false, true),
  }, 'OrderedDict');
}

function storageBytes(s: StorageRef): number {
  return s.untyped ? s.numel : s.numel * itemSize(s.dtype)!;
}

// ---------------------------------------------------------------------------------------------

test('python pickles (protocols 0–5) of assorted structures read back equal', async () => {
  const cases = await oracle<Array<{ name: string; plain: unknown; pickles: Record<string, string> }>>('assorted');
  assert.ok(cases.length >= 20);
  for (const c of cases) {
    for (const [proto, data] of Object.entries(c.pickles)) {
      const v = unpickle(new Uint8Array(Buffer.from(data, 'base64')), { source: `${c.name}@${proto}` });
      assert.deepStrictEqual(toPlain(v), c.plain, `${c.name} protocol ${proto}`);
    }
  }
});

test('pickle() output is loaded by CPython (restricted find_class) and equals what CPython writes', async () => {
  const shared = [1, 'x'];
  const values: Array<{ name: string; value: PyValue; sameAsCpython: boolean }> = [
    { name: 'scalars', value: [null, true, false, 0, 255, 256, 65536, -1, -(2 ** 31) - 1, 2 ** 53 - 1, 2n ** 64n, -(2n ** 300n), new PyFloat(0.1), new PyFloat(-Infinity)], sameAsCpython: true },
    { name: 'strings', value: ['', 'a', 'ünï', '日本語', '😀', 'a\ud800b', 'x'.repeat(70000)], sameAsCpython: true },
    { name: 'bytes', value: [new Uint8Array(0), Uint8Array.of(0, 255), new Uint8Array(300).fill(0xab), new PyByteArray(Uint8Array.of(1, 2))], sameAsCpython: true },
    { name: 'tuple keys', value: PyDict.from([[T(1, T('a', 2)), 'v'], [T(), [1, T()]], [5, PyDict.from({ k: null })]]), sameAsCpython: true },
    { name: 'dict 1000', value: PyDict.from(Array.from({ length: 1000 }, (_, i): [PyValue, PyValue] => [i, i])), sameAsCpython: true },
    { name: 'dict 2001', value: PyDict.from(Array.from({ length: 2001 }, (_, i): [PyValue, PyValue] => [`k${i}`, i])), sameAsCpython: true },
    { name: 'ordered 1001', value: PyDict.from(Array.from({ length: 1001 }, (_, i): [PyValue, PyValue] => [i, i]), 'OrderedDict'), sameAsCpython: true },
    { name: 'ordered 1000', value: PyDict.from(Array.from({ length: 1000 }, (_, i): [PyValue, PyValue] => [i, i]), 'OrderedDict'), sameAsCpython: true },
    { name: 'list 2000', value: Array.from({ length: 2000 }, (_, i) => i), sameAsCpython: true },
    { name: 'sets etc', value: [new PySet([1, 2], false), new PySet([T(1)], true), new PyComplex(1, -0.5), new PySlice(null, 2, null)], sameAsCpython: true },
    { name: 'shared', value: [shared, T(shared), shared], sameAsCpython: true },
    { name: 'torch values', value: [new TorchSize([2, 3]), new TorchSize([]), G('torch', 'float8_e4m3fn'), G('torch', 'uint16'), G('torch', 'strided')], sameAsCpython: true },
    { name: 'namespace', value: new PyObject('argparse', 'Namespace', PyDict.from({ lr: new PyFloat(3e-4), layers: [1, 2] })), sameAsCpython: true },
    { name: 'metadata', value: referenceMetadata(), sameAsCpython: true },
    { name: 'tensors', value: tensorStateDict(), sameAsCpython: false },
    {
      name: 'tensor state',
      value: PyDict.from({
        p: new TensorRef(new StorageRef('0', 'F32', 'cpu', 4, false), 0, [4], [1], 'F32', true, true, PyDict.from({ tensor_model_parallel: true, partition_dim: 0 })),
        t: new TensorRef(new StorageRef('1', 'BF16', 'cpu', 4, false), 0, [2, 2], [2, 1], 'BF16', false, false, PyDict.from({ tag: 'x' })),
      }),
      sameAsCpython: false,
    },
  ];
  const input = join(work, 'load.json');
  writeFileSync(input, JSON.stringify(values.map((v) => ({ name: v.name, b64: b64(pickle(v.value)) }))));
  const results = await oracle<Array<{ name: string; plain?: unknown; error?: string; same_as_cpython?: boolean | null }>>('load', input);
  assert.equal(results.length, values.length);
  for (const [i, r] of results.entries()) {
    const v = values[i]!;
    assert.equal(r.error, undefined, `${v.name}: ${r.error}`);
    assert.deepStrictEqual(r.plain, toPlain(v.value), v.name);
    if (v.sameAsCpython) assert.equal(r.same_as_cpython, true, `${v.name}: CPython writes other bytes`);
  }
});

test('torch.load(weights_only=True) accepts pickle() output inside a torch zip', async () => {
  const sd = tensorStateDict();
  const path = join(work, 'sd.pkl');
  writeFileSync(path, pickle(sd));
  const records: Record<string, number> = {};
  for (const [, t] of sd.stringEntries()) records[(t as TensorRef).storage.key] = storageBytes((t as TensorRef).storage);
  type Desc = { dtype: string; shape: number[]; stride: number[]; offset: number; requires_grad: boolean; parameter: boolean; group: string; storage_nbytes: number };
  const loaded = await oracle<Record<string, Desc>>('torchload', path, JSON.stringify(records));
  const entries = [...sd.stringEntries()] as Array<[string, TensorRef]>;
  assert.deepEqual(Object.keys(loaded), entries.map(([k]) => k));
  for (const [name, t] of entries) {
    const d = loaded[name]!;
    assert.deepStrictEqual(
      [d.dtype, d.shape, d.stride, d.offset, d.requires_grad, d.parameter, d.storage_nbytes],
      [t.dtype, [...t.shape], [...t.stride], t.storageOffset, t.requiresGrad, t.parameter, storageBytes(t.storage)],
      name,
    );
    const first = entries.find(([, u]) => u.storage.key === t.storage.key)![0];
    assert.equal(d.group, first, `${name} shares its storage with ${first}`);
  }
});

test('a real DCP .metadata (torch.distributed.checkpoint.save) is read with its structure intact', async () => {
  const dir = join(work, 'dcp');
  const py = await oracle<{ plain: unknown; files: string[]; version: string }>('dcp-save', dir);
  const md = unpickle(readFileSync(join(dir, '.metadata')), { source: `${dir}/.metadata` }) as PyObject;
  assert.deepStrictEqual(toPlain(md), py.plain);
  assert.equal(md.qualname, `${DCP}.Metadata`);
  assert.equal(md.attr('version'), py.version);
  const sdm = md.attr('state_dict_metadata') as PyDict;
  assert.deepEqual([...sdm.stringEntries()].map(([k]) => k), ['model.w', 'model.b', 'emb', 'step', 'name']);
  const w = sdm.get('model.w') as PyObject;
  assert.equal(w.qualname, `${DCP}.TensorStorageMetadata`);
  assert.deepStrictEqual(w.attr('size'), new TorchSize([4, 6]));
  const props = w.attr('properties') as PyObject;
  assert.ok(props.state instanceof PyTuple);
  assert.deepStrictEqual(props.state.items.slice(0, 3), [G('torch', 'float32'), G('torch', 'strided'), false]);
  assert.deepStrictEqual(props.state.items[3], new PyObject(DCP, '_MEM_FORMAT_ENCODING', new PyDict(), [0], 'call'));
  const chunks = w.attr('chunks') as PyObject[];
  assert.equal(chunks.length, 1);
  assert.deepStrictEqual([chunks[0]!.attr('offsets'), chunks[0]!.attr('sizes')], [new TorchSize([0, 0]), new TorchSize([4, 6])]);
  assert.deepStrictEqual(((sdm.get('emb') as PyObject).attr('properties') as PyObject).state, T(G('torch', 'bfloat16'), G('torch', 'strided'), false, props.state.items[3]!, false));
  assert.equal((sdm.get('step') as PyObject).qualname, `${DCP}.BytesStorageMetadata`);
  assert.deepStrictEqual((md.attr('planner_data') as PyDict).get('model.w'), T('model', 'w'));
  const storage = md.attr('storage_data') as PyDict;
  assert.equal(storage.size, 5);
  let end = 0;
  for (const [k, v] of storage.entries) {
    const idx = k as PyObject;
    const info = v as PyObject;
    assert.equal(idx.qualname, `${DCP}.MetadataIndex`);
    assert.equal(info.qualname, 'torch.distributed.checkpoint.filesystem._StorageInfo');
    const fqn = idx.attr('fqn') as string;
    const isTensor = (sdm.get(fqn) as PyObject).qualname.endsWith('TensorStorageMetadata');
    assert.deepStrictEqual(idx.attr('index'), isTensor ? 0 : null);
    assert.equal(idx.attr('offset') instanceof TorchSize, isTensor, `${fqn} offset`);
    assert.ok(py.files.includes(info.attr('relative_path') as string));
    assert.equal(info.attr('offset'), end, `${fqn} follows the previous item`);
    end += info.attr('length') as number;
  }
  const meta = md.attr('storage_meta') as PyObject;
  assert.equal(meta.qualname, `${DCP}.StorageMeta`);
  assert.equal((meta.attr('checkpoint_id') as PyObject).qualname, 'pathlib.PosixPath');
});

test('a real DCP .metadata re-pickled by pickle() equals the original in Python and dcp.load reads through it', async () => {
  const dir = join(work, 'dcp2');
  await oracle('dcp-save', dir);
  const md = unpickle(readFileSync(join(dir, '.metadata')));
  const path = join(work, 'dcp2.metadata');
  writeFileSync(path, pickle(md));
  const r = await oracle<{ equal: boolean; storage_meta_equal: boolean; same_bytes_as_cpython: boolean; dcp_load_ok: boolean }>('dcp-roundtrip', dir, path);
  assert.deepStrictEqual(r, { equal: true, storage_meta_equal: true, same_bytes_as_cpython: true, dcp_load_ok: true });
});

test('a Metadata built in TypeScript loads in Python as a real torch.distributed.checkpoint.metadata.Metadata', async () => {
  const md = referenceMetadata();
  const path = join(work, 'ts.metadata');
  writeFileSync(path, pickle(md));
  const r = await oracle<{ is_metadata: boolean; equal: boolean; storage_meta_equal: boolean; same_bytes_as_cpython: boolean; plain: unknown }>('dcp-check', path);
  assert.deepStrictEqual([r.is_metadata, r.equal, r.storage_meta_equal, r.same_bytes_as_cpython], [true, true, true, true]);
  assert.deepStrictEqual(r.plain, toPlain(md));
});

test('torch.save data.pkl (bf16/fp8/uint16/int64, Parameter, shared views, transposed) reads into matching TensorRefs', async () => {
  const dir = join(work, 'tsave');
  rmSync(dir, { recursive: true, force: true });
  await import('node:fs').then((fs) => fs.mkdirSync(dir, { recursive: true }));
  type Desc = { dtype: string; shape: number[]; stride: number[]; offset: number; requires_grad: boolean; parameter: boolean; group: string; storage_nbytes: number };
  const py = await oracle<{ tensors: Record<string, Desc>; records: Record<string, number> }>('torch-save', dir);
  const data = readFileSync(join(dir, 'data.pkl'));
  const sd = unpickle(data, { persistentLoad: storages(), source: 'data.pkl' }) as PyDict;
  assert.equal(sd.kind, 'OrderedDict');
  const entries = [...sd.stringEntries()] as Array<[string, TensorRef]>;
  assert.deepEqual(entries.map(([k]) => k), Object.keys(py.tensors));
  for (const [name, t] of entries) {
    assert.ok(t instanceof TensorRef, name);
    const d = py.tensors[name]!;
    assert.deepStrictEqual(
      [t.dtype, [...t.shape], [...t.stride], t.storageOffset, t.requiresGrad, t.parameter],
      [d.dtype, d.shape, d.stride, d.offset, d.requires_grad, d.parameter],
      name,
    );
    assert.equal(py.records[t.storage.key], d.storage_nbytes, `${name}: record data/${t.storage.key} holds the storage`);
    assert.equal(storageBytes(t.storage), d.storage_nbytes, `${name}: storage size`);
    assert.equal(t.storage, (sd.get(d.group) as TensorRef).storage, `${name} shares ${d.group}'s storage`);
  }
  assert.equal((sd.get('fp8') as TensorRef).storage.untyped, true);
  assert.equal((sd.get('u16') as TensorRef).storage.untyped, true);
  assert.equal((sd.get('bf16') as TensorRef).storage.untyped, false);
  assert.deepEqual((sd.get('w_t') as TensorRef).stride, [1, 4]);
  assert.equal(Buffer.from(pickle(sd)).equals(data), true, 're-pickling gives torch.save\'s bytes');
});
