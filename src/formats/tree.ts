/**
 * Nested checkpoint values (dicts, lists, tuples) ↔ flat dotted names, as torch state dicts and
 * DCP's `flatten_state_dict` name them: `{"model": {"layer": [w]}}` → `model.layer.0`.
 */
import { PyDict, PyTuple, TensorRef, type PyValue } from '../pickle/values.js';
import { badInput } from '../util/errors.js';

export interface Leaf {
  readonly name: string;
  /** Path of keys from the root (strings for dict keys, numbers for list/tuple positions). */
  readonly path: ReadonlyArray<string | number>;
  readonly value: PyValue;
}

function isContainer(v: PyValue): v is PyDict | PyTuple | PyValue[] {
  return (v instanceof PyDict || v instanceof PyTuple || Array.isArray(v)) && containerSize(v) > 0;
}

function containerSize(v: PyDict | PyTuple | PyValue[]): number {
  return v instanceof PyDict ? v.size : v instanceof PyTuple ? v.items.length : v.length;
}

function keyText(k: PyValue): string | number | undefined {
  if (typeof k === 'string') return k;
  if (typeof k === 'number') return k;
  return undefined;
}

/** Leaves in order. A non-empty container is walked; anything else (including {}) is a leaf. */
export function flattenTree(root: PyValue): Leaf[] {
  const out: Leaf[] = [];
  const seen = new Set<string>();
  const walk = (v: PyValue, path: Array<string | number>): void => {
    if (!(v instanceof TensorRef) && isContainer(v)) {
      const seq: PyValue[] = v instanceof PyDict ? [] : Array.isArray(v) ? v : v.items;
      const items: Array<[PyValue, PyValue]> = v instanceof PyDict ? v.entries : seq.map((x, i): [PyValue, PyValue] => [i, x]);
      for (const [k, x] of items) {
        const kt = keyText(k);
        if (kt === undefined) {
          // Keys that are not names (tuples, objects): keep the container whole, as one leaf.
          out.push(leaf(v, path));
          return;
        }
        walk(x, [...path, kt]);
      }
      return;
    }
    out.push(leaf(v, path));
  };
  const leaf = (value: PyValue, path: Array<string | number>): Leaf => {
    const name = path.join('.');
    if (seen.has(name)) throw badInput(`two entries flatten to the same name ${JSON.stringify(name)}`, undefined, name);
    seen.add(name);
    return { name, path, value };
  };
  walk(root, []);
  return out;
}

/** Rebuilds `root` with each leaf replaced by `fn(name, leaf)`; containers keep their kind. */
export function mapTreeLeaves(root: PyValue, fn: (name: string, leaf: PyValue) => PyValue): PyValue {
  const walk = (v: PyValue, path: Array<string | number>): PyValue => {
    if (!(v instanceof TensorRef) && isContainer(v)) {
      if (v instanceof PyDict) {
        if (v.entries.some(([k]) => keyText(k) === undefined)) return fn(path.join('.'), v);
        const d = new PyDict(v.kind);
        d.attrs = v.attrs;
        for (const [k, x] of v.entries) d.set(k, walk(x, [...path, keyText(k)!]));
        return d;
      }
      if (Array.isArray(v)) return v.map((x, i) => walk(x, [...path, i]));
      return new PyTuple(v.items.map((x, i) => walk(x, [...path, i])));
    }
    return fn(path.join('.'), v);
  };
  return walk(root, []);
}
