/**
 * Access to the Python oracle (real torch, safetensors, ...) for interop tests.
 * `npm test` (scripts/test.mjs) creates the venv and sets SHARDSHIFT_PYTHON; an interop test run
 * without it fails loudly rather than skipping.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const pexec = promisify(execFile);

/** Repository root (tests run from dist/test/..., sources live in test/oracle/*.py). */
export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

export function pythonPath(): string {
  const p = process.env.SHARDSHIFT_PYTHON;
  if (!p) throw new Error('SHARDSHIFT_PYTHON is not set: run the interop tests through `npm test`');
  return p;
}

/** Runs test/oracle/<script> with the oracle's python; returns stdout. Throws with stderr on failure. */
export async function runOracle(script: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<string> {
  try {
    const { stdout } = await pexec(pythonPath(), [join(repoRoot, 'test', 'oracle', script), ...args], {
      maxBuffer: 64 * 1024 * 1024,
      timeout: opts.timeoutMs ?? 300_000,
      env: { ...process.env, PYTHONHASHSEED: '0', OMP_NUM_THREADS: '1' },
    });
    return stdout;
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new Error(`oracle ${script} ${args.join(' ')} failed: ${err.stderr || err.message}`, { cause: e });
  }
}
