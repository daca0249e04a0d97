/**
 * The allow-list: the only Python globals a pickle may name, each with a TypeScript handler that
 * rebuilds the object as a PyValue. Nothing here runs Python code or looks anything up by name;
 * a global that is not a key of the table is an error (see unpickler.ts).
 *
 * Adding support for a class is one table entry, e.g.
 *   'megatron.core.enums.ModelType': enumClass([1, 2, 3]),
 *   'my.pkg.Config': dataclass(),
 */
import {
  PyByteArray, PyComplex, PyDict, PyFloat, PyGlobal, PyObject, PySet, PySlice, PyTuple, StorageRef, TensorRef, TorchSize,
  describe, type PyValue,
} from './values.js';
import { UnpicklingError } from './errors.js';
import { dtypeFromTorch, dtypeFromTorchStorage, itemSize, type DType } from '../tensor/dtype.js';

/** What a handler is told about the call it serves. */
export interface CallContext {
  /** The global being used, e.g. `torch._utils._rebuild_tensor_v2`. */
  readonly global: PyGlobal;
  /** `cls.__new__(cls, *args, **kwargs)` through the allow-list in force (for the copyreg helpers). */
  newObject(cls: PyValue, args: PyValue[], kwargs: PyDict | null): PyValue;
  /** Calls an allowed function or class through the allow-list in force. */
  call(func: PyValue, args: PyValue[]): PyValue;
}

/** A global used as a value (dtypes, storage classes, layouts): GLOBAL pushes `make()`. */
export interface ValueEntry {
  readonly kind: 'value';
  make(global: PyGlobal): PyValue;
}

/** A function that REDUCE may call. GLOBAL pushes the PyGlobal; REDUCE calls `call`. */
export interface FunctionEntry {
  readonly kind: 'function';
  call(args: PyValue[], ctx: CallContext): PyValue;
}

/** A class: NEWOBJ/NEWOBJ_EX/INST/OBJ create instances, BUILD sets their state. */
export interface ClassEntry {
  readonly kind: 'class';
  /**
   * `cls.__new__(cls, *args, **kwargs)` (NEWOBJ, NEWOBJ_EX, `copyreg._reconstructor`, INST/OBJ
   * without arguments). Default: an empty PyObject, and arguments are an error.
   */
  newObj?(args: PyValue[], kwargs: PyDict | null, ctx: CallContext): PyValue;
  /** `cls(*args)` (REDUCE on the class, INST/OBJ with arguments). Default: an error. */
  call?(args: PyValue[], ctx: CallContext): PyValue;
  /**
   * BUILD with a non-None state. Default: a dict state (string keys) is merged into
   * `obj.state`; a `(dict | None, slots dict)` tuple is kept as the state.
   */
  build?(obj: PyObject, state: PyValue, ctx: CallContext): void;
}

export type AllowEntry = ValueEntry | FunctionEntry | ClassEntry;

/** Keyed by `'module.qualname'`, e.g. `'torch._utils._rebuild_tensor_v2'`. */
export type AllowList = Readonly<Record<string, AllowEntry>>;

/**
 * Modules never allowed, even through `extraGlobals` (the usual `__reduce__` exploit targets),
 * and builtins that are never allowed.
 */
export const BLOCKED_MODULES: ReadonlySet<string> = new Set([
  'os', 'posix', 'nt', 'sys', 'subprocess', 'shutil', 'socket', 'importlib', 'runpy', 'ctypes',
  'pickle', '_pickle', 'marshal', 'code', 'pty', 'webbrowser',
]);
export const BLOCKED_BUILTINS: ReadonlySet<string> = new Set([
  'eval', 'exec', 'compile', 'getattr', 'setattr', 'delattr', '__import__', 'open', 'globals', 'locals', 'vars',
  'input', 'breakpoint', 'exit', 'quit', 'help', 'memoryview', 'type', 'super', 'classmethod', 'staticmethod',
  'property', 'print',
]);

/** Whether a global may never be allowed (its module, or a dangerous builtin). */
export function isBlockedGlobal(module: string, name: string): boolean {
  const top = module.split('.')[0]!;
  if (BLOCKED_MODULES.has(module) || BLOCKED_MODULES.has(top)) return true;
  return module === 'builtins' && BLOCKED_BUILTINS.has(name);
}

// ---------------------------------------------------------------------------------------------
// Helpers for handlers

/** Throws an UnpicklingError (the unpickler adds the global's name and the byte position). */
export function fail(reason: string): never {
  throw new UnpicklingError(reason);
}

export function arity(args: PyValue[], min: number, max = min): void {
  if (args.length < min || args.length > max) {
    const want = min === max ? `${min}` : max === Infinity ? `at least ${min}` : `${min} to ${max}`;
    fail(`takes ${want} argument${want === '1' ? '' : 's'}, got ${args.length}`);
  }
}

export function isInt(v: PyValue | undefined): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v);
}

export function expectInt(v: PyValue | undefined, what: string, min = -Infinity): number {
  if (!isInt(v)) fail(`${what} must be an int, got ${describe(v)}`);
  if (v < min) fail(`${what} must be ≥ ${min}, got ${v}`);
  return v;
}

export function expectBool(v: PyValue | undefined, what: string): boolean {
  if (typeof v !== 'boolean') fail(`${what} must be a bool, got ${describe(v)}`);
  return v;
}

export function expectString(v: PyValue | undefined, what: string): string {
  if (typeof v !== 'string') fail(`${what} must be a str, got ${describe(v)}`);
  return v;
}

/** Items of a tuple or list. */
export function sequenceItems(v: PyValue | undefined, what: string): PyValue[] {
  if (v instanceof PyTuple) return v.items;
  if (Array.isArray(v)) return v;
  fail(`${what} must be a tuple or list, got ${describe(v)}`);
}

export function expectIntTuple(v: PyValue | undefined, what: string, min = -Infinity): number[] {
  if (!(v instanceof PyTuple)) fail(`${what} must be a tuple of ints, got ${describe(v)}`);
  return v.items.map((x, i) => expectInt(x, `${what}[${i}]`, min));
}

function isEmptyDict(v: PyValue | undefined): boolean {
  return v instanceof PyDict && v.size === 0;
}

function expectEmptyHooks(v: PyValue | undefined): void {
  if (!(v instanceof PyDict)) fail(`backward_hooks must be an OrderedDict, got ${describe(v)}`);
  if (v.size !== 0) fail(`backward_hooks must be empty (torch never saves hooks), got ${v.size} entries`);
}

/** A set from items, dropping duplicate None/bool/int/str items as Python would. */
export function makeSet(items: PyValue[], frozen: boolean): PySet {
  const set = new PySet([], frozen);
  addToSet(set, items);
  return set;
}

export function addToSet(set: PySet, items: PyValue[]): void {
  set.addAll(items);
}

function stringToLatin1(s: string, what: string): Uint8Array {
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c > 0xff) fail(`${what}: character U+${c.toString(16).padStart(4, '0')} is not latin-1`);
    out[i] = c;
  }
  return out;
}

/** `str.encode(encoding)` for the encodings pickles use. */
function encodeString(s: string, encoding: string): Uint8Array {
  const enc = encoding.toLowerCase().replace(/_/g, '-');
  if (['latin1', 'latin-1', 'iso-8859-1', 'iso8859-1', 'l1', 'ascii', 'us-ascii'].includes(enc)) {
    const b = stringToLatin1(s, `encode(…, '${encoding}')`);
    if (enc.includes('ascii') && b.some((x) => x > 0x7f)) fail(`encode(…, '${encoding}'): not ASCII`);
    return b;
  }
  if (enc === 'utf-8' || enc === 'utf8') return new TextEncoder().encode(s);
  fail(`encoding '${encoding}' is not supported`);
}

/** bytes/bytearray constructor arguments: (), (bytes), (list of ints), (str, encoding). */
function bytesFromArgs(args: PyValue[]): Uint8Array {
  arity(args, 0, 3);
  if (args.length === 0) return new Uint8Array(0);
  const [src, encoding] = args;
  if (src instanceof Uint8Array) return src.slice();
  if (src instanceof PyByteArray) return src.bytes.slice();
  if (typeof src === 'string') return encodeString(src, expectString(encoding, 'encoding'));
  if (Array.isArray(src) || src instanceof PyTuple) {
    return Uint8Array.from(sequenceItems(src, 'source'), (x, i) => {
      const b = expectInt(x, `source[${i}]`, 0);
      if (b > 255) fail(`source[${i}] must be in range(0, 256), got ${b}`);
      return b;
    });
  }
  fail(`cannot make bytes from ${describe(src)}`);
}

function asNumberArg(v: PyValue | undefined, what: string): number {
  if (typeof v === 'number') return v;
  if (v instanceof PyFloat) return v.value;
  if (typeof v === 'boolean') return v ? 1 : 0;
  if (typeof v === 'bigint') return Number(v);
  fail(`${what} must be a number, got ${describe(v)}`);
}

// ---------------------------------------------------------------------------------------------
// Entry makers

/** A global used as a value: GLOBAL pushes the PyGlobal itself. */
export function valueGlobal(): ValueEntry {
  return { kind: 'value', make: (g) => g };
}

/** A plain class (NEWOBJ + BUILD with a dict state), e.g. a dataclass or `argparse.Namespace`. */
export function dataclass(): ClassEntry {
  return { kind: 'class' };
}

/**
 * An `enum.Enum` subclass: pickled as `cls(value)` (REDUCE). `values` lists the allowed values
 * (None: any None/bool/int/str). The member is a PyObject with `args = [value]`, `via: 'call'`.
 */
export function enumClass(values?: readonly (string | number | boolean | null)[]): ClassEntry {
  return {
    kind: 'class',
    call(args, ctx) {
      arity(args, 1);
      const v = args[0]!;
      if (!(v === null || typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean')) {
        fail(`enum value must be None, bool, int or str, got ${describe(v)}`);
      }
      if (values && !values.includes(v)) fail(`${describe(v)} is not a valid ${ctx.global.name}`);
      return new PyObject(ctx.global.module, ctx.global.name, new PyDict(), [v], 'call');
    },
  };
}

/** A class whose instances are made by calling it with str/int arguments (paths, devices). */
function callableRecord(check: (args: PyValue[]) => void): ClassEntry {
  return {
    kind: 'class',
    call(args, ctx) {
      check(args);
      return new PyObject(ctx.global.module, ctx.global.name, new PyDict(), args.slice(), 'call');
    },
  };
}

// ---------------------------------------------------------------------------------------------
// torch

/** The `('storage', cls, key, location, numel)` persistent id that torch.save writes, as a StorageRef. */
export function storageFromPersistentId(pid: PyValue): StorageRef {
  if (!(pid instanceof PyTuple)) fail(`persistent id must be a tuple, got ${describe(pid)}`);
  const [tag, cls, key, location, numel, viewMetadata] = pid.items;
  let tagStr = tag;
  if (tag instanceof Uint8Array) tagStr = String.fromCharCode(...tag);
  if (tagStr !== 'storage') fail(`persistent id must start with 'storage', got ${describe(tag)}`);
  if (pid.items.length !== 5 && !(pid.items.length === 6 && viewMetadata === null)) {
    fail(`persistent id must be ('storage', type, key, location, numel), got ${describe(pid)}`);
  }
  if (!(cls instanceof PyGlobal)) fail(`storage type must be a torch storage class, got ${describe(cls)}`);
  const keyStr = typeof key === 'number' ? String(key) : expectString(key, 'storage key');
  if (!/^[A-Za-z0-9_.-]+$/.test(keyStr) || keyStr.includes('..')) fail(`storage key ${JSON.stringify(keyStr)} is not a plain record name`);
  const loc = expectString(location, 'storage location');
  const n = expectInt(numel, 'storage numel', 0);
  if (cls.name === 'UntypedStorage' && (cls.module === 'torch.storage' || cls.module === 'torch')) {
    return new StorageRef(keyStr, 'U8', loc, n, true);
  }
  const dtype = (cls.module === 'torch' || cls.module === 'torch.cuda') ? dtypeFromTorchStorage(cls.name) : undefined;
  if (!dtype) fail(`storage type ${cls.qualname} is not supported`);
  return new StorageRef(keyStr, dtype, loc, n, false);
}

function dtypeArg(v: PyValue | undefined): DType {
  if (!(v instanceof PyGlobal) || v.module !== 'torch') fail(`dtype must be a torch dtype, got ${describe(v)}`);
  const d = dtypeFromTorch(v.name);
  if (!d) fail(`tensor dtype ${v.qualname} is not supported`);
  return d;
}

/** Bytes a storage holds. */
function storageBytes(s: StorageRef): number | undefined {
  if (s.untyped) return s.numel;
  const size = itemSize(s.dtype);
  return size === undefined ? undefined : s.numel * size;
}

function checkExtent(storage: StorageRef, dtype: DType, offset: number, shape: number[], stride: number[]): void {
  if (shape.some((s) => s === 0)) return;
  let last = offset;
  for (let i = 0; i < shape.length; i++) last += (shape[i]! - 1) * stride[i]!;
  const size = itemSize(dtype);
  const have = storageBytes(storage);
  if (size === undefined || have === undefined) return;
  const need = (last + 1) * size;
  if (!Number.isSafeInteger(need) || need > have) {
    fail(`tensor (offset ${offset}, size [${shape.join(', ')}], stride [${stride.join(', ')}]) needs ${need} bytes of storage '${storage.key}', which holds ${have}`);
  }
}

/** `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])` and v3 (dtype before metadata). */
function rebuildTensor(args: PyValue[], version: 1 | 2 | 3): TensorRef {
  const fixed = version === 1 ? 4 : version === 2 ? 6 : 7;
  arity(args, fixed, version === 1 ? fixed : fixed + 1);
  const [storage, offset, size, stride, requiresGrad, hooks] = args;
  if (!(storage instanceof StorageRef)) fail(`storage must be a storage (from a persistent id), got ${describe(storage)}`);
  const off = expectInt(offset, 'storage_offset', 0);
  const shape = expectIntTuple(size, 'size', 0);
  const strides = expectIntTuple(stride, 'stride', 0);
  if (strides.length !== shape.length) fail(`size has ${shape.length} dims but stride has ${strides.length}`);
  let rg = false;
  if (version !== 1) {
    rg = expectBool(requiresGrad, 'requires_grad');
    expectEmptyHooks(hooks);
    const metadata = args[fixed];
    if (metadata !== undefined && metadata !== null && !isEmptyDict(metadata)) {
      fail(`tensor metadata ${describe(metadata)} (conjugate/negative bits) is not supported`);
    }
  }
  const dtype = version === 3 ? dtypeArg(args[6]) : storage.dtype;
  checkExtent(storage, dtype, off, shape, strides);
  return new TensorRef(storage, off, shape, strides, dtype, rg, false, null);
}

/** Python attribute state: null when None / empty, else a dict or (dict, slots) tuple. */
function objState(state: PyValue | undefined): PyValue | null {
  if (state === undefined || state === null || isEmptyDict(state)) return null;
  if (state instanceof PyDict) return state;
  if (state instanceof PyTuple && state.items.length === 2) {
    const [d, s] = state.items;
    if ((d === null || d instanceof PyDict) && (s === null || s instanceof PyDict)) {
      return (d === null || isEmptyDict(d)) && (s === null || isEmptyDict(s)) ? null : state;
    }
  }
  fail(`object state must be a dict or a (dict, slots) tuple, got ${describe(state)}`);
}

function rebuildParameter(args: PyValue[], withState: boolean): TensorRef {
  arity(args, withState ? 4 : 3);
  const [data, requiresGrad, hooks, state] = args;
  if (!(data instanceof TensorRef) || data.parameter) fail(`data must be a tensor, got ${describe(data)}`);
  const rg = expectBool(requiresGrad, 'requires_grad');
  expectEmptyHooks(hooks);
  const st = withState ? objState(state) : null;
  return new TensorRef(data.storage, data.storageOffset, data.shape, data.stride, data.dtype, rg, true, st);
}

const TENSOR_REBUILDS = new Set([
  'torch._utils._rebuild_tensor', 'torch._utils._rebuild_tensor_v2', 'torch._utils._rebuild_tensor_v3',
  'torch._utils._rebuild_parameter', 'torch._utils._rebuild_parameter_with_state',
]);

/** `torch._tensor._rebuild_from_type_v2(func, new_type, args, state)`: a tensor with Python attributes. */
function rebuildFromTypeV2(args: PyValue[], ctx: CallContext): TensorRef {
  arity(args, 4);
  const [func, type, fargs, state] = args;
  if (!(func instanceof PyGlobal) || !TENSOR_REBUILDS.has(func.qualname)) {
    fail(`func must be a torch._utils tensor rebuild function, got ${describe(func)}`);
  }
  if (!(type instanceof PyGlobal) || !['torch.Tensor', 'torch.nn.parameter.Parameter'].includes(type.qualname)) {
    fail(`type must be torch.Tensor or torch.nn.parameter.Parameter (tensor subclasses are not supported), got ${describe(type)}`);
  }
  if (!(fargs instanceof PyTuple)) fail(`args must be a tuple, got ${describe(fargs)}`);
  const t = ctx.call(func, fargs.items);
  if (!(t instanceof TensorRef)) fail(`${func.qualname} did not make a tensor`);
  const st = objState(state);
  if (st !== null && t.state !== null) fail('tensor state is given twice');
  const param = t.parameter || type.name === 'Parameter';
  return new TensorRef(t.storage, t.storageOffset, t.shape, t.stride, t.dtype, t.requiresGrad, param, st ?? t.state);
}

/** `torch.nn.Parameter(data, requires_grad=True)` through NEWOBJ (older torch). */
const PARAMETER: ClassEntry = {
  kind: 'class',
  newObj(args) {
    arity(args, 1, 2);
    const [data, rg] = args;
    if (!(data instanceof TensorRef) || data.parameter) fail(`data must be a tensor, got ${describe(data)}`);
    const requiresGrad = rg === undefined ? true : expectBool(rg, 'requires_grad');
    return new TensorRef(data.storage, data.storageOffset, data.shape, data.stride, data.dtype, requiresGrad, true, data.state);
  },
};

/** torch dtypes torch 2.13 can pickle (`str(dtype)` of every `torch.dtype`). */
export const TORCH_DTYPE_NAMES = [
  'bfloat16', 'bits16', 'bits1x8', 'bits2x4', 'bits4x2', 'bits8', 'bool', 'complex128', 'complex32', 'complex64',
  'float16', 'float32', 'float4_e2m1fn_x2', 'float64', 'float8_e4m3fn', 'float8_e4m3fnuz', 'float8_e5m2',
  'float8_e5m2fnuz', 'float8_e8m0fnu', 'int1', 'int16', 'int2', 'int3', 'int32', 'int4', 'int5', 'int6', 'int64',
  'int7', 'int8', 'qint32', 'qint8', 'quint2x4', 'quint4x2', 'quint8', 'uint1', 'uint16', 'uint2', 'uint3',
  'uint32', 'uint4', 'uint5', 'uint6', 'uint64', 'uint7', 'uint8',
] as const;

/** Legacy typed-storage classes (`torch.<Name>Storage`). */
export const TORCH_STORAGE_NAMES = [
  'BFloat16Storage', 'BoolStorage', 'ByteStorage', 'CharStorage', 'ComplexDoubleStorage', 'ComplexFloatStorage',
  'DoubleStorage', 'FloatStorage', 'HalfStorage', 'IntStorage', 'LongStorage', 'ShortStorage',
  'QInt32Storage', 'QInt8Storage', 'QUInt2x4Storage', 'QUInt4x2Storage', 'QUInt8Storage',
] as const;

/** `torch.layout` values, which pickle as `torch.serialization._get_layout('torch.strided')`. */
export const TORCH_LAYOUT_NAMES = ['strided', 'sparse_coo', 'sparse_csr', 'sparse_csc', 'sparse_bsr', 'sparse_bsc', '_mkldnn', 'jagged'] as const;

export const TORCH_MEMORY_FORMAT_NAMES = ['contiguous_format', 'channels_last', 'channels_last_3d', 'preserve_format'] as const;

const DCP = 'torch.distributed.checkpoint.metadata';
/** Before torch 2.2 DCP pickled TensorProperties and its enum from the sharded-tensor module. */
const SHARDED = 'torch.distributed._shard.sharded_tensor.metadata';
const MEM_FORMAT_ENUMS = [`${DCP}._MEM_FORMAT_ENCODING`, `${SHARDED}.MEM_FORMAT_ENCODING`];

/** `TensorProperties.__getstate__` returns `(dtype, layout, requires_grad, _MEM_FORMAT_ENCODING, pin_memory)`. */
const TENSOR_PROPERTIES: ClassEntry = {
  kind: 'class',
  build(obj, state) {
    if (state instanceof PyTuple) {
      if (state.items.length !== 5) fail(`state must be (dtype, layout, requires_grad, memory_format, pin_memory), got ${describe(state)}`);
      const [dtype, layout, rg, mem, pin] = state.items;
      if (!(dtype instanceof PyGlobal) || dtype.module !== 'torch') fail(`dtype must be a torch dtype, got ${describe(dtype)}`);
      if (!(layout instanceof PyGlobal) || layout.module !== 'torch') fail(`layout must be a torch layout, got ${describe(layout)}`);
      expectBool(rg, 'requires_grad');
      if (!(mem instanceof PyObject) || !MEM_FORMAT_ENUMS.includes(mem.qualname)) fail(`memory format must be a _MEM_FORMAT_ENCODING, got ${describe(mem)}`);
      expectBool(pin, 'pin_memory');
      if (!(obj.state instanceof PyDict) || obj.state.size !== 0) fail('state is set twice');
      obj.state = state;
      return;
    }
    defaultBuild(obj, state);
  },
};

/** BUILD without a custom handler (Python's `load_build` for objects without `__setstate__`). */
export function defaultBuild(obj: PyObject, state: PyValue): void {
  if (state === null) return;
  if (state instanceof PyDict) {
    for (const [k] of state.entries) if (typeof k !== 'string') fail(`attribute names must be str, got ${describe(k)}`);
    if (obj.state instanceof PyDict) {
      for (const [k, v] of state.entries) obj.state.set(k, v);
      return;
    }
    fail(`cannot merge a dict state into the state ${describe(obj.state)}`);
  }
  if (state instanceof PyTuple && state.items.length === 2) {
    const [d, slots] = state.items;
    if ((d === null || d instanceof PyDict) && (slots === null || slots instanceof PyDict)) {
      if (!(obj.state instanceof PyDict) || obj.state.size !== 0) fail('state is set twice');
      obj.state = state;
      return;
    }
  }
  fail(`state must be a dict or a (dict, slots) tuple, got ${describe(state)}`);
}

function orderedDict(args: PyValue[]): PyDict {
  arity(args, 0, 1);
  const d = new PyDict('OrderedDict');
  const src = args[0];
  if (src === undefined) return d;
  if (src instanceof PyDict) {
    for (const [k, v] of src.entries) d.set(k, v);
    return d;
  }
  for (const [i, item] of sequenceItems(src, 'items').entries()) {
    const pair = sequenceItems(item, `items[${i}]`);
    if (pair.length !== 2) fail(`items[${i}] must be a (key, value) pair`);
    d.set(pair[0]!, pair[1]!);
  }
  return d;
}

function setFrom(args: PyValue[], frozen: boolean): PySet {
  arity(args, 0, 1);
  const src = args[0];
  if (src === undefined) return new PySet([], frozen);
  if (src instanceof PySet) return makeSet(src.items, frozen);
  return makeSet(sequenceItems(src, 'iterable'), frozen);
}

const COMPLEX: ClassEntry = {
  kind: 'class',
  call: (args) => complexFrom(args),
  newObj: (args) => complexFrom(args),
};

function complexFrom(args: PyValue[]): PyComplex {
  arity(args, 0, 2);
  return new PyComplex(args[0] === undefined ? 0 : asNumberArg(args[0], 'real'), args[1] === undefined ? 0 : asNumberArg(args[1], 'imag'));
}

function reconstructor(args: PyValue[], ctx: CallContext): PyValue {
  arity(args, 3);
  const [cls, base, state] = args;
  if (!(base instanceof PyGlobal) || base.qualname !== 'builtins.object' || state !== null) {
    fail(`only copyreg._reconstructor(cls, object, None) is supported, got base ${describe(base)}`);
  }
  return ctx.newObject(cls!, [], null);
}

const add = (table: Record<string, AllowEntry>, keys: Iterable<string>, entry: AllowEntry): void => {
  for (const k of keys) table[k] = entry;
};

function buildTable(): Record<string, AllowEntry> {
  const t: Record<string, AllowEntry> = Object.create(null) as Record<string, AllowEntry>;
  const value = valueGlobal();
  const fn = (call: FunctionEntry['call']): FunctionEntry => ({ kind: 'function', call });

  // torch values: dtypes, storage classes, layouts, memory formats, Tensor.
  add(t, TORCH_DTYPE_NAMES.map((n) => `torch.${n}`), value);
  add(t, TORCH_STORAGE_NAMES.map((n) => `torch.${n}`), value);
  add(t, TORCH_STORAGE_NAMES.filter((n) => !n.startsWith('Q')).map((n) => `torch.cuda.${n}`), value);
  add(t, ['torch.storage.UntypedStorage', 'torch.UntypedStorage'], value);
  add(t, TORCH_LAYOUT_NAMES.map((n) => `torch.${n}`), value);
  add(t, TORCH_MEMORY_FORMAT_NAMES.map((n) => `torch.${n}`), value);
  t['torch.Tensor'] = value;
  t['torch.nn.parameter.Parameter'] = PARAMETER;
  t['builtins.object'] = value;

  // torch tensor rebuilds
  t['torch._utils._rebuild_tensor'] = fn((a) => rebuildTensor(a, 1));
  t['torch._utils._rebuild_tensor_v2'] = fn((a) => rebuildTensor(a, 2));
  t['torch._utils._rebuild_tensor_v3'] = fn((a) => rebuildTensor(a, 3));
  t['torch._utils._rebuild_parameter'] = fn((a) => rebuildParameter(a, false));
  t['torch._utils._rebuild_parameter_with_state'] = fn((a) => rebuildParameter(a, true));
  t['torch._tensor._rebuild_from_type_v2'] = fn(rebuildFromTypeV2);
  t['torch.Size'] = fn((a) => {
    arity(a, 0, 1);
    const items = a[0] === undefined ? [] : sequenceItems(a[0], 'sizes');
    for (const [i, x] of items.entries()) if (!isInt(x) && typeof x !== 'bigint') fail(`sizes[${i}] must be an int, got ${describe(x)}`);
    return new TorchSize(items.slice());
  });
  t['torch.serialization._get_layout'] = fn((a) => {
    arity(a, 1);
    const name = expectString(a[0], 'layout name');
    const m = /^torch\.(\w+)$/.exec(name);
    if (!m || !(TORCH_LAYOUT_NAMES as readonly string[]).includes(m[1]!)) fail(`unknown layout ${JSON.stringify(name)}`);
    return new PyGlobal('torch', m[1]!);
  });
  t['torch.device'] = callableRecord((a) => {
    arity(a, 1, 2);
    expectString(a[0], 'device type');
    if (a.length === 2 && a[1] !== null) expectInt(a[1], 'device index', 0);
  });

  // Python builtins and stdlib
  t['collections.OrderedDict'] = fn(orderedDict);
  t['builtins.set'] = fn((a) => setFrom(a, false));
  t['builtins.frozenset'] = fn((a) => setFrom(a, true));
  t['builtins.slice'] = fn((a) => {
    arity(a, 1, 3);
    return a.length === 1 ? new PySlice(null, a[0]!, null) : new PySlice(a[0]!, a[1]!, a[2] ?? null);
  });
  t['builtins.complex'] = COMPLEX;
  t['builtins.bytearray'] = fn((a) => new PyByteArray(bytesFromArgs(a)));
  t['builtins.bytes'] = fn((a) => bytesFromArgs(a));
  t['_codecs.encode'] = fn((a) => {
    arity(a, 1, 3);
    return encodeString(expectString(a[0], 'obj'), a[1] === undefined ? 'utf-8' : expectString(a[1], 'encoding'));
  });
  t['copyreg._reconstructor'] = fn(reconstructor);
  t['copyreg.__newobj__'] = fn((a, ctx) => {
    arity(a, 1, Infinity);
    return ctx.newObject(a[0]!, a.slice(1), null);
  });
  t['copyreg.__newobj_ex__'] = fn((a, ctx) => {
    arity(a, 3);
    const [cls, args, kwargs] = a;
    if (!(kwargs instanceof PyDict)) fail(`kwargs must be a dict, got ${describe(kwargs)}`);
    return ctx.newObject(cls!, sequenceItems(args, 'args'), kwargs);
  });
  t['argparse.Namespace'] = dataclass();
  const pathArgs = (a: PyValue[]): void => a.forEach((x, i) => expectString(x, `path part ${i}`));
  add(t, ['pathlib.Path', 'pathlib.PosixPath', 'pathlib.WindowsPath', 'pathlib.PurePath', 'pathlib.PurePosixPath', 'pathlib.PureWindowsPath'], callableRecord(pathArgs));

  // torch.distributed.checkpoint (DCP) `.metadata`
  for (const name of ['Metadata', 'TensorStorageMetadata', 'ChunkStorageMetadata', 'BytesStorageMetadata', 'MetadataIndex', 'StorageMeta']) {
    t[`${DCP}.${name}`] = dataclass();
  }
  t[`${DCP}.TensorProperties`] = TENSOR_PROPERTIES;
  t[`${DCP}._MEM_FORMAT_ENCODING`] = enumClass([0, 1, 2]);
  t[`${SHARDED}.TensorProperties`] = TENSOR_PROPERTIES;
  t[`${SHARDED}.MEM_FORMAT_ENCODING`] = enumClass([0, 1, 2]);
  t['torch.distributed.checkpoint.filesystem._StorageInfo'] = dataclass();
  t['torch.distributed.checkpoint.filesystem._StoragePrefix'] = dataclass();
  // Save plans that decentralized planners (megatron-core's) attach to `.metadata` as
  // `all_local_plans`: plain dataclasses and the WriteItemType enum (TENSOR, SHARD, BYTE_IO).
  for (const name of ['SavePlan', 'WriteItem', 'TensorWriteData']) t[`torch.distributed.checkpoint.planner.${name}`] = dataclass();
  t['torch.distributed.checkpoint.planner.WriteItemType'] = enumClass([1, 2, 3]);
  return t;
}

/** The built-in allow-list. */
export const ALLOWLIST: AllowList = Object.freeze(buildTable());

/** Python 2 names that CPython maps to Python 3 ones when reading protocols 0–2 (fix_imports). */
const PY2_MODULES: Readonly<Record<string, string>> = { __builtin__: 'builtins', copy_reg: 'copyreg', exceptions: 'builtins' };
const PY2_NAMES: Readonly<Record<string, [string, string]>> = {
  '__builtin__.xrange': ['builtins', 'range'],
  '__builtin__.unicode': ['builtins', 'str'],
  '__builtin__.basestring': ['builtins', 'str'],
  '__builtin__.long': ['builtins', 'int'],
  '__builtin__.unichr': ['builtins', 'chr'],
  '__builtin__.reduce': ['functools', 'reduce'],
  '__builtin__.intern': ['sys', 'intern'],
  'UserDict.UserDict': ['collections', 'UserDict'],
  'UserList.UserList': ['collections', 'UserList'],
};

/** CPython's `_compat_pickle` mapping (Python 2 → 3) for the modules pickles of protocols < 3 name. */
export function fixImports(module: string, name: string): [string, string] {
  const byName = PY2_NAMES[`${module}.${name}`];
  if (byName) return byName;
  return [PY2_MODULES[module] ?? module, name];
}

/** The reverse mapping the pickler applies at protocol 2 (as CPython does with fix_imports). */
export function toPy2Module(module: string): string {
  return module === 'builtins' ? '__builtin__' : module === 'copyreg' ? 'copy_reg' : module;
}
