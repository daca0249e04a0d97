/**
 * The values the safe unpickler produces and the pickler consumes.
 *
 * Python's data model does not map 1:1 onto JavaScript's, and the difference matters when a
 * value is written back (an `int` 1 and a `float` 1.0 are different pickles; a tuple is not a
 * list; dict keys may be tuples or dataclass instances). So every Python type that can reach a
 * checkpoint has an explicit representation here, and nothing else can be produced.
 */
import type { DType } from '../tensor/dtype.js';

/** Anything the unpickler may hand back. */
export type PyValue =
  | null
  | boolean
  | number // Python int that fits a safe integer
  | bigint // Python int beyond ±2^53
  | string
  | Uint8Array // Python bytes
  | PyFloat
  | PyTuple
  | PyValue[] // Python list
  | PyDict
  | PySet
  | PyComplex
  | PySlice
  | PyByteArray
  | PyGlobal
  | PyObject
  | StorageRef
  | TensorRef;

/** A Python float (kept apart from int so that it pickles back as a float). */
export class PyFloat {
  constructor(readonly value: number) {}
}

export class PyTuple {
  constructor(readonly items: PyValue[]) {}
}

/** `torch.Size` (a tuple subclass that DCP metadata pickles as `torch.Size((…,))`). */
export class TorchSize extends PyTuple {}

export class PyComplex {
  constructor(readonly re: number, readonly im: number) {}
}

export class PySlice {
  constructor(readonly start: PyValue, readonly stop: PyValue, readonly step: PyValue) {}
}

export class PyByteArray {
  constructor(readonly bytes: Uint8Array) {}
}

export class PySet {
  /**
   * Keys of the hashable primitive items (None, int, str) already in the set, kept with it so
   * that each ADDITEMS costs time linear in the items it adds (rebuilding it per opcode made a
   * 120 KB pickle take 52 s).
   */
  private readonly keys = new Set<unknown>();

  constructor(
    readonly items: PyValue[],
    readonly frozen: boolean,
  ) {
    for (const x of items) {
      const k = primitiveSetKey(x);
      if (k !== NOT_PRIMITIVE) this.keys.add(k);
    }
  }

  /** Adds `items`, dropping duplicate None/int/str items as Python would. */
  addAll(items: readonly PyValue[]): void {
    for (const x of items) {
      const k = primitiveSetKey(x);
      if (k !== NOT_PRIMITIVE) {
        if (this.keys.has(k)) continue;
        this.keys.add(k);
      }
      this.items.push(x);
    }
  }
}

const NOT_PRIMITIVE = Symbol('not a hashable primitive');

function primitiveSetKey(x: PyValue): unknown {
  if (x === null || typeof x === 'number') return x;
  if (typeof x === 'string') return 's:' + x;
  if (typeof x === 'bigint') return Number.isSafeInteger(Number(x)) ? Number(x) : x;
  return NOT_PRIMITIVE;
}

/**
 * A dict (or `collections.OrderedDict`) in insertion order. Keys are arbitrary PyValues; string
 * and integer keys are also indexed for O(1) lookup.
 */
export class PyDict {
  readonly entries: Array<[PyValue, PyValue]> = [];
  private readonly index = new Map<string | number | bigint, number>();
  /**
   * Instance attributes set by BUILD — `nn.Module.state_dict()` returns an OrderedDict carrying
   * `_metadata` (per-module versions that `load_state_dict` reads), so torch → torch keeps it.
   */
  attrs: PyDict | undefined;
  constructor(readonly kind: 'dict' | 'OrderedDict' = 'dict') {}

  set(key: PyValue, value: PyValue): void {
    const k = primitiveKey(key);
    if (k !== undefined) {
      const at = this.index.get(k);
      if (at !== undefined) {
        this.entries[at]![1] = value;
        return;
      }
      this.index.set(k, this.entries.length);
    }
    this.entries.push([key, value]);
  }

  get(key: string | number): PyValue | undefined {
    const at = this.index.get(typeof key === 'string' ? 's:' + key : key);
    return at === undefined ? undefined : this.entries[at]![1];
  }

  has(key: string | number): boolean {
    return this.index.has(typeof key === 'string' ? 's:' + key : key);
  }

  get size(): number {
    return this.entries.length;
  }

  /** Entries whose keys are strings (the usual case for state dicts). */
  *stringEntries(): IterableIterator<[string, PyValue]> {
    for (const [k, v] of this.entries) if (typeof k === 'string') yield [k, v];
  }

  static from(obj: Record<string, PyValue> | Iterable<[PyValue, PyValue]>, kind: 'dict' | 'OrderedDict' = 'dict'): PyDict {
    const d = new PyDict(kind);
    const it = Symbol.iterator in obj ? (obj as Iterable<[PyValue, PyValue]>) : Object.entries(obj);
    for (const [k, v] of it) d.set(k, v);
    return d;
  }
}

function primitiveKey(key: PyValue): string | number | bigint | undefined {
  if (typeof key === 'string') return 's:' + key;
  if (typeof key === 'number' || typeof key === 'bigint') return key;
  return undefined;
}

/** A module-level Python object used as a value, e.g. `torch.float32`, `torch.strided`. */
export class PyGlobal {
  constructor(readonly module: string, readonly name: string) {}
  get qualname(): string {
    return `${this.module}.${this.name}`;
  }
}

/**
 * An instance of an allow-listed class (a DCP metadata dataclass, `argparse.Namespace`, a
 * Megatron enum ...): its class and its attribute state. `args` holds constructor arguments
 * when the pickle built it through a call rather than NEWOBJ + BUILD.
 */
export class PyObject {
  constructor(
    readonly module: string,
    readonly name: string,
    /** What BUILD set: usually the attribute dict; a class with __getstate__ may store a tuple. */
    public state: PyValue = new PyDict(),
    readonly args: PyValue[] = [],
    /**
     * How the pickle made it: `'newobj'` is `cls.__new__(cls, *args)` (NEWOBJ, what
     * `object.__reduce_ex__(2)` gives dataclasses); `'call'` is `cls(*args)` (REDUCE: enums,
     * `pathlib` paths, `torch.device`). The pickler writes it back the same way.
     */
    readonly via: 'newobj' | 'call' = 'newobj',
  ) {}
  get qualname(): string {
    return `${this.module}.${this.name}`;
  }
  /** An attribute from a dict state (or from the slots dict of a `(None, slots)` state). */
  attr(name: string): PyValue | undefined {
    const s = this.state;
    if (s instanceof PyDict) return s.get(name);
    if (s instanceof PyTuple && s.items.length === 2 && s.items[1] instanceof PyDict) return s.items[1].get(name);
    return undefined;
  }
}

/** A storage named through torch.save's persistent id `('storage', cls, key, location, numel)`. */
export class StorageRef {
  constructor(
    /** The record name under `data/` in the archive. */
    readonly key: string,
    /** Element dtype of a typed storage; U8 for an `UntypedStorage`. */
    readonly dtype: DType,
    readonly location: string,
    /** Element count as pickled (bytes for an untyped storage). */
    readonly numel: number,
    /** True when pickled as `torch.UntypedStorage` (the tensor's dtype then comes from rebuild args). */
    readonly untyped: boolean,
  ) {}
}

/** A tensor rebuilt by `torch._utils._rebuild_tensor_v2/_v3` (and `_rebuild_parameter`). */
export class TensorRef {
  constructor(
    readonly storage: StorageRef,
    /** In elements of `dtype`. */
    readonly storageOffset: number,
    readonly shape: readonly number[],
    /** In elements of `dtype`. */
    readonly stride: readonly number[],
    readonly dtype: DType,
    readonly requiresGrad: boolean = false,
    /** True when wrapped by `torch._utils._rebuild_parameter` (an nn.Parameter). */
    readonly parameter: boolean = false,
    /**
     * Python attributes set on the tensor or Parameter object (the `state` argument of
     * `_rebuild_parameter_with_state` / `torch._tensor._rebuild_from_type_v2`), or null.
     */
    readonly state: PyValue | null = null,
  ) {}
}

export function isTensorRef(v: PyValue | undefined): v is TensorRef {
  return v instanceof TensorRef;
}

/** A float or int as a JS number (ints beyond 2^53 lose precision). */
export function asNumber(v: PyValue | undefined): number | undefined {
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return Number(v);
  if (v instanceof PyFloat) return v.value;
  if (typeof v === 'boolean') return v ? 1 : 0;
  return undefined;
}

/**
 * A short, readable rendering for error messages and `inspect`: at most 8 items of any container,
 * three levels deep, strings and big ints cut, and a budget of DESCRIBE_BUDGET characters for the
 * whole text — its cost is bounded whatever the value (an uncut tuple of tuples once made a
 * 2.4 KB pickle's error take 20 s and 1.2 GB).
 */
export function describe(v: PyValue | undefined): string {
  const budget = { left: DESCRIBE_BUDGET };
  const text = describeIn(v, 0, budget);
  return text.length > DESCRIBE_BUDGET ? `${text.slice(0, DESCRIBE_BUDGET)}…` : text;
}

const DESCRIBE_BUDGET = 400;
const DESCRIBE_ITEMS = 8;

function describeIn(v: PyValue | undefined, depth: number, budget: { left: number }): string {
  if (budget.left <= 0) return '…';
  const out = describeOne(v, depth, budget);
  budget.left -= out.length;
  return out;
}

function describeItems(items: readonly PyValue[], depth: number, budget: { left: number }): string {
  const shown = items.slice(0, DESCRIBE_ITEMS).map((x) => describeIn(x, depth + 1, budget));
  return shown.join(', ') + (items.length > DESCRIBE_ITEMS ? `, … (${items.length} items)` : '');
}

function describeOne(v: PyValue | undefined, depth: number, budget: { left: number }): string {
  // Not a Python value: what an error reports when a field, key or attribute is absent.
  if (v === undefined) return 'missing';
  if (v === null) return 'None';
  if (typeof v === 'boolean') return v ? 'True' : 'False';
  if (typeof v === 'number') return String(v);
  // Decimal conversion of a huge int is superlinear: say how big it is instead.
  if (typeof v === 'bigint') return v.toString(16).length > 64 ? `int(${v < 0n ? '-' : ''}${v.toString(16).length * 4} bits)` : String(v);
  if (typeof v === 'string') return v.length > 80 ? `${JSON.stringify(v.slice(0, 80))}… (${v.length} chars)` : JSON.stringify(v);
  if (v instanceof Uint8Array) return `bytes[${v.length}]`;
  if (v instanceof PyFloat) return Number.isInteger(v.value) ? v.value.toFixed(1) : String(v.value);
  if (v instanceof PyGlobal) return v.qualname.length > 120 ? `${v.qualname.slice(0, 120)}…` : v.qualname;
  if (v instanceof PyObject) return `${v.qualname.length > 120 ? `${v.qualname.slice(0, 120)}…` : v.qualname}(…)`;
  if (v instanceof TensorRef) return `tensor(${v.dtype}, [${v.shape.slice(0, DESCRIBE_ITEMS).join(', ')}${v.shape.length > DESCRIBE_ITEMS ? ', …' : ''}])`;
  if (v instanceof StorageRef) return `storage(${v.key.length > 80 ? `${v.key.slice(0, 80)}…` : v.key})`;
  if (v instanceof PySet) return `${v.frozen ? 'frozenset' : 'set'}(${v.items.length})`;
  if (v instanceof PyComplex) return `(${v.re}+${v.im}j)`;
  if (v instanceof PySlice) return 'slice(…)';
  if (v instanceof PyByteArray) return `bytearray[${v.bytes.length}]`;
  if (depth > 2) return '…';
  if (v instanceof PyTuple) return `(${describeItems(v.items, depth, budget)}${v.items.length === 1 ? ',' : ''})`;
  if (Array.isArray(v)) return `[${describeItems(v, depth, budget)}]`;
  if (v instanceof PyDict) {
    const shown = v.entries.slice(0, DESCRIBE_ITEMS).map(([k, x]) => `${describeIn(k, depth + 1, budget)}: ${describeIn(x, depth + 1, budget)}`);
    return `{${shown.join(', ')}${v.size > DESCRIBE_ITEMS ? `, … (${v.size} items)` : ''}}`;
  }
  return '?';
}
