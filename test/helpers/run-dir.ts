/** A Megatron training run directory with several saves of the bundled example (iterations= tests). */
import assert from 'node:assert/strict';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { repoRoot } from './oracle.js';
import { runCli } from './cli.js';

/** `<tmp>/run` holding `iter_XXXXXXX` for each iteration (HF → Megatron of examples/tiny-llama, made in `<tmp>/m<i>`, left there emptied of it) and a tracker naming `latest`. */
export async function makeRunDir(tmp: string, iterations: readonly number[], latest: number): Promise<string> {
  const example = join(repoRoot, 'examples', 'tiny-llama');
  const run = join(tmp, 'run');
  await mkdir(run);
  for (const i of iterations) {
    const m = join(tmp, `m${i}`);
    const name = `iter_${String(i).padStart(7, '0')}`;
    assert.equal((await runCli(['convert', '--to', 'megatron', example, m, '--iteration', String(i), '-q'])).code, 0);
    await rename(join(m, name), join(run, name));
  }
  await writeFile(join(run, 'latest_checkpointed_iteration.txt'), String(latest));
  return run;
}
