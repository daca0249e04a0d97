/**
 * The published-checkpoint harness's tensor lists against transformers 5.24 itself: the committed
 * lists (test/published/tensors/*.json.gz, what the pure-TypeScript harness writes sparse
 * checkpoints from) are exactly what test/oracle/published_oracle.py derives from each published
 * config — save_pretrained's names, shapes and dtypes (fp32-kept modules included) plus the hub-only
 * tensors — and the layer-truncated copies the harness round-trips have exactly the names, shapes
 * and dtypes transformers gives the truncated config.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { pythonPath, repoRoot } from '../helpers/oracle.js';
import { configJson } from '../../src/formats/config-json.js';
import { layerCount, publishedConfig, publishedModels, publishedTensors, truncateConfig, truncatedLayers, truncateTensors, type TensorSpec } from '../helpers/published.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-published-oracle-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** Runs published_oracle.py names with `jobs` on stdin. */
function oracleNames(jobs: unknown[]): Promise<void> {
  return new Promise((res, rej) => {
    const p = spawn(pythonPath(), [join(repoRoot, 'test', 'oracle', 'published_oracle.py'), 'names'], { stdio: ['pipe', 'ignore', 'pipe'], env: { ...process.env, OMP_NUM_THREADS: '1' } });
    let err = '';
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('error', rej);
    p.on('close', (code) => (code === 0 ? res() : rej(new Error(`published_oracle.py names failed (${code}): ${err}`))));
    p.stdin.end(JSON.stringify(jobs));
  });
}

const key = (t: TensorSpec): string => `${t[0]} ${t[1]} [${t[2].join(',')}]`;

test('every committed tensor list, full and layer-truncated, is what transformers 5.24 derives from the published config', async (t) => {
  const models = await publishedModels();
  const jobs: Array<{ config: string; hub: unknown; out: string }> = [];
  for (const m of models) {
    const config = await publishedConfig(m);
    const cut = join(tmp, `${m.id}-cut.config.json`);
    await writeFile(cut, configJson(truncateConfig(config, truncatedLayers(config))));
    jobs.push({ config: join(repoRoot, 'test', 'published', 'configs', m.config), hub: m.hub, out: join(tmp, `${m.id}.json`) });
    jobs.push({ config: cut, hub: m.hub, out: join(tmp, `${m.id}-cut.json`) });
  }
  await oracleNames(jobs);
  for (const m of models) {
    const config = await publishedConfig(m);
    const committed = await publishedTensors(m);
    const full = (JSON.parse(await readFile(join(tmp, `${m.id}.json`), 'utf8')) as { tensors: TensorSpec[] }).tensors;
    assert.deepEqual(committed.map(key), full.map(key), `${m.id}: the committed list is stale (node scripts/published-tensors.mjs)`);
    const cut = (JSON.parse(await readFile(join(tmp, `${m.id}-cut.json`), 'utf8')) as { tensors: TensorSpec[] }).tensors;
    const layers = truncatedLayers(config);
    assert.deepEqual([...truncateTensors(committed, layers, layerCount(config)).map(key)].sort(), [...cut.map(key)].sort(), `${m.id}: the ${layers}-layer copy differs from transformers' names for the truncated config`);
    t.diagnostic(`${m.id}: ${committed.length} tensors; truncated to ${layers} layers: ${cut.length}`);
  }
});
