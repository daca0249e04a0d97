/**
 * The fuzz suite's short deterministic run (issue 16): every target, a fixed seed, a few hundred
 * structure-aware cases each; every input either parses or fails with a typed error (one
 * readable message), never an untyped exception. The long campaign, which also counts hangs,
 * memory and crashes, is `npm run fuzz -- --cases N` (scripts/fuzz.mjs).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { isTyped, TARGETS } from '../fuzz/targets.js';
import { harnessSkips } from '../fuzz/files.js';
import { ShardshiftError } from '../../src/util/errors.js';

const JS_ARTEFACTS = /\bundefined\b|\bNaN\b|\[object \w+\]/;

for (const t of TARGETS) {
  test(`fuzz: ${t.name} — 400 cases, typed errors only, none reading "undefined"`, async () => {
    let typed = 0;
    await fc.assert(
      fc.asyncProperty(t.input, async (b) => {
        try {
          await t.run(b);
        } catch (e) {
          if (!isTyped(e)) throw e;
          // A readable message: no JavaScript artefacts leaking from a missing field.
          assert.doesNotMatch((e as Error).message, JS_ARTEFACTS, 'a typed error message');
          typed++;
        }
      }),
      { seed: 20261202, numRuns: 400 },
    );
    assert.ok(typed > 0, 'the generator reaches the error paths');
    // File targets: nearly every edited checkpoint is built and reaches the reader.
    const skipped = [...harnessSkips.values()].reduce((a, b) => a + b, 0);
    harnessSkips.clear();
    assert.ok(skipped < 40, `${skipped} of 400 cases could not be built by the harness`);
  });
}

test('fuzz: an untyped exception is reported as a failure (the harness itself)', async () => {
  await assert.rejects(
    fc.assert(
      fc.asyncProperty(fc.constant(0), async () => {
        throw new TypeError('x.get is not a function');
      }),
      { numRuns: 1 },
    ),
  );
  assert.ok(isTyped(new ShardshiftError('BAD_INPUT', 'ok')));
});

// Inputs the campaign found (scripts/fuzz.mjs: target, seed, case), replayed as regressions.
const FINDINGS: Array<{ target: string; seed: number; caseIndex: number; was: string }> = [
  // A swapped subtree gave a row-parallel weight a 1-D shape: "shape [32, NaN] has more elements than can be counted exactly" (RangeError).
  { target: 'legacy Megatron rank file', seed: 7, caseIndex: 371, was: 'RangeError from a 1-D row-parallel weight' },
  // A .metadata whose storage entry names the empty relative path: the directory itself was opened and read (EISDIR).
  { target: 'DCP .metadata', seed: 20261202, caseIndex: 11588, was: 'EISDIR reading the checkpoint directory as a storage file' },
  { target: 'DCP .metadata', seed: 20261202, caseIndex: 48509, was: 'EISDIR reading the checkpoint directory as a storage file' },
];

for (const f of FINDINGS) {
  test(`fuzz finding: ${f.target}, seed ${f.seed} case ${f.caseIndex} (${f.was}) → a typed error`, async () => {
    const t = TARGETS.find((x) => x.name.startsWith(f.target))!;
    const [input] = fc.sample(t.input, { seed: f.seed + f.caseIndex, numRuns: 1 });
    await assert.rejects(t.run(input), (e: unknown) => isTyped(e) || (assert.fail(`untyped: ${String((e as Error)?.stack ?? e)}`), false));
  });
}

