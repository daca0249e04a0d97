/**
 * loadTokenizer against transformers: a tiny Llama-3-shaped byte-level BPE (test/fixtures/
 * tokenizer/, made with its golden ids by make_fixture.py) encodes as transformers'
 * `tokenizer(text)` does, BOS included, decodes back to the text, and reads tokenizer_config.json
 * as transformers 5 does; a directory without tokenizer.json has none, a malformed one is named.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadTokenizer } from '../../src/forward/tokenizer.js';
import { ShardshiftError } from '../../src/util/errors.js';
import { repoRoot } from '../helpers/oracle.js';

interface Golden {
  vocabSize: number;
  bosId: number;
  eosId: number;
  strings: string[];
  ids: number[][];
  variants: { overrides: Record<string, unknown>; ids: number[][]; bosId: number; eosId: number }[];
}

const fixture = join(repoRoot, 'test', 'fixtures', 'tokenizer');
let golden: Golden;
let tmp: string;
before(async () => {
  golden = JSON.parse(await readFile(join(fixture, 'golden.json'), 'utf8')) as Golden;
  tmp = await mkdtemp(join(tmpdir(), 'ss-tokenizer-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('encode gives transformers’ ids (BOS from the post-processor) and decode gives the text back', async () => {
  const tok = await loadTokenizer(fixture);
  assert.ok(tok);
  assert.equal(tok.source, join(fixture, 'tokenizer.json'));
  assert.equal(tok.vocabSize, golden.vocabSize);
  assert.equal(tok.bosId, golden.bosId);
  assert.equal(tok.eosId, golden.eosId);
  golden.strings.forEach((s, i) => {
    const ids = tok.encode(s);
    assert.deepEqual(ids, golden.ids[i], `ids of ${JSON.stringify(s)}`);
    assert.equal(ids[0], golden.bosId);
    assert.equal(tok.decode(ids), s);
  });
  assert.equal(tok.decode([]), '');
});

test('tokenizer_config.json: add_bos/eos_token yield to tokenizer.json, bos/eos tokens are read', async () => {
  const config = JSON.parse(await readFile(join(fixture, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  for (const [n, v] of golden.variants.entries()) {
    const dir = join(tmp, `variant-${n}`);
    await mkdir(dir);
    await copyFile(join(fixture, 'tokenizer.json'), join(dir, 'tokenizer.json'));
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...config, ...v.overrides }));
    const tok = await loadTokenizer(dir);
    assert.ok(tok);
    assert.deepEqual(golden.strings.map((s) => tok.encode(s)), v.ids, JSON.stringify(v.overrides));
    assert.equal(tok.bosId, v.bosId);
    assert.equal(tok.eosId, v.eosId);
  }
  // No tokenizer_config.json at all: the same ids, no bos/eos named.
  const bare = join(tmp, 'bare');
  await mkdir(bare);
  await copyFile(join(fixture, 'tokenizer.json'), join(bare, 'tokenizer.json'));
  const tok = await loadTokenizer(bare);
  assert.ok(tok);
  assert.deepEqual(golden.strings.map((s) => tok.encode(s)), golden.ids);
  assert.equal(tok.bosId, undefined);
});

test('a directory without tokenizer.json has no tokenizer', async () => {
  const dir = join(tmp, 'empty');
  await mkdir(dir);
  await writeFile(join(dir, 'tokenizer_config.json'), '{"bos_token": "<s>"}');
  assert.equal(await loadTokenizer(dir), undefined);
});

test('a malformed tokenizer.json or tokenizer_config.json is a BAD_INPUT error naming the file', async () => {
  const cases: [string, string, string, RegExp][] = [
    ['truncated', 'tokenizer.json', '{"model": {"type": "BPE", "vocab"', /not valid JSON/],
    ['array', 'tokenizer.json', '[1, 2]', /expected a JSON object/],
    ['no-model', 'tokenizer.json', '{"added_tokens": []}', /no tokenizer model/],
    ['bad-model', 'tokenizer.json', '{"model": {"type": "Nonsense"}, "added_tokens": []}', /cannot build the tokenizer/],
    ['bad-config', 'tokenizer_config.json', '{"bos_token": ', /not valid JSON/],
  ];
  for (const [name, file, text, message] of cases) {
    const dir = join(tmp, name);
    await mkdir(dir);
    if (file !== 'tokenizer.json') await copyFile(join(fixture, 'tokenizer.json'), join(dir, 'tokenizer.json'));
    await writeFile(join(dir, file), text);
    const path = join(dir, file);
    await assert.rejects(loadTokenizer(dir), (e: unknown) => {
      assert.ok(e instanceof ShardshiftError, String(e));
      assert.equal(e.code, 'BAD_INPUT');
      assert.equal(e.file, path);
      assert.ok(e.message.includes(path), e.message);
      assert.match(e.message, message);
      return true;
    });
  }
});
