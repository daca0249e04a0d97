/**
 * A protocol-2 pickler for PyValues that writes what CPython's pickler (and torch.save, which
 * uses it at protocol 2) writes for the same Python objects: the same opcodes, the same
 * memoization (BINPUT after every memoizable object, BINGET on reuse), the same reductions
 * (`_codecs.encode` for bytes, `collections.OrderedDict()` + SETITEMS, `torch.Size((…,))`,
 * NEWOBJ + BUILD for dataclasses, `torch._utils._rebuild_tensor_v2` for tensors).
 */
import * as op from './opcodes.js';
import { PicklingError } from './errors.js';
import { TORCH_LAYOUT_NAMES, toPy2Module } from './allowlist.js';
import {
  PyByteArray, PyComplex, PyDict, PyFloat, PyGlobal, PyObject, PySet, PySlice, PyTuple, StorageRef, TensorRef, TorchSize,
  describe, type PyValue,
} from './values.js';
import { byteLength, dtypeInfo } from '../tensor/dtype.js';

export interface PickleOptions {
  /** Only protocol 2 (what torch.save writes) is supported. */
  protocol?: 2;
}

/** Most containers nested inside each other (the unpickler's default nesting limit). */
const MAX_DEPTH = 1000;
/** CPython's pickler batches APPENDS/SETITEMS in groups of this many. */
const BATCHSIZE = 1000;

/** Writes `value` as a protocol-2 pickle: PROTO 2 … STOP. */
export function pickle(value: PyValue, opts: PickleOptions = {}): Uint8Array {
  if (opts.protocol !== undefined && opts.protocol !== 2) throw new PicklingError(`pickle protocol ${String(opts.protocol)} is not supported (only 2)`);
  const p = new Pickler();
  p.byte(op.PROTO);
  p.byte(2);
  p.save(value);
  p.byte(op.STOP);
  return p.result();
}

type Writer = () => void;

class Pickler {
  private buf = new Uint8Array(256);
  private len = 0;
  private readonly memoObjects = new Map<object, number>();
  /** Strings and globals are memoized by value (CPython memoizes by identity; equal strings usually are the same object). */
  private readonly memoValues = new Map<string, number>();
  private nextMemo = 0;
  private depth = 0;
  private readonly scratch = new DataView(new ArrayBuffer(8));

  result(): Uint8Array {
    return this.buf.slice(0, this.len);
  }

  private reserve(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  byte(b: number): void {
    this.reserve(1);
    this.buf[this.len++] = b;
  }

  private raw(b: Uint8Array): void {
    this.reserve(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
  }

  private u32(n: number): void {
    this.reserve(4);
    this.buf[this.len++] = n & 0xff;
    this.buf[this.len++] = (n >>> 8) & 0xff;
    this.buf[this.len++] = (n >>> 16) & 0xff;
    this.buf[this.len++] = (n >>> 24) & 0xff;
  }

  // -------------------------------------------------------------------------------------------
  // Memo

  private put(): number {
    const i = this.nextMemo++;
    if (i < 256) {
      this.byte(op.BINPUT);
      this.byte(i);
    } else {
      this.byte(op.LONG_BINPUT);
      this.u32(i);
    }
    return i;
  }

  private memoize(obj: object): void {
    this.memoObjects.set(obj, this.put());
  }

  private get(i: number): void {
    if (i < 256) {
      this.byte(op.BINGET);
      this.byte(i);
    } else {
      this.byte(op.LONG_BINGET);
      this.u32(i);
    }
  }

  // -------------------------------------------------------------------------------------------

  save(v: PyValue): void {
    if (v === null) return this.byte(op.NONE);
    if (typeof v === 'boolean') return this.byte(v ? op.NEWTRUE : op.NEWFALSE);
    if (typeof v === 'number') {
      if (!Number.isSafeInteger(v)) {
        throw new PicklingError(`${v} is not a Python int (a number must be a safe integer; wrap floats in PyFloat, use bigint beyond 2^53)`);
      }
      return this.saveInt(v);
    }
    if (typeof v === 'bigint') return this.saveInt(v);
    if (typeof v === 'string') return this.saveStr(v);
    if (v instanceof PyFloat) return this.saveFloat(v.value);
    if (v instanceof PyGlobal) return this.saveGlobalValue(v);
    const seen = this.memoObjects.get(v);
    if (seen !== undefined) return this.get(seen);
    if (v instanceof Uint8Array) return this.saveBytes(v);
    if (v instanceof StorageRef) return this.savePersistentStorage(v);
    if (v instanceof PyComplex) {
      return this.saveReduce('builtins', 'complex', [() => this.saveFloat(v.re), () => this.saveFloat(v.im)], v);
    }
    if (v instanceof PyByteArray) {
      const b = v.bytes;
      return this.saveReduce('builtins', 'bytearray', b.length ? [() => this.saveBytes(b.slice())] : [], v);
    }
    if (++this.depth > MAX_DEPTH) throw new PicklingError(`value nests containers deeper than ${MAX_DEPTH} levels`);
    try {
      if (v instanceof TorchSize) {
        const inner = new PyTuple(v.items);
        this.saveReduce('torch', 'Size', [() => this.saveTuple(inner)], v);
      } else if (v instanceof PyTuple) this.saveTuple(v);
      else if (Array.isArray(v)) this.saveList(v);
      else if (v instanceof PyDict) this.saveDict(v);
      else if (v instanceof PySet) {
        const items = v.items.slice();
        this.saveReduce('builtins', v.frozen ? 'frozenset' : 'set', [() => this.saveList(items)], v);
      } else if (v instanceof PySlice) {
        this.saveReduce('builtins', 'slice', [() => this.save(v.start), () => this.save(v.stop), () => this.save(v.step)], v);
      } else if (v instanceof PyObject) this.saveObject(v);
      else if (v instanceof TensorRef) this.saveTensor(v);
      else throw new PicklingError(`cannot pickle ${describe(v as PyValue)} (${Object.prototype.toString.call(v)})`);
    } finally {
      this.depth--;
    }
  }

  private saveInt(v: number | bigint): void {
    if (typeof v === 'bigint' && v >= -0x80000000n && v <= 0x7fffffffn) v = Number(v);
    if (typeof v === 'number' && v >= 0 && v <= 0xff) {
      this.byte(op.BININT1);
      this.byte(v);
    } else if (typeof v === 'number' && v >= 0 && v <= 0xffff) {
      this.byte(op.BININT2);
      this.byte(v & 0xff);
      this.byte(v >> 8);
    } else if (typeof v === 'number' && v >= -0x80000000 && v <= 0x7fffffff) {
      this.byte(op.BININT);
      this.u32(v >>> 0);
    } else {
      const b = encodeLong(BigInt(v));
      if (b.length < 256) {
        this.byte(op.LONG1);
        this.byte(b.length);
      } else {
        this.byte(op.LONG4);
        this.u32(b.length);
      }
      this.raw(b);
    }
  }

  private saveFloat(x: number): void {
    this.byte(op.BINFLOAT);
    this.scratch.setFloat64(0, x, false);
    this.raw(new Uint8Array(this.scratch.buffer.slice(0)));
  }

  private saveStr(s: string): void {
    const key = 's:' + s;
    const seen = this.memoValues.get(key);
    if (seen !== undefined) return this.get(seen);
    this.writeStr(s);
    this.memoValues.set(key, this.put());
  }

  private writeStr(s: string): void {
    const b = encodeUtf8SurrogatePass(s);
    this.byte(op.BINUNICODE);
    this.u32(b.length);
    this.raw(b);
  }

  /** bytes at protocol < 3, as CPython writes them: `_codecs.encode(latin1_str, 'latin1')`, or `bytes()` when empty. */
  private saveBytes(b: Uint8Array): void {
    // CPython's empty and 1-byte bytes objects are singletons, so equal ones share a memo entry.
    const key = b.length <= 1 ? `b:${b.length ? b[0] : ''}` : undefined;
    const seen = key === undefined ? undefined : this.memoValues.get(key);
    if (seen !== undefined) return this.get(seen);
    if (b.length === 0) this.saveReduce('builtins', 'bytes', [], b);
    else {
      let s = '';
      for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));
      // The latin-1 str is a new object in CPython (memoized, never shared) unless it is one character long.
      const saveLatin1 = (): void => {
        if (s.length === 1) return this.saveStr(s);
        this.writeStr(s);
        this.put();
      };
      this.saveReduce('_codecs', 'encode', [saveLatin1, () => this.saveStr('latin1')], b);
    }
    if (key !== undefined) this.memoValues.set(key, this.memoObjects.get(b)!);
  }

  /** A GLOBAL opcode (memoized); `builtins`/`copyreg` are written with their Python 2 names, as CPython does at protocol 2. */
  private saveGlobal(module: string, name: string): void {
    const key = `g:${module}.${name}`;
    const seen = this.memoValues.get(key);
    if (seen !== undefined) return this.get(seen);
    if (/[\n\r]/.test(module + name) || !module || !name) throw new PicklingError(`invalid global ${JSON.stringify(module)}.${JSON.stringify(name)}`);
    this.byte(op.GLOBAL);
    this.raw(new TextEncoder().encode(`${toPy2Module(module)}\n${name}\n`));
    this.memoValues.set(key, this.put());
  }

  /** A PyGlobal as a value; torch layouts pickle as `torch.serialization._get_layout('torch.strided')`, as torch registers. */
  private saveGlobalValue(g: PyGlobal): void {
    if (g.module === 'torch' && (TORCH_LAYOUT_NAMES as readonly string[]).includes(g.name)) {
      const key = `l:${g.qualname}`;
      const seen = this.memoValues.get(key);
      if (seen !== undefined) return this.get(seen);
      this.saveGlobal('torch.serialization', '_get_layout');
      this.saveTupleOf([() => this.saveStr(g.qualname)]);
      this.byte(op.REDUCE);
      this.memoValues.set(key, this.put());
      return;
    }
    this.saveGlobal(g.module, g.name);
  }

  /** CPython's save_tuple: TUPLE1–3 for up to 3 items, else MARK … TUPLE; memoized unless empty. */
  private saveTuple(t: PyTuple): void {
    this.saveTupleOf(t.items.map((x) => () => this.save(x)), t);
  }

  private saveTupleOf(items: Writer[], obj?: object): void {
    const n = items.length;
    if (n === 0) return this.byte(op.EMPTY_TUPLE);
    if (n > 3) this.byte(op.MARK);
    for (const w of items) w();
    const seen = obj ? this.memoObjects.get(obj) : undefined;
    if (seen !== undefined) {
      // The tuple was memoized while saving its items (a cycle through a list or dict).
      if (n > 3) this.byte(op.POP_MARK);
      else for (let i = 0; i < n; i++) this.byte(op.POP);
      return this.get(seen);
    }
    this.byte(n === 1 ? op.TUPLE1 : n === 2 ? op.TUPLE2 : n === 3 ? op.TUPLE3 : op.TUPLE);
    if (obj) this.memoize(obj);
    else this.put();
  }

  /** `func(*args)`: GLOBAL, argument tuple, REDUCE, memoized as `obj`. */
  private saveReduce(module: string, name: string, args: Writer[], obj: object): void {
    this.saveGlobal(module, name);
    this.saveTupleOf(args);
    this.byte(op.REDUCE);
    this.memoize(obj);
  }

  /** CPython's `batch_list_exact`: APPEND for a single item, else MARK … APPENDS per batch of 1000. */
  private saveList(list: PyValue[]): void {
    this.byte(op.EMPTY_LIST);
    this.memoize(list);
    if (list.length === 1) {
      this.save(list[0]!);
      this.byte(op.APPEND);
      return;
    }
    for (let i = 0; i < list.length; i += BATCHSIZE) {
      this.byte(op.MARK);
      for (const x of list.slice(i, i + BATCHSIZE)) this.save(x);
      this.byte(op.APPENDS);
    }
  }

  private saveDict(d: PyDict): void {
    const entries = d.entries;
    if (d.kind === 'OrderedDict') {
      // `OrderedDict.__reduce__` gives the items as an iterator: CPython's `batch_dict`.
      this.saveReduce('collections', 'OrderedDict', [], d);
      for (let i = 0; i < entries.length; i += BATCHSIZE) {
        const batch = entries.slice(i, i + BATCHSIZE);
        if (batch.length === 1) this.savePair(batch[0]!, op.SETITEM);
        else {
          this.byte(op.MARK);
          for (const e of batch) this.savePair(e);
          this.byte(op.SETITEMS);
        }
      }
      // save_reduce writes the state (the instance __dict__) after the items.
      if (d.attrs && d.attrs.size) {
        this.save(d.attrs);
        this.byte(op.BUILD);
      }
      return;
    }
    // A plain dict: CPython's `batch_dict_exact` (which ends a multiple of 1000 items with an empty batch).
    this.byte(op.EMPTY_DICT);
    this.memoize(d);
    if (entries.length === 0) return;
    if (entries.length === 1) return this.savePair(entries[0]!, op.SETITEM);
    let i = 0;
    let n: number;
    do {
      this.byte(op.MARK);
      n = 0;
      for (; i < entries.length && n < BATCHSIZE; i++, n++) this.savePair(entries[i]!);
      this.byte(op.SETITEMS);
    } while (n === BATCHSIZE);
  }

  private savePair([k, v]: readonly [PyValue, PyValue], then?: number): void {
    this.save(k);
    this.save(v);
    if (then !== undefined) this.byte(then);
  }

  /** `copyreg.__newobj__` (NEWOBJ) or a call (REDUCE), then BUILD with the state unless it is None / empty. */
  private saveObject(o: PyObject): void {
    this.saveGlobal(o.module, o.name);
    this.saveTupleOf(o.args.map((x) => () => this.save(x)));
    this.byte(o.via === 'call' ? op.REDUCE : op.NEWOBJ);
    this.memoize(o);
    const s = o.state;
    if (s === null || (s instanceof PyDict && s.size === 0)) return;
    this.save(s);
    this.byte(op.BUILD);
  }

  // -------------------------------------------------------------------------------------------
  // torch

  /**
   * torch.save's persistent id `('storage', torch.<X>Storage | torch.storage.UntypedStorage, key,
   * location, numel)` then BINPERSID. A typed storage of a dtype torch has no storage class for
   * (fp8, uint16/32/64) is written untyped with its size in bytes, as torch does.
   */
  private savePersistentStorage(s: StorageRef): void {
    const [cls, numel] = storageClassAndNumel(s);
    this.saveTupleOf([
      () => this.saveStr('storage'),
      () => this.saveGlobal(cls[0], cls[1]),
      () => this.saveStr(s.key),
      () => this.saveStr(s.location),
      () => this.saveInt(numel),
    ]);
    this.byte(op.BINPERSID);
  }

  private saveEmptyOrderedDict(): void {
    this.saveReduce('collections', 'OrderedDict', [], {});
  }

  /** `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`, or v3 with the dtype. */
  private tensorCall(t: TensorRef, requiresGrad: boolean): { func: string; args: Writer[] } {
    const s = t.storage;
    const v3 = usesV3(s);
    if (!s.untyped && s.dtype !== t.dtype) {
      throw new PicklingError(`tensor of ${t.dtype} on typed storage '${s.key}' of ${s.dtype}: make the storage untyped to view it as another dtype`);
    }
    if (t.shape.length !== t.stride.length) throw new PicklingError(`tensor shape [${t.shape.join(', ')}] and stride [${t.stride.join(', ')}] differ in length`);
    if (!Number.isSafeInteger(t.storageOffset) || t.storageOffset < 0) throw new PicklingError(`tensor storage offset must be an int ≥ 0, got ${t.storageOffset}`);
    const ints = (xs: readonly number[], what: string): Writer[] => xs.map((x) => {
      if (!Number.isSafeInteger(x) || x < 0) throw new PicklingError(`tensor ${what} must be ints ≥ 0, got [${xs.join(', ')}]`);
      return () => this.saveInt(x);
    });
    const shape = ints(t.shape, 'shape');
    const stride = ints(t.stride, 'stride');
    const torchDtype = dtypeInfo(t.dtype).torchDtype;
    if (v3 && !torchDtype) throw new PicklingError(`dtype ${t.dtype} has no torch dtype`);
    const args: Writer[] = [
      () => this.savePersistentStorage(s),
      () => this.saveInt(t.storageOffset),
      () => this.saveTupleOf(shape),
      () => this.saveTupleOf(stride),
      () => this.byte(requiresGrad ? op.NEWTRUE : op.NEWFALSE),
      () => this.saveEmptyOrderedDict(),
    ];
    if (v3) args.push(() => this.saveGlobal('torch', torchDtype!));
    return { func: v3 ? '_rebuild_tensor_v3' : '_rebuild_tensor_v2', args };
  }

  private savePlainTensor(t: TensorRef, requiresGrad: boolean): void {
    const { func, args } = this.tensorCall(t, requiresGrad);
    this.saveGlobal('torch._utils', func);
    this.saveTupleOf(args);
    this.byte(op.REDUCE);
  }

  /**
   * As torch 2.13 pickles them: a Parameter is `_rebuild_parameter(tensor, requires_grad,
   * OrderedDict())` (`_rebuild_parameter_with_state` with Python attributes); a plain tensor with
   * Python attributes is `torch._tensor._rebuild_from_type_v2(func, torch.Tensor, args, state)`.
   */
  private saveTensor(t: TensorRef): void {
    if (t.parameter) {
      const withState = t.state !== null;
      this.saveGlobal('torch._utils', withState ? '_rebuild_parameter_with_state' : '_rebuild_parameter');
      const args: Writer[] = [
        () => {
          this.savePlainTensor(t, false);
          this.put();
        },
        () => this.byte(t.requiresGrad ? op.NEWTRUE : op.NEWFALSE),
        () => this.saveEmptyOrderedDict(),
      ];
      if (withState) args.push(() => this.save(t.state));
      this.saveTupleOf(args);
      this.byte(op.REDUCE);
    } else if (t.state !== null) {
      const { func, args } = this.tensorCall(t, t.requiresGrad);
      this.saveGlobal('torch._tensor', '_rebuild_from_type_v2');
      this.saveTupleOf([
        () => this.saveGlobal('torch._utils', func),
        () => this.saveGlobal('torch', 'Tensor'),
        () => this.saveTupleOf(args),
        () => this.save(t.state),
      ]);
      this.byte(op.REDUCE);
    } else {
      this.savePlainTensor(t, t.requiresGrad);
    }
    this.memoize(t);
  }
}

function usesV3(s: StorageRef): boolean {
  return s.untyped || !dtypeInfo(s.dtype).torchStorage;
}

function storageClassAndNumel(s: StorageRef): [[string, string], number] {
  if (!Number.isSafeInteger(s.numel) || s.numel < 0) throw new PicklingError(`storage '${s.key}' numel must be an int ≥ 0, got ${s.numel}`);
  if (/[\n\r]/.test(s.key + s.location)) throw new PicklingError(`invalid storage key or location ${JSON.stringify(s.key)} ${JSON.stringify(s.location)}`);
  if (s.untyped) return [['torch.storage', 'UntypedStorage'], s.numel];
  const cls = dtypeInfo(s.dtype).torchStorage;
  if (cls) return [['torch', cls], s.numel];
  if (!dtypeInfo(s.dtype).torchDtype) throw new PicklingError(`dtype ${s.dtype} cannot be stored in a torch file`);
  return [['torch.storage', 'UntypedStorage'], byteLength(s.dtype, s.numel)];
}

/** Python's `encode_long`: minimal little-endian two's complement (empty for 0). */
export function encodeLong(x: bigint): Uint8Array {
  if (x === 0n) return new Uint8Array(0);
  const abs = x < 0n ? -x : x;
  const bitLength = abs.toString(2).length;
  let n = (bitLength >> 3) + 1;
  const mod = 1n << BigInt(8 * n);
  let u = x < 0n ? mod + x : x;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = Number(u & 0xffn);
    u >>= 8n;
  }
  if (x < 0n && n > 1 && out[n - 1] === 0xff && (out[n - 2]! & 0x80) !== 0) n--;
  return out.subarray(0, n);
}

/** UTF-8, writing lone surrogates as Python's "surrogatepass" does. */
function encodeUtf8SurrogatePass(s: string): Uint8Array {
  if (!/[\uD800-\uDFFF]/.test(s)) return new TextEncoder().encode(s);
  const out: number[] = [];
  for (let i = 0; i < s.length; i++) {
    let c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
        i++;
      }
    }
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 0x3f));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
    else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 0x3f), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
  }
  return Uint8Array.from(out);
}
