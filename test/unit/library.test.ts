/**
 * The library API (issue 21): every command's function is exported from the entry point,
 * progress comes as an async iterator (`track`), an AbortSignal stops a run leaving a resumable
 * partial (the same call resumes it to the bytes of an uninterrupted run), and errors are typed.
 * The examples of docs/library.md run from the packed package in package.test.ts.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { outputDigest } from '../helpers/tree.js';
import * as api from '../../src/index.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-lib-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('the entry point exports a function for every CLI command', () => {
  for (const name of ['inspectCheckpoint', 'convert', 'convertHfToMegatron', 'convertMegatronToHf', 'convertDcpToHf', 'mergeLora', 'mergeMbToHf', 'mergeMbToMegatron', 'exportMbAdapterToPeft', 'convertHfToNxd', 'convertNxdToHf', 'verifyOutput', 'verifyLogits', 'diffCheckpoints', 'runStep', 'listSteps', 'resolveModel', 'track'] as const) {
    assert.equal(typeof api[name], 'function', name);
  }
  assert.ok(api.listSteps().some((s) => s.name === 'convert/nxd'), 'every step is registered for library callers');
});

test('an AbortSignal stops a run between chunks: code ABORTED, finished files kept, the same call resumes to identical bytes', async () => {
  const many = (out: string, extra: Partial<api.ConvertOptions> = {}): Promise<api.ConvertResult> => api.convert(example, out, { to: 'safetensors', maxShardSize: 12_000, ...extra });
  const single = join(tmp, 'single');
  await many(single);
  const out = join(tmp, 'aborted');
  const ac = new AbortController();
  const files = new Set<string>();
  const err = await many(out, {
    signal: ac.signal,
    onProgress: (e) => {
      files.add(e.file);
      if (files.size === 3) ac.abort(new Error('enough'));
    },
  }).then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.ok(err instanceof api.ShardshiftError, String(err));
  assert.equal(err.code, 'ABORTED');
  assert.match(err.message, /finished files are kept in .*aborted\.partial; re-run the same command to resume/);
  assert.ok(!existsSync(out), 'nothing that looks finished');
  const kept = (await readdir(`${out}.partial`)).filter((n) => n.endsWith('.safetensors'));
  assert.ok(kept.length >= 1, `finished shards kept: ${kept.join(', ')}`);
  const tracked = api.track((onProgress) => many(out, { onProgress }));
  const events: api.ProgressEvent[] = [];
  for await (const e of tracked.events) events.push(e);
  const r = await tracked.result;
  assert.equal(r.outcome, 'written');
  assert.ok(events.at(-1)!.bytesReused > 0, 'the resumed run reports the bytes it kept');
  assert.equal(events.at(-1)!.phase, 'finishing');
  assert.deepEqual(await outputDigest(out), await outputDigest(single));
});

test('runStep takes overrides as an object; typed errors carry code and file', async () => {
  const { params, result } = await api.runStep('convert/hf_to_megatron', { hf_model_id: example, megatron_path: join(tmp, 'step-meg'), 'parallel.tp': 2 }, { config: 'default', dryRun: true });
  assert.equal(params['parallel.tp'], 2);
  assert.ok(!(result instanceof api.BatchRun) && result.outcome === 'dry-run');
  const bad = await api.runStep('convert/hf_to_megatron', { hf_model_id: example, nope: 1 }).catch((e: unknown) => e);
  assert.ok(bad instanceof api.ShardshiftError);
  assert.equal(bad.code, 'USAGE');
  const missing = await api.convertHfToMegatron(join(tmp, 'missing'), join(tmp, 'never')).catch((e: unknown) => e);
  assert.ok(missing instanceof api.ShardshiftError);
  assert.match(missing.message, /missing/);
});
