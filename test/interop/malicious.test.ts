/**
 * The malicious-pickle corpus is real: CPython's own pickle.loads runs every payload marked live
 * (each creates its sentinel file in a scratch directory), and the committed fixture is exactly
 * what the generator writes. test/unit/malicious.test.ts shows shardshift refusing them all.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot, runOracle } from '../helpers/oracle.js';

test('every live payload of the corpus runs under CPython pickle.loads; the fixture is what the generator writes', async () => {
  const committed = await readFile(join(repoRoot, 'test', 'fixtures', 'malicious.json'), 'utf8');
  const corpus = (JSON.parse(committed) as { pickles: Array<{ name: string; live: boolean }> }).pickles;
  const ran = JSON.parse(await runOracle('malicious_corpus.py', ['live'])) as Record<string, boolean>;
  const live = corpus.filter((p) => p.live).map((p) => p.name);
  assert.ok(live.length >= 15);
  assert.deepEqual(live.filter((n) => ran[n] !== true), [], 'payloads that did not run under CPython');
  const dir = await mkdtemp(join(tmpdir(), 'ss-corpus-'));
  try {
    await runOracle('malicious_corpus.py', ['write', join(dir, 'm.json')]);
    assert.equal(await readFile(join(dir, 'm.json'), 'utf8'), committed, 'regenerate with: python test/oracle/malicious_corpus.py write');
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
