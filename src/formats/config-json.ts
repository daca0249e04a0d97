/**
 * HF config.json text as transformers 5 reads it. Its configs are strict dataclasses: a float field
 * given an integer (`"swiglu_limit": 7` for 7.0, `"rms_norm_eps": 1`) is refused
 * ("expected float, got int"), and JavaScript numbers do not remember whether they were written
 * `7` or `7.0`. So a config shardshift only edits is edited as text (every other byte kept), and a
 * config it writes marks its float fields (`JsonFloat`).
 */

/** A number written with a decimal point even when it is integral. */
export class JsonFloat {
  constructor(readonly value: number) {}
}

// A private-use character JSON.stringify leaves as it is (it escapes control characters).
const MARK = '\uE000float:';

/** JSON text (two-space indent, as transformers writes) with `JsonFloat`s written as floats. */
export function configJson(value: unknown): string {
  const text = JSON.stringify(value, (_k, v: unknown) => (v instanceof JsonFloat ? `${MARK}${floatText(v.value)}` : v), 2);
  return text.replace(new RegExp(`"${MARK}([^"]*)"`, 'g'), '$1') + '\n';
}

function floatText(x: number): string {
  // Python's json writes (and reads) the non-finite floats as bare NaN / Infinity.
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'NaN' : x > 0 ? 'Infinity' : '-Infinity';
  const s = JSON.stringify(x);
  return /[.eE]/.test(s) ? s : `${s}.0`;
}

/**
 * `text` (a JSON object) without its top-level `key` — the rest byte for byte, the member's
 * separating comma removed with it. `text` unchanged when the key is absent.
 */
export function withoutTopLevelKey(text: string, key: string): string {
  // Members of the top-level object: [start of key string, end of value) and the comma after.
  let depth = 0;
  let i = 0;
  const members: Array<{ keyStart: number; valueEnd: number; name: string }> = [];
  let pending: { keyStart: number; name: string } | undefined;
  let afterColon = false;
  while (i < text.length) {
    const ch = text[i]!;
    if (ch === '"') {
      const start = i;
      i++;
      while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
      i++;
      if (depth === 1 && !afterColon) pending = { keyStart: start, name: JSON.parse(text.slice(start, i)) as string };
      continue;
    }
    if (ch === '{' || ch === '[') depth++;
    else if (ch === '}' || ch === ']') {
      if (depth === 1 && pending && afterColon) members.push({ keyStart: pending.keyStart, valueEnd: trimEnd(text, i), name: pending.name });
      depth--;
    } else if (depth === 1 && ch === ':') afterColon = true;
    else if (depth === 1 && ch === ',') {
      if (pending) members.push({ keyStart: pending.keyStart, valueEnd: trimEnd(text, i), name: pending.name });
      pending = undefined;
      afterColon = false;
    }
    i++;
  }
  const k = members.findIndex((m) => m.name === key);
  if (k < 0) return text;
  const m = members[k]!;
  if (k + 1 < members.length) return text.slice(0, m.keyStart) + text.slice(members[k + 1]!.keyStart);
  if (k > 0) return text.slice(0, members[k - 1]!.valueEnd) + text.slice(m.valueEnd);
  return text.slice(0, m.keyStart) + text.slice(m.valueEnd);
}

/** The position just after the last non-space character before `i`. */
function trimEnd(text: string, i: number): number {
  let j = i;
  while (j > 0 && /\s/.test(text[j - 1]!)) j--;
  return j;
}

/**
 * JSON text parsed with float lexemes (`7.0`, `1e-05`) kept as `JsonFloat`s, so that an edited
 * config written back by `configJson` says the same thing to transformers.
 */
export function parseConfigJson(text: string): unknown {
  let i = 0;
  const ws = (): void => {
    while (i < text.length && /\s/.test(text[i]!)) i++;
  };
  const fail = (what: string): never => {
    throw new SyntaxError(`${what} at position ${i}`);
  };
  const value = (): unknown => {
    ws();
    const ch = text[i];
    if (ch === '{') {
      i++;
      const o: Record<string, unknown> = {};
      ws();
      if (text[i] === '}') return i++, o;
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a key');
        const k = value() as string;
        ws();
        if (text[i++] !== ':') fail('expected ":"');
        o[k] = value();
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === '}') return i++, o;
        else fail('expected "," or "}"');
      }
    }
    if (ch === '[') {
      i++;
      const a: unknown[] = [];
      ws();
      if (text[i] === ']') return i++, a;
      for (;;) {
        a.push(value());
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === ']') return i++, a;
        else fail('expected "," or "]"');
      }
    }
    if (ch === '"') {
      const start = i++;
      while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
      i++;
      return JSON.parse(text.slice(start, i)) as string;
    }
    const m = /^(-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null|NaN|-?Infinity)/.exec(text.slice(i, i + 400));
    if (!m) return fail('unexpected character');
    i += m[0].length;
    if (m[0] === 'true') return true;
    if (m[0] === 'false') return false;
    if (m[0] === 'null') return null;
    const n = Number(m[0]);
    return m[2] !== undefined || m[3] !== undefined || !Number.isFinite(n) ? new JsonFloat(n) : n;
  };
  const v = value();
  ws();
  if (i !== text.length) fail('trailing text');
  return v;
}
