/**
 * Issue 16, defects 2 and 3: hostile pickles cost time linear in their size. Before the fixes,
 * the error text of a 6 KB tuple-of-tuples pickle was built in cubic time (minutes, GBs), and a
 * pickle of one-item ADDITEMS rebuilt the set's duplicate index each time (quadratic). The VM
 * also has a total-work bound now.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { unpickle } from '../../src/pickle/index.js';
import { describe, PyTuple } from '../../src/pickle/values.js';

const PROTO2 = [0x80, 2];
const MARK = 0x28;
const TUPLE = 0x74;
const BININT1 = 0x4b;
const BININT = 0x4a;
const BINPUT = 0x71;
const BINGET = 0x68;
const SETITEMS = 0x75;
const EMPTY_SET = 0x8f;
const ADDITEMS = 0x90;
const STOP = 0x2e;
const u32 = (n: number): number[] => [n & 255, (n >>> 8) & 255, (n >>> 16) & 255, (n >>> 24) & 255];

/** (((0, 1, …) × n) × n) × n, each level one memoised tuple referenced n times: ~8n bytes. */
function cubePickle(n: number): number[] {
  const b = [...PROTO2, MARK];
  for (let i = 0; i < n; i++) b.push(BININT1, i & 255);
  b.push(TUPLE, BINPUT, 0);
  for (let level = 1; level <= 3; level++) {
    b.push(MARK);
    for (let i = 0; i < n; i++) b.push(BINGET, level - 1);
    b.push(TUPLE, BINPUT, level);
  }
  return b;
}

test('the error text of a tuple of tuples of tuples is short and cheap (it was cubic)', () => {
  // SETITEMS on the tuple: the error describes it.
  const data = Uint8Array.from([...cubePickle(1000), MARK, BININT1, 1, BININT1, 2, SETITEMS, STOP]);
  assert.ok(data.length < 9_000);
  const t0 = process.hrtime.bigint();
  assert.throws(
    () => unpickle(data, {}),
    (e: Error) => {
      assert.match(e.message, /^SETITEMS on \(\(\(…, …, …, …, …, …, …, …, … \(1000 items\)\), .* which is not a dict/);
      assert.ok(e.message.length < 600, `message of ${e.message.length} chars`);
      return true;
    },
  );
  // A hang guard, not a speed test: the old rendering took minutes.
  assert.ok(Number(process.hrtime.bigint() - t0) / 1e9 < 5);
});

test('describe() is bounded for any value: items, depth, strings, big ints, total length', () => {
  const wide = new PyTuple(Array.from({ length: 10_000 }, (_, i) => 'x'.repeat(i % 200)));
  const s = describe(new PyTuple([wide, wide, wide]));
  assert.ok(s.length <= 401, `${s.length} chars`);
  assert.match(describe(2n ** 100_000n), /^int\(100\d\d\d bits\)$/);
  assert.match(describe('y'.repeat(10_000)), /… \(10000 chars\)$/);
});

test('one-item ADDITEMS, 40,000 times, loads in linear time (each used to rebuild the set index)', () => {
  const n = 40_000;
  const b = [...PROTO2, EMPTY_SET];
  for (let i = 0; i < n; i++) b.push(MARK, BININT, ...u32(i), ADDITEMS);
  // … and duplicates are still dropped.
  b.push(MARK, BININT, ...u32(7), BININT, ...u32(n + 1), ADDITEMS, STOP);
  const t0 = process.hrtime.bigint();
  const s = unpickle(Uint8Array.from(b), {}) as { items: unknown[] };
  assert.equal(s.items.length, n + 1);
  assert.ok(Number(process.hrtime.bigint() - t0) / 1e9 < 5, 'hang guard');
});

test('the VM refuses a pickle whose work exceeds its bound, with a clear message', () => {
  const b = [...PROTO2, MARK];
  for (let i = 0; i < 500; i++) b.push(BININT1, 1);
  b.push(TUPLE, STOP);
  assert.throws(() => unpickle(Uint8Array.from(b), { limits: { work: 300 } }), /needs more than 300 steps to load/);
  assert.ok(unpickle(Uint8Array.from(b), {}) instanceof PyTuple);
});
