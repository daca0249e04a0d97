// castBytes against real torch: every ordered pair of F32/F16/BF16/F8_E4M3/F8_E5M2, element by
// element, over all 16- and 8-bit patterns and ~1.8M f32 inputs (test/oracle/cast_tables.py).
// Also checks that the golden fixture the pure-TS unit test uses still matches this torch.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { castBytes, CASTABLE } from '../../src/tensor/cast.js';
import { itemSize, type DType } from '../../src/tensor/dtype.js';
import { repoRoot, runOracle } from '../helpers/oracle.js';

interface Manifest {
  torch: string;
  cpuCapability: string;
  inputs: Record<string, { file: string; count: number }>;
  outputs: Record<string, { file: string }>;
}

interface Golden {
  torch: string;
  inputs: Record<string, { count: number; sha256: string }>;
  outputs: Record<string, string>;
}

function hex(b: Uint8Array, i: number, size: number): string {
  let s = '';
  for (let k = size - 1; k >= 0; k--) s += b[i * size + k]!.toString(16).padStart(2, '0');
  return '0x' + s;
}

/** Element-by-element comparison; returns a readable report of the first differences, or ''. */
function diff(from: DType, to: DType, input: Uint8Array, want: Uint8Array, got: Uint8Array): string {
  const si = itemSize(from)!;
  const so = itemSize(to)!;
  const n = input.byteLength / si;
  let count = 0;
  const lines: string[] = [];
  for (let i = 0; i < n; i++) {
    let same = true;
    for (let k = 0; k < so; k++) if (want[i * so + k] !== got[i * so + k]) same = false;
    if (same) continue;
    count++;
    if (lines.length < 8) lines.push(`  [${i}] in ${hex(input, i, si)}: torch ${hex(want, i, so)}, castBytes ${hex(got, i, so)}`);
  }
  return count === 0 ? '' : `${from}->${to}: ${count} of ${n} elements differ; first:\n${lines.join('\n')}`;
}

test('castBytes matches torch for every pair, element by element', { timeout: 600_000 }, async () => {
  const dir = await mkdtemp(join(tmpdir(), 'shardshift-cast-'));
  try {
    const manifest = JSON.parse(await runOracle('cast_tables.py', ['dump', dir])) as Manifest;
    const golden = JSON.parse(await readFile(join(repoRoot, 'test', 'fixtures', 'cast-golden.json'), 'utf8')) as Golden;
    const inputs = new Map<string, Uint8Array>();
    for (const [d, info] of Object.entries(manifest.inputs)) {
      const b = new Uint8Array(await readFile(info.file));
      assert.equal(b.byteLength, info.count * itemSize(d as DType)!);
      inputs.set(d, b);
    }
    const failures: string[] = [];
    const stale: string[] = [];
    for (const from of CASTABLE) {
      const input = inputs.get(from);
      assert.ok(input, `oracle wrote no inputs for ${from}`);
      const inSha = createHash('sha256').update(input).digest('hex');
      if (golden.inputs[from]?.sha256 !== inSha) stale.push(`inputs ${from}`);
      for (const to of CASTABLE) {
        const key = `${from}->${to}`;
        const entry = manifest.outputs[key];
        assert.ok(entry, `oracle wrote no output for ${key}`);
        const want = new Uint8Array(await readFile(entry.file));
        const got = castBytes(input, from, to);
        assert.equal(got.byteLength, want.byteLength, `${key}: output length`);
        const report = diff(from, to, input, want, got);
        if (report) failures.push(report);
        if (golden.outputs[key] !== createHash('sha256').update(want).digest('hex')) stale.push(key);
      }
    }
    assert.equal(failures.length, 0, `castBytes differs from torch ${manifest.torch} (${manifest.cpuCapability}):\n${failures.join('\n')}`);
    assert.deepEqual(
      stale,
      [],
      `test/fixtures/cast-golden.json no longer matches torch ${manifest.torch} (${manifest.cpuCapability}) for ${stale.join(', ')}; ` +
        'regenerate it with `$(node scripts/oracle-venv.mjs) test/oracle/cast_tables.py golden --write`',
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
