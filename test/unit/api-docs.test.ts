/**
 * The API reference (issue 21) is generated from the TSDoc of the entry point by TypeDoc
 * (`npm run docs:api` writes docs/api/, with docs/library.md as its front page). This checks that
 * it builds without a warning (a broken `{@link}`, a missing entry point), writing nothing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';

test('TypeDoc builds the API reference from src/index.ts without warnings', { timeout: 300_000 }, async () => {
  const r = await new Promise<{ code: number; out: string }>((res) =>
    execFile(process.execPath, [join(repoRoot, 'node_modules', 'typedoc', 'bin', 'typedoc'), '--emit', 'none', '--treatWarningsAsErrors'], { cwd: repoRoot, encoding: 'utf8' }, (err, stdout, stderr) => res({ code: err ? 1 : 0, out: stdout + stderr })),
  );
  assert.equal(r.code, 0, r.out);
  assert.doesNotMatch(r.out, /\[(warning|error)\]/);
});
