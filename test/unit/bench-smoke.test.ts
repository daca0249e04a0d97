/**
 * Smoke run of the benchmark runner (bench/run.mjs) on a tiny Llama-3-shaped checkpoint, one run
 * per tool, so the runner, the generator and the Python peers cannot rot. Benchmarks are not
 * tests: nothing here looks at a time. `sparse-70b` runs on a tiny sparse checkpoint here (holes in,
 * holes out). The peers run only when the oracle venv is available
 * (SHARDSHIFT_PYTHON, set by `npm test`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';

interface CaseResult {
  case: string;
  skipped?: string;
  tools: Array<{ label: string; times: number[]; written: number; rss?: number }>;
}

test('bench runner: every case runs on a tiny checkpoint and reports written bytes', { timeout: 600_000 }, async () => {
  const cache = await mkdtemp(join(tmpdir(), 'ss-bench-'));
  try {
    const json = join(cache, 'results.json');
    const withPeer = Boolean(process.env.SHARDSHIFT_PYTHON);
    const cases = ['hf-to-megatron', 'megatron-to-hf', 'dcp-to-hf', 'dcp-to-torch', 'hf-to-dcp', 'cast', 'reshard', 'lora', 'memory', 'sparse-70b'];
    const args = [join(repoRoot, 'bench', 'run.mjs'), ...cases, '--model', 'tiny', '--runs', '1', '--max-memory', '16MiB', '--json', json];
    if (!withPeer) args.push('--no-peer');
    const out = await new Promise<string>((res, rej) => {
      execFile(process.execPath, args, { env: { ...process.env, SHARDSHIFT_BENCH_CACHE: cache }, maxBuffer: 1 << 24 }, (err, stdout, stderr) =>
        err ? rej(new Error(`${err.message}\n${stderr}`)) : res(stdout),
      );
    });
    const results = JSON.parse(await readFile(json, 'utf8')) as CaseResult[];
    assert.deepEqual(results.map((r) => r.case), cases);
    for (const r of results) {
      // `lora` is skipped when this build has no merge-lora command.
      if (r.skipped) {
        assert.equal(r.case, 'lora', `${r.case} skipped: ${r.skipped}`);
        continue;
      }
      const ss = r.tools.find((t) => t.label === 'shardshift');
      assert.ok(ss, `${r.case}: a shardshift row`);
      assert.ok(ss.written > 2e6, `${r.case}: shardshift wrote ${ss.written} bytes`);
      assert.equal(ss.times.length, 1);
      if (r.case !== 'memory' && r.case !== 'sparse-70b') assert.ok(r.tools.some((t) => t.label.startsWith('cp -r')), `${r.case}: a cp baseline row`);
      if (withPeer && ['dcp-to-hf', 'dcp-to-torch', 'hf-to-dcp', 'cast', 'reshard', 'lora'].includes(r.case)) {
        assert.ok(r.tools.some((t) => t.label.startsWith('python')), `${r.case}: a Python peer row`);
      }
    }
    // One markdown table per case.
    assert.equal(out.match(/^### /gm)?.length, cases.length);
  } finally {
    await rm(cache, { recursive: true, force: true });
  }
});
