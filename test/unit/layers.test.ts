/**
 * The layering is enforced, not just drawn (issue 15): the dependency rules of
 * .dependency-cruiser.cjs pass on src/ as it is, and fail on a tree with an upward import, a
 * sideways import between floors of the same height, an import circle inside one floor, a
 * folder that is no floor, or a module outside every folder.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtemp, mkdir, rm, writeFile, copyFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';

const depcruise = join(repoRoot, 'node_modules', 'dependency-cruiser', 'bin', 'dependency-cruise.mjs');

function cruise(cwd: string): { code: number | null; out: string } {
  const r = spawnSync(process.execPath, [depcruise, 'src', '--config', '.dependency-cruiser.cjs', '--output-type', 'err'], { cwd, encoding: 'utf8' });
  return { code: r.status, out: r.stdout + r.stderr };
}

test('src/ keeps its floors: no upward import, no circle', () => {
  const r = cruise(repoRoot);
  assert.equal(r.code, 0, r.out);
});

async function tree(files: Record<string, string>): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'ss-layers-'));
  await copyFile(join(repoRoot, '.dependency-cruiser.cjs'), join(dir, '.dependency-cruiser.cjs'));
  await writeFile(join(dir, 'tsconfig.json'), JSON.stringify({ compilerOptions: { module: 'NodeNext', moduleResolution: 'NodeNext', strict: true } }));
  for (const [p, text] of Object.entries(files)) {
    await mkdir(dirname(join(dir, p)), { recursive: true });
    await writeFile(join(dir, p), text);
  }
  return dir;
}

for (const [what, files, rule] of [
  ['an upward import (tensor → plan)', { 'src/tensor/a.ts': "import { b } from '../plan/b.js';\nexport const a = b;\n", 'src/plan/b.ts': 'export const b = 1;\n' }, /tensor-imports-only-down/],
  ['a sideways import (pickle → hub, the same floor)', { 'src/pickle/a.ts': "import { b } from '../hub/b.js';\nexport const a = b;\n", 'src/hub/b.ts': 'export const b = 1;\n' }, /pickle-imports-only-down/],
  ['a circle inside a floor', { 'src/models/a.ts': "import { b } from './b.js';\nexport const a = () => b;\n", 'src/models/b.ts': "import { a } from './a.js';\nexport const b = () => a;\n" }, /no-circular/],
  ['a type-only upward import', { 'src/formats/a.ts': "import type { B } from '../plan/b.js';\nexport const a: B = 1;\n", 'src/plan/b.ts': 'export type B = number;\n' }, /formats-imports-only-down/],
  ['a folder that is not a floor', { 'src/extras/a.ts': "import { b } from '../util/b.js';\nexport const a = b;\n", 'src/util/b.ts': 'export const b = 1;\n' }, /no-unknown-floor/],
  ['a module outside every floor', { 'src/loose.ts': "import { b } from './util/b.js';\nexport const a = b;\n", 'src/util/b.ts': 'export const b = 1;\n' }, /no-root-modules/],
] as const) {
  test(`the layer check fails on ${what}`, async () => {
    const dir = await tree(files);
    try {
      const r = cruise(dir);
      assert.notEqual(r.code, 0, r.out);
      assert.match(r.out, rule);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
}
