/**
 * A restricted unpickler: a pickle VM for protocols 0–5 that never runs code. GLOBAL may only name
 * entries of the allow-list (allowlist.ts), whose TypeScript handlers rebuild objects as PyValues.
 * The stack, the memo and the nesting of the result are bounded, and truncated input is refused.
 */
import * as op from './opcodes.js';
import { UnpicklingError } from './errors.js';
import {
  ALLOWLIST, defaultBuild, fixImports, isBlockedGlobal, addToSet, makeSet,
  type AllowEntry, type AllowList, type CallContext,
} from './allowlist.js';
import {
  PyByteArray, PyComplex, PyDict, PyFloat, PyGlobal, PyObject, PySet, PySlice, PyTuple, StorageRef, TensorRef,
  describe, type PyValue,
} from './values.js';

export interface UnpickleLimits {
  /** Memo size: the highest memo index allowed is `memo - 1`. */
  memo: number;
  /** Items on the VM stack (across all open MARKs). */
  stack: number;
  /** Nesting of containers in the result, and of open MARKs. */
  nesting: number;
  /**
   * Containers visited when the result is walked as a tree (a shared container counts once per
   * reference). Bounds the work of anything that walks the result; default max(1e6, 16 × bytes).
   */
  nodes: number;
  /**
   * Total work of the VM: one unit per opcode plus one per item an opcode consumes (a MARK's
   * items, a call's arguments). Every opcode is linear in what it consumes, so this is a safety
   * net against any that is not; default max(1e7, 64 × bytes).
   */
  work: number;
}

export const DEFAULT_LIMITS: Readonly<Omit<UnpickleLimits, 'nodes' | 'work'>> = Object.freeze({
  // Each memo entry costs at least one byte of input, so the memo never outgrows the pickle;
  // the cap only refuses absurd indices. Large DCP `.metadata` files have millions of entries.
  memo: 100_000_000,
  stack: 1_000_000,
  nesting: 1000,
});

export interface UnpickleOptions {
  /** Called for PERSID/BINPERSID; its return value is pushed. Without it, a persistent id is an error. */
  persistentLoad?: (pid: PyValue) => PyValue;
  /** Extra allow-list entries for this call (e.g. Megatron/NxD classes), same shape as the built-in table. */
  extraGlobals?: AllowList;
  /** Limits (defaults: memo 1e8 entries, stack 1e6 items, nesting 1000, nodes max(1e6, 16 × bytes)). */
  limits?: Partial<UnpickleLimits>;
  /** For error messages: the file (and record) being read. */
  source?: string;
}

/** Reads one pickle (protocols 0–5) into a PyValue, allowing only allow-listed globals. */
export function unpickle(data: Uint8Array, opts: UnpickleOptions = {}): PyValue {
  return new Unpickler(data, opts).load();
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

function modulePrefixes(keys: Iterable<string>, into: Set<string>): Set<string> {
  for (const key of keys) {
    const parts = key.split('.');
    for (let i = 1; i < parts.length; i++) into.add(parts.slice(0, i).join('.'));
  }
  return into;
}
const ALLOWED_MODULES: ReadonlySet<string> = modulePrefixes(Object.keys(ALLOWLIST), new Set());
/** Python's limit on decimal digits when parsing an int from text (sys.int_info.str_digits_check_threshold). */
const MAX_INT_DIGITS = 4300;

class Unpickler {
  private pos = 0;
  private opPos = 0;
  private proto = 0;
  private frameEnd = -1;
  private readonly stack: PyValue[] = [];
  private readonly marks: number[] = [];
  private readonly memo: PyValue[] = [];
  private memoCount = 0;
  private readonly limits: UnpickleLimits;
  private readonly table: (key: string) => AllowEntry | undefined;
  /** Modules (and their parents) that have allowed names: naming another name in them is a look-alike. */
  private readonly modules: ReadonlySet<string>;
  private readonly globals = new Map<string, PyGlobal>();
  private readonly ctx: (g: PyGlobal) => CallContext;

  constructor(private readonly data: Uint8Array, private readonly opts: UnpickleOptions) {
    this.limits = {
      ...DEFAULT_LIMITS,
      nodes: Math.max(1_000_000, 16 * data.length),
      work: Math.max(10_000_000, 64 * data.length),
      ...Object.fromEntries(Object.entries(opts.limits ?? {}).filter(([, v]) => v !== undefined)),
    };
    const extra = opts.extraGlobals;
    if (extra) {
      for (const key of Object.keys(extra)) {
        const dot = key.lastIndexOf('.');
        if (dot <= 0 || isBlockedGlobal(key.slice(0, dot), key.slice(dot + 1))) {
          throw new UnpicklingError(`extraGlobals may not allow ${key}`, { source: opts.source });
        }
      }
    }
    this.table = (key) => (extra && Object.hasOwn(extra, key) ? extra[key] : Object.hasOwn(ALLOWLIST, key) ? ALLOWLIST[key] : undefined);
    this.modules = extra ? modulePrefixes(Object.keys(extra), new Set(ALLOWED_MODULES)) : ALLOWED_MODULES;
    this.ctx = (g) => ({
      global: g,
      newObject: (cls, args, kwargs) => this.newObject(cls, args, kwargs),
      call: (func, args) => this.callGlobal(func, args),
    });
  }

  // -------------------------------------------------------------------------------------------
  // Errors and input

  private fail(reason: string, global?: string, cause?: unknown): never {
    throw new UnpicklingError(reason, { pos: this.opPos, source: this.opts.source, global, cause });
  }

  private need(n: number): void {
    const end = this.pos + n;
    if (end > this.data.length) {
      this.fail(`pickle ends early at byte ${this.data.length} (${op.opcodeName(this.data[this.opPos]!)} needs ${n} byte${n === 1 ? '' : 's'} at byte ${this.pos})`);
    }
    if (this.frameEnd >= 0 && this.pos < this.frameEnd && end > this.frameEnd) {
      this.fail(`${op.opcodeName(this.data[this.opPos]!)} reads past the end of its frame (byte ${this.frameEnd})`);
    }
  }

  private byte(): number {
    this.need(1);
    return this.data[this.pos++]!;
  }

  private bytes(n: number): Uint8Array {
    this.need(n);
    const b = this.data.subarray(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }

  private u16(): number {
    const b = this.bytes(2);
    return b[0]! | (b[1]! << 8);
  }

  private u32(): number {
    const b = this.bytes(4);
    return (b[0]! | (b[1]! << 8) | (b[2]! << 16)) + b[3]! * 0x1000000;
  }

  private i32(): number {
    const b = this.bytes(4);
    return b[0]! | (b[1]! << 8) | (b[2]! << 16) | (b[3]! << 24);
  }

  /** An 8-byte length; anything beyond the input fails as truncation. */
  private u64(): number {
    const b = this.bytes(8);
    const lo = (b[0]! | (b[1]! << 8) | (b[2]! << 16)) + b[3]! * 0x1000000;
    const hi = (b[4]! | (b[5]! << 8) | (b[6]! << 16)) + b[7]! * 0x1000000;
    return hi > 0x1fffff ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + lo;
  }

  /** A text line without its '\n'. */
  private line(): Uint8Array {
    const limit = this.frameEnd >= 0 && this.pos < this.frameEnd ? this.frameEnd : this.data.length;
    const nl = this.data.indexOf(0x0a, this.pos);
    if (nl < 0 || nl >= limit) {
      if (limit < this.data.length) this.fail(`${op.opcodeName(this.data[this.opPos]!)} reads past the end of its frame (byte ${limit})`);
      this.fail(`pickle ends early at byte ${this.data.length} (${op.opcodeName(this.data[this.opPos]!)} needs a line ending in '\\n')`);
    }
    const b = this.data.subarray(this.pos, nl);
    this.pos = nl + 1;
    return b;
  }

  private asciiLine(): string {
    return latin1(this.line());
  }

  // -------------------------------------------------------------------------------------------
  // Stack

  private get fence(): number {
    return this.marks.length ? this.marks[this.marks.length - 1]! : 0;
  }

  private push(v: PyValue): void {
    if (this.stack.length >= this.limits.stack) this.fail(`pickle stack grows beyond the limit of ${this.limits.stack} items`);
    this.stack.push(v);
  }

  private pop(): PyValue {
    if (this.stack.length <= this.fence) this.fail(`${op.opcodeName(this.data[this.opPos]!)} finds the stack empty (stack underflow)`);
    return this.stack.pop()!;
  }

  private top(): PyValue {
    if (this.stack.length <= this.fence) this.fail(`${op.opcodeName(this.data[this.opPos]!)} finds the stack empty (stack underflow)`);
    return this.stack[this.stack.length - 1]!;
  }

  private setTop(v: PyValue): void {
    this.stack[this.stack.length - 1] = v;
  }

  private popMark(): PyValue[] {
    if (!this.marks.length) this.fail(`${op.opcodeName(this.data[this.opPos]!)} without a MARK`);
    const m = this.marks.pop()!;
    this.spend(this.stack.length - m);
    return this.stack.splice(m);
  }

  private work = 0;

  /** Counts `n` units of work against `limits.work`. */
  private spend(n: number): void {
    this.work += n;
    if (this.work > this.limits.work) this.fail(`pickle needs more than ${this.limits.work} steps to load (the limit for its size); it is malformed or hostile`);
  }

  // -------------------------------------------------------------------------------------------
  // Memo

  private memoPut(index: number): void {
    if (!Number.isSafeInteger(index) || index < 0) this.fail(`negative memo index ${index}`);
    if (index >= this.limits.memo) this.fail(`memo index ${index} is beyond the limit of ${this.limits.memo} entries`);
    if (this.memo[index] === undefined) this.memoCount++;
    this.memo[index] = this.top();
  }

  private memoGet(index: number): void {
    const v = index >= 0 && index < this.limits.memo ? this.memo[index] : undefined;
    if (v === undefined) {
      this.fail(index >= this.limits.memo ? `memo index ${index} is beyond the limit of ${this.limits.memo} entries` : `memo has no entry ${index}`);
    }
    this.push(v);
  }

  private textIndex(): number {
    const s = this.asciiLine();
    if (!/^\s*[+-]?\d+\s*$/.test(s)) this.fail(`memo index ${JSON.stringify(s)} is not an integer`);
    const n = Number(s);
    if (n < 0) this.fail(`negative memo index ${n}`);
    return n;
  }

  // -------------------------------------------------------------------------------------------
  // Globals and calls

  private global(module: string, name: string): void {
    let mod = module;
    let nm = name;
    if (this.proto < 3) [mod, nm] = fixImports(module, name);
    const key = `${mod}.${nm}`;
    const written = mod !== module || nm !== name ? ` (written as ${module}.${name})` : '';
    const entry = isBlockedGlobal(mod, nm) ? undefined : this.table(key);
    if (!entry) {
      if (!isBlockedGlobal(mod, nm) && this.modules.has(mod)) {
        this.fail(`pickle calls a global that is not allowed (a look-alike of the allowed ${mod} names): ${key}${written}`, key);
      }
      this.fail(`pickle calls a global that is not allowed: ${key}${written}`, key);
    }
    let g = this.globals.get(key);
    if (!g) {
      g = new PyGlobal(mod, nm);
      this.globals.set(key, g);
    }
    this.push(entry.kind === 'value' ? this.guard(g, () => entry.make(g)) : g);
  }

  /** Runs a handler; its errors become UnpicklingErrors naming the global and the position. */
  private guard<T>(g: PyGlobal, f: () => T): T {
    try {
      return f();
    } catch (e) {
      if (e instanceof UnpicklingError) {
        if (e.pos !== undefined) throw e;
        this.fail(e.global ? e.reason : `${g.qualname}: ${e.reason}`, e.global ?? g.qualname, e);
      }
      this.fail(`${g.qualname}: ${(e as Error).message ?? String(e)}`, g.qualname, e);
    }
  }

  private entryOf(v: PyValue, what: string): [PyGlobal, AllowEntry] {
    if (!(v instanceof PyGlobal)) this.fail(`${what} ${describe(v)}, which is not an allowed global`);
    const entry = isBlockedGlobal(v.module, v.name) ? undefined : this.table(v.qualname);
    if (!entry) this.fail(`pickle calls a global that is not allowed: ${v.qualname}`, v.qualname);
    return [v, entry];
  }

  /** `func(*args)`. */
  private callGlobal(func: PyValue, args: PyValue[]): PyValue {
    const [g, entry] = this.entryOf(func, 'pickle calls');
    if (entry.kind === 'function') return this.guard(g, () => entry.call(args, this.ctx(g)));
    if (entry.kind === 'class' && entry.call) {
      const call = entry.call.bind(entry);
      return this.guard(g, () => call(args, this.ctx(g)));
    }
    this.fail(`pickle calls ${g.qualname}, which may not be called`, g.qualname);
  }

  /** `cls.__new__(cls, *args, **kwargs)`. */
  private newObject(cls: PyValue, args: PyValue[], kwargs: PyDict | null): PyValue {
    const [g, entry] = this.entryOf(cls, 'pickle creates an instance of');
    if (entry.kind !== 'class') this.fail(`pickle creates an instance of ${g.qualname}, which is not an allowed class`, g.qualname);
    if (entry.newObj) {
      const newObj = entry.newObj.bind(entry);
      return this.guard(g, () => newObj(args, kwargs, this.ctx(g)));
    }
    if (args.length || (kwargs && kwargs.size)) {
      this.fail(`${g.qualname}.__new__ takes no arguments, got ${describe(new PyTuple(args))}`, g.qualname);
    }
    return new PyObject(g.module, g.name);
  }

  /** INST and OBJ (protocols 0/1): `cls(*args)`, or `cls.__new__(cls)` when there are no arguments. */
  private instantiate(cls: PyValue, args: PyValue[]): PyValue {
    const [, entry] = this.entryOf(cls, 'pickle instantiates');
    if (args.length === 0 && entry.kind === 'class' && !entry.call) return this.newObject(cls, [], null);
    return this.callGlobal(cls, args);
  }

  private build(): void {
    const state = this.pop();
    const inst = this.top();
    if (state === null) return;
    if (inst instanceof PyObject) {
      const [g, entry] = this.entryOf(new PyGlobal(inst.module, inst.name), 'BUILD on');
      if (entry.kind !== 'class') this.fail(`BUILD on ${g.qualname}, which is not an allowed class`, g.qualname);
      const build = entry.build?.bind(entry);
      this.guard(g, () => (build ? build(inst, state, this.ctx(g)) : defaultBuild(inst, state)));
      return;
    }
    if (inst instanceof PyDict && state instanceof PyDict) {
      if (state.size === 0) return;
      // OrderedDict.__reduce__ passes the instance __dict__ as state (e.g. a state dict's
      // `_metadata`): attribute data, never code.
      if (inst.kind === 'OrderedDict' && state.entries.every(([k]) => typeof k === 'string')) {
        inst.attrs ??= new PyDict();
        for (const [k, v] of state.entries) inst.attrs.set(k, v);
        return;
      }
    }
    this.fail(`BUILD sets state ${describe(state)} on ${describe(inst)}, which is not an allowed object`);
  }

  private persistent(pid: PyValue): void {
    const load = this.opts.persistentLoad;
    if (!load) this.fail(`pickle refers to persistent id ${describe(pid)}, but no persistentLoad was given`);
    let v: PyValue;
    try {
      v = load(pid);
    } catch (e) {
      if (e instanceof UnpicklingError && e.pos !== undefined) throw e;
      const reason = e instanceof UnpicklingError ? e.reason : (e as Error).message ?? String(e);
      this.fail(`persistent id ${describe(pid)}: ${reason}`, undefined, e);
    }
    this.push(v);
  }

  // -------------------------------------------------------------------------------------------
  // The VM

  load(): PyValue {
    const data = this.data;
    for (;;) {
      if (this.frameEnd >= 0 && this.pos === this.frameEnd) this.frameEnd = -1;
      this.opPos = this.pos;
      if (this.pos >= data.length) this.fail(`pickle ends early at byte ${data.length} (no STOP opcode)`);
      const code = this.byte();
      this.spend(1);
      switch (code) {
        case op.PROTO: {
          const p = this.byte();
          if (p > op.HIGHEST_PROTOCOL) this.fail(`unsupported pickle protocol: ${p}`);
          this.proto = p;
          break;
        }
        case op.FRAME: {
          if (this.frameEnd >= 0) this.fail(`a new FRAME begins before the end of the current one (byte ${this.frameEnd})`);
          const n = this.u64();
          if (this.pos + n > data.length) this.fail(`pickle ends early at byte ${data.length} (FRAME declares ${n} bytes from byte ${this.pos})`);
          this.frameEnd = n > 0 ? this.pos + n : -1;
          break;
        }
        case op.STOP: {
          const result = this.pop();
          checkTree(result, this.limits, (reason) => this.fail(reason));
          return result;
        }

        // Stack and memo
        case op.MARK:
          if (this.marks.length >= this.limits.nesting) this.fail(`MARKs nest deeper than the limit of ${this.limits.nesting}`);
          this.marks.push(this.stack.length);
          break;
        case op.POP:
          if (this.stack.length > this.fence) this.stack.pop();
          else if (this.marks.length) this.marks.pop();
          else this.fail('POP finds the stack empty (stack underflow)');
          break;
        case op.POP_MARK:
          this.popMark();
          break;
        case op.DUP:
          this.push(this.top());
          break;
        case op.PUT:
          this.memoPut(this.textIndex());
          break;
        case op.BINPUT:
          this.memoPut(this.byte());
          break;
        case op.LONG_BINPUT:
          this.memoPut(this.u32());
          break;
        case op.MEMOIZE:
          this.memoPut(this.memoCount);
          break;
        case op.GET:
          this.memoGet(this.textIndex());
          break;
        case op.BINGET:
          this.memoGet(this.byte());
          break;
        case op.LONG_BINGET:
          this.memoGet(this.u32());
          break;

        // Scalars
        case op.NONE:
          this.push(null);
          break;
        case op.NEWTRUE:
          this.push(true);
          break;
        case op.NEWFALSE:
          this.push(false);
          break;
        case op.INT: {
          const s = this.asciiLine();
          if (s === '00') this.push(false);
          else if (s === '01') this.push(true);
          else this.push(this.parseInt(s));
          break;
        }
        case op.LONG: {
          const s = this.asciiLine();
          this.push(this.parseInt(s.endsWith('L') ? s.slice(0, -1) : s));
          break;
        }
        case op.BININT:
          this.push(this.i32());
          break;
        case op.BININT1:
          this.push(this.byte());
          break;
        case op.BININT2:
          this.push(this.u16());
          break;
        case op.LONG1:
          this.push(decodeLong(this.bytes(this.byte())));
          break;
        case op.LONG4: {
          const n = this.i32();
          if (n < 0) this.fail('LONG4 has a negative byte count');
          this.push(decodeLong(this.bytes(n)));
          break;
        }
        case op.FLOAT:
          this.push(new PyFloat(this.parseFloat(this.asciiLine())));
          break;
        case op.BINFLOAT: {
          const b = this.bytes(8);
          this.push(new PyFloat(new DataView(b.buffer, b.byteOffset, 8).getFloat64(0, false)));
          break;
        }

        // Strings and bytes
        case op.STRING: {
          const b = this.line();
          const end = b.length;
          const q = b[0];
          if (end < 2 || (q !== 0x22 && q !== 0x27) || b[end - 1] !== q) this.fail('the STRING opcode argument must be quoted');
          this.push(latin1(this.escapeDecode(b.subarray(1, end - 1))));
          break;
        }
        case op.BINSTRING: {
          const n = this.i32();
          if (n < 0) this.fail('BINSTRING has a negative byte count');
          this.push(latin1(this.bytes(n)));
          break;
        }
        case op.SHORT_BINSTRING:
          this.push(latin1(this.bytes(this.byte())));
          break;
        case op.UNICODE:
          this.push(this.rawUnicodeEscape(this.line()));
          break;
        case op.BINUNICODE:
          this.push(this.utf8(this.bytes(this.u32())));
          break;
        case op.SHORT_BINUNICODE:
          this.push(this.utf8(this.bytes(this.byte())));
          break;
        case op.BINUNICODE8:
          this.push(this.utf8(this.bytes(this.u64())));
          break;
        case op.BINBYTES:
          this.push(this.bytes(this.u32()).slice());
          break;
        case op.SHORT_BINBYTES:
          this.push(this.bytes(this.byte()).slice());
          break;
        case op.BINBYTES8:
          this.push(this.bytes(this.u64()).slice());
          break;
        case op.BYTEARRAY8:
          this.push(new PyByteArray(this.bytes(this.u64()).slice()));
          break;
        case op.NEXT_BUFFER:
          this.fail('pickle uses an out-of-band buffer (protocol 5 NEXT_BUFFER), which is not supported');
          break;
        case op.READONLY_BUFFER:
          this.fail('pickle uses an out-of-band buffer (protocol 5 READONLY_BUFFER), which is not supported');
          break;

        // Containers
        case op.EMPTY_TUPLE:
          this.push(new PyTuple([]));
          break;
        case op.TUPLE:
          this.push(new PyTuple(this.popMark()));
          break;
        case op.TUPLE1:
        case op.TUPLE2:
        case op.TUPLE3: {
          const n = code - op.TUPLE1 + 1;
          if (this.stack.length - n < this.fence) this.fail(`${op.opcodeName(code)} finds fewer than ${n} items on the stack (stack underflow)`);
          this.push(new PyTuple(this.stack.splice(this.stack.length - n)));
          break;
        }
        case op.EMPTY_LIST:
          this.push([]);
          break;
        case op.LIST:
          this.push(this.popMark());
          break;
        case op.APPEND: {
          const item = this.pop();
          const list = this.top();
          if (!Array.isArray(list)) this.fail(`APPEND to ${describe(list)}, which is not a list`);
          list.push(item);
          break;
        }
        case op.APPENDS: {
          const items = this.popMark();
          const list = this.top();
          if (!Array.isArray(list)) this.fail(`APPENDS to ${describe(list)}, which is not a list`);
          for (const x of items) list.push(x);
          break;
        }
        case op.EMPTY_DICT:
          this.push(new PyDict());
          break;
        case op.DICT: {
          const items = this.popMark();
          if (items.length % 2) this.fail('DICT has an odd number of items (a key without a value)');
          const d = new PyDict();
          for (let i = 0; i < items.length; i += 2) d.set(items[i]!, items[i + 1]!);
          this.push(d);
          break;
        }
        case op.SETITEM: {
          const value = this.pop();
          const key = this.pop();
          const d = this.top();
          if (!(d instanceof PyDict)) this.fail(`SETITEM on ${describe(d)}, which is not a dict`);
          d.set(key, value);
          break;
        }
        case op.SETITEMS: {
          const items = this.popMark();
          const d = this.top();
          if (!(d instanceof PyDict)) this.fail(`SETITEMS on ${describe(d)}, which is not a dict`);
          if (items.length % 2) this.fail('SETITEMS has an odd number of items (a key without a value)');
          for (let i = 0; i < items.length; i += 2) d.set(items[i]!, items[i + 1]!);
          break;
        }
        case op.EMPTY_SET:
          this.push(new PySet([], false));
          break;
        case op.ADDITEMS: {
          const items = this.popMark();
          const s = this.top();
          if (!(s instanceof PySet) || s.frozen) this.fail(`ADDITEMS on ${describe(s)}, which is not a set`);
          addToSet(s, items);
          break;
        }
        case op.FROZENSET:
          this.push(makeSet(this.popMark(), true));
          break;

        // Globals, calls, objects
        case op.GLOBAL: {
          const module = this.utf8(this.line());
          const name = this.utf8(this.line());
          this.global(module, name);
          break;
        }
        case op.STACK_GLOBAL: {
          const name = this.pop();
          const module = this.pop();
          if (typeof module !== 'string' || typeof name !== 'string') this.fail('STACK_GLOBAL needs a module and a name that are str');
          this.global(module, name);
          break;
        }
        case op.REDUCE: {
          const args = this.pop();
          const func = this.top();
          if (!(args instanceof PyTuple)) this.fail(`REDUCE arguments must be a tuple, got ${describe(args)}`);
          this.setTop(this.callGlobal(func, args.items));
          break;
        }
        case op.NEWOBJ: {
          const args = this.pop();
          const cls = this.top();
          if (!(args instanceof PyTuple)) this.fail(`NEWOBJ arguments must be a tuple, got ${describe(args)}`);
          this.setTop(this.newObject(cls, args.items, null));
          break;
        }
        case op.NEWOBJ_EX: {
          const kwargs = this.pop();
          const args = this.pop();
          const cls = this.top();
          if (!(args instanceof PyTuple)) this.fail(`NEWOBJ_EX arguments must be a tuple, got ${describe(args)}`);
          if (!(kwargs instanceof PyDict)) this.fail(`NEWOBJ_EX keyword arguments must be a dict, got ${describe(kwargs)}`);
          this.setTop(this.newObject(cls, args.items, kwargs));
          break;
        }
        case op.INST: {
          const module = this.utf8(this.line());
          const name = this.utf8(this.line());
          const args = this.popMark();
          this.global(module, name);
          this.setTop(this.instantiate(this.top(), args));
          break;
        }
        case op.OBJ: {
          const items = this.popMark();
          if (!items.length) this.fail('OBJ without a class');
          const cls = items.shift()!;
          this.push(this.instantiate(cls, items));
          break;
        }
        case op.BUILD:
          this.build();
          break;
        case op.PERSID:
          this.persistent(this.asciiLine());
          break;
        case op.BINPERSID:
          this.persistent(this.pop());
          break;
        case op.EXT1:
        case op.EXT2:
        case op.EXT4: {
          const n = code === op.EXT1 ? this.byte() : code === op.EXT2 ? this.u16() : this.i32();
          this.fail(`pickle uses extension code ${n} (${op.opcodeName(code)}, the copyreg extension registry), which is not supported`);
          break;
        }
        default:
          this.fail(`unknown opcode 0x${code.toString(16).padStart(2, '0')} (${JSON.stringify(String.fromCharCode(code))})`);
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // Text decoding

  /** Python's `int(text, 0)` (INT and LONG opcodes). */
  private parseInt(text: string): number | bigint {
    const m = /^([+-]?)(?:0([xXoObB])_?([0-9a-fA-F]+(?:_[0-9a-fA-F]+)*)|(\d+(?:_\d+)*))$/.exec(text.trim());
    if (!m) this.fail(`invalid int literal ${JSON.stringify(text)}`);
    const neg = m[1] === '-';
    let v: bigint;
    if (m[2] !== undefined) {
      const base = m[2].toLowerCase();
      const digits = m[3]!.replace(/_/g, '');
      const ok = base === 'x' ? /^[0-9a-fA-F]+$/ : base === 'o' ? /^[0-7]+$/ : /^[01]+$/;
      if (!ok.test(digits)) this.fail(`invalid int literal ${JSON.stringify(text)}`);
      v = BigInt(`0${base}${digits}`);
    } else {
      const digits = m[4]!.replace(/_/g, '');
      if (digits.length > 1 && digits[0] === '0' && !/^0+$/.test(digits)) this.fail(`invalid int literal ${JSON.stringify(text)} (leading zeros)`);
      if (digits.length > MAX_INT_DIGITS) this.fail(`int literal has more than ${MAX_INT_DIGITS} digits`);
      v = BigInt(digits);
    }
    return intValue(neg ? -v : v);
  }

  private parseFloat(text: string): number {
    const s = text.trim().replace(/_/g, '');
    const lower = s.toLowerCase();
    const sign = lower.startsWith('-') ? -1 : 1;
    const bare = lower.replace(/^[+-]/, '');
    if (bare === 'inf' || bare === 'infinity') return sign * Infinity;
    if (bare === 'nan') return NaN;
    if (!/^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(s)) this.fail(`invalid float literal ${JSON.stringify(text)}`);
    return Number(s);
  }

  private utf8(b: Uint8Array): string {
    let ascii = b.length < 64;
    if (ascii) for (let i = 0; i < b.length; i++) if (b[i]! >= 0x80) { ascii = false; break; }
    if (ascii) return String.fromCharCode(...b);
    try {
      return utf8.decode(b);
    } catch {
      const s = decodeUtf8SurrogatePass(b);
      if (s === undefined) this.fail('string is not valid UTF-8');
      return s;
    }
  }

  /** Python's `codecs.escape_decode` (the STRING opcode's repr-style escapes). */
  private escapeDecode(b: Uint8Array): Uint8Array {
    const out: number[] = [];
    for (let i = 0; i < b.length; i++) {
      const c = b[i]!;
      if (c !== 0x5c) {
        out.push(c);
        continue;
      }
      if (++i >= b.length) this.fail('STRING ends with a lone backslash');
      const e = b[i]!;
      const simple: Record<number, number> = { 0x5c: 0x5c, 0x27: 0x27, 0x22: 0x22, 0x61: 7, 0x62: 8, 0x66: 12, 0x6e: 10, 0x72: 13, 0x74: 9, 0x76: 11 };
      if (e === 0x0a) continue;
      if (simple[e] !== undefined) out.push(simple[e]);
      else if (e >= 0x30 && e <= 0x37) {
        let v = e - 0x30;
        for (let k = 0; k < 2 && i + 1 < b.length && b[i + 1]! >= 0x30 && b[i + 1]! <= 0x37; k++) v = v * 8 + (b[++i]! - 0x30);
        out.push(v & 0xff);
      } else if (e === 0x78) {
        const hex = latin1(b.subarray(i + 1, i + 3));
        if (!/^[0-9a-fA-F]{2}$/.test(hex)) this.fail('invalid \\x escape in STRING');
        out.push(parseInt(hex, 16));
        i += 2;
      } else out.push(0x5c, e);
    }
    return Uint8Array.from(out);
  }

  /** Python's `raw-unicode-escape` decoding (the UNICODE opcode). */
  private rawUnicodeEscape(b: Uint8Array): string {
    let s = '';
    let i = 0;
    while (i < b.length) {
      if (b[i] !== 0x5c) {
        s += String.fromCharCode(b[i++]!);
        continue;
      }
      const start = i;
      while (i < b.length && b[i] === 0x5c) i++;
      s += '\\'.repeat(i - start);
      const odd = (i - start) % 2 === 1;
      if (!odd || i >= b.length || (b[i] !== 0x75 && b[i] !== 0x55)) continue;
      const n = b[i] === 0x75 ? 4 : 8;
      const hex = latin1(b.subarray(i + 1, i + 1 + n));
      if (hex.length !== n || !/^[0-9a-fA-F]+$/.test(hex)) this.fail(`truncated \\${n === 4 ? 'u' : 'U'} escape in UNICODE`);
      const cp = parseInt(hex, 16);
      if (cp > 0x10ffff) this.fail('\\U escape beyond U+10FFFF in UNICODE');
      s = s.slice(0, -1) + (cp >= 0xd800 && cp <= 0xdfff ? String.fromCharCode(cp) : String.fromCodePoint(cp));
      i += 1 + n;
    }
    return s;
  }
}

function latin1(b: Uint8Array): string {
  let s = '';
  for (let i = 0; i < b.length; i += 8192) s += String.fromCharCode(...b.subarray(i, i + 8192));
  return s;
}

/** UTF-8 that may encode lone surrogates (Python's "surrogatepass"), or undefined if invalid. */
function decodeUtf8SurrogatePass(b: Uint8Array): string | undefined {
  const units: number[] = [];
  let s = '';
  for (let i = 0; i < b.length; ) {
    const c = b[i]!;
    let cp: number;
    let n: number;
    if (c < 0x80) [cp, n] = [c, 0];
    else if (c >= 0xc2 && c < 0xe0) [cp, n] = [c & 0x1f, 1];
    else if (c >= 0xe0 && c < 0xf0) [cp, n] = [c & 0x0f, 2];
    else if (c >= 0xf0 && c < 0xf5) [cp, n] = [c & 0x07, 3];
    else return undefined;
    if (i + n >= b.length + (n ? 0 : 1)) return undefined;
    for (let k = 1; k <= n; k++) {
      const x = b[i + k]!;
      if ((x & 0xc0) !== 0x80) return undefined;
      cp = (cp << 6) | (x & 0x3f);
    }
    if ((n === 2 && cp < 0x800) || (n === 3 && (cp < 0x10000 || cp > 0x10ffff))) return undefined;
    i += n + 1;
    if (cp >= 0x10000) units.push(0xd800 + ((cp - 0x10000) >> 10), 0xdc00 + ((cp - 0x10000) & 0x3ff));
    else units.push(cp);
    if (units.length >= 8192) s += String.fromCharCode(...units.splice(0));
  }
  return s + String.fromCharCode(...units);
}

/** Little-endian two's complement (LONG1/LONG4) → number when safe, else bigint. */
function decodeLong(b: Uint8Array): number | bigint {
  if (b.length === 0) return 0;
  if (b.length <= 6) {
    let v = 0;
    for (let i = b.length - 1; i >= 0; i--) v = v * 256 + b[i]!;
    if (b[b.length - 1]! & 0x80) v -= 2 ** (8 * b.length);
    return v;
  }
  let hex = '';
  for (let i = b.length - 1; i >= 0; i--) hex += b[i]!.toString(16).padStart(2, '0');
  let v = BigInt('0x' + hex);
  if (b[b.length - 1]! & 0x80) v -= 1n << BigInt(8 * b.length);
  return intValue(v);
}

function intValue(v: bigint): number | bigint {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

/** Children of a container (undefined for leaves). */
function childrenOf(v: PyValue): PyValue[] | undefined {
  if (v === null || typeof v !== 'object' || v instanceof Uint8Array) return undefined;
  if (Array.isArray(v)) return v;
  if (v instanceof PyTuple) return v.items;
  if (v instanceof PyDict) return v.entries.flat();
  if (v instanceof PySet) return v.items;
  if (v instanceof PyObject) return [v.state, ...v.args];
  if (v instanceof PySlice) return [v.start, v.stop, v.step];
  if (v instanceof TensorRef) return v.state === null ? undefined : [v.state];
  return undefined;
}

/**
 * Walks the result without recursion: refuses cycles, nesting beyond `limits.nesting` and trees
 * of more than `limits.nodes` containers (e.g. a chain of tuples each holding the previous one
 * twice), so that code walking the result recursively is safe.
 */
function checkTree(root: PyValue, limits: UnpickleLimits, fail: (reason: string) => never): void {
  const kids = childrenOf(root);
  if (!kids) return;
  const path = new Set<PyValue>([root]);
  const work: Array<{ node: PyValue; kids: PyValue[]; i: number }> = [{ node: root, kids, i: 0 }];
  let nodes = 1;
  while (work.length) {
    const top = work[work.length - 1]!;
    if (top.i >= top.kids.length) {
      path.delete(top.node);
      work.pop();
      continue;
    }
    const child = top.kids[top.i++]!;
    const ck = childrenOf(child);
    if (!ck) continue;
    if (path.has(child)) fail('pickle builds a cyclic structure (a container inside itself), which is not supported');
    if (work.length >= limits.nesting) fail(`pickle nests containers deeper than the limit of ${limits.nesting} levels`);
    if (++nodes > limits.nodes) fail(`pickle expands to more than ${limits.nodes} containers when walked (shared objects count once per reference)`);
    path.add(child);
    work.push({ node: child, kids: ck, i: 0 });
  }
}

// ---------------------------------------------------------------------------------------------

/**
 * JSON-friendly data for `inspect --json`: str/int/bool/None as themselves; float as a number
 * (`{"__float__": "nan"|"inf"|"-inf"}` when not finite); ints beyond 2^53 as `{"__int__": "…"}`;
 * tuples and lists as arrays; dicts with str keys as objects, other dicts as
 * `{"__dict__": [[k, v], …]}`; other types as a one-key object naming them (`__bytes__` hex,
 * `__set__`, `__frozenset__`, `__complex__`, `__slice__`, `__bytearray__`, `__global__`,
 * `__storage__`, `__tensor__`) and objects as `{"__class__": "module.Name", ...attributes}`
 * (plus `__args__` when made by a call, `__state__` when the state is not a dict).
 */
export function toPlain(v: PyValue): unknown {
  if (v === null || typeof v === 'boolean' || typeof v === 'string') return v;
  if (typeof v === 'number') return v;
  if (typeof v === 'bigint') return { __int__: v.toString() };
  if (v instanceof Uint8Array) return { __bytes__: hex(v) };
  if (v instanceof PyFloat) return Number.isFinite(v.value) ? v.value : { __float__: Number.isNaN(v.value) ? 'nan' : v.value > 0 ? 'inf' : '-inf' };
  if (v instanceof PyTuple || Array.isArray(v)) return (v instanceof PyTuple ? v.items : v).map(toPlain);
  if (v instanceof PyDict) {
    if (v.entries.every(([k]) => typeof k === 'string')) {
      const o: Record<string, unknown> = {};
      for (const [k, x] of v.entries) Object.defineProperty(o, k as string, { value: toPlain(x), enumerable: true, writable: true, configurable: true });
      return o;
    }
    return { __dict__: v.entries.map(([k, x]) => [toPlain(k), toPlain(x)]) };
  }
  if (v instanceof PySet) return { [v.frozen ? '__frozenset__' : '__set__']: v.items.map(toPlain) };
  if (v instanceof PyComplex) return { __complex__: [v.re, v.im] };
  if (v instanceof PySlice) return { __slice__: [toPlain(v.start), toPlain(v.stop), toPlain(v.step)] };
  if (v instanceof PyByteArray) return { __bytearray__: hex(v.bytes) };
  if (v instanceof PyGlobal) return { __global__: v.qualname };
  if (v instanceof StorageRef) return { __storage__: { key: v.key, dtype: v.dtype, location: v.location, numel: v.numel, untyped: v.untyped } };
  if (v instanceof TensorRef) {
    const t: Record<string, unknown> = {
      dtype: v.dtype, shape: [...v.shape], stride: [...v.stride], offset: v.storageOffset, storage: v.storage.key,
      requires_grad: v.requiresGrad, parameter: v.parameter,
    };
    if (v.state !== null) t.state = toPlain(v.state);
    return { __tensor__: t };
  }
  if (v instanceof PyObject) {
    const o: Record<string, unknown> = { __class__: v.qualname };
    if (v.args.length) o.__args__ = v.args.map(toPlain);
    if (v.state instanceof PyDict && v.state.entries.every(([k]) => typeof k === 'string')) {
      for (const [k, x] of v.state.entries) Object.defineProperty(o, k as string, { value: toPlain(x), enumerable: true, writable: true, configurable: true });
    } else {
      o.__state__ = toPlain(v.state);
    }
    return o;
  }
  return undefined;
}

function hex(b: Uint8Array): string {
  return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
}
