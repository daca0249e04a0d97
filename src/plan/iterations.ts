/**
 * Many saves of one training run (`<run>/iter_*`): which of them a batch conversion takes
 * (`iterations=all|latest|every:N|<list>`), and where each one's output goes. A run publishes
 * hundreds of iterations; converting "every 1000th" or "the three named ones" is one command.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { badInput, usage } from '../util/errors.js';
import { holdsCheckpoint, iterDirName, resolveIteration, TRACKER } from '../megatron/run-dir.js';
import { isFile } from '../megatron/run-dir.js';

export interface RunIteration {
  readonly iteration: number;
  /** `<run>/iter_XXXXXXX` */
  readonly dir: string;
  readonly name: string;
}

/** What `iterations=` says, parsed. */
export type IterationChoice =
  | { readonly kind: 'all' }
  | { readonly kind: 'latest' }
  | { readonly kind: 'every'; readonly step: number }
  | { readonly kind: 'list'; readonly iterations: readonly number[] };

export function parseIterations(spec: string): IterationChoice {
  const s = spec.trim();
  if (s === 'all') return { kind: 'all' };
  if (s === 'latest') return { kind: 'latest' };
  const every = /^every:(\d+)$/.exec(s);
  if (every) {
    const step = Number(every[1]);
    if (step < 1) throw usage(`iterations=${spec}: every:N needs N ≥ 1`);
    return { kind: 'every', step };
  }
  const items = s.split(',').map((x) => x.trim());
  if (items.length && items.every((x) => /^(iter_)?\d+$/.test(x))) return { kind: 'list', iterations: [...new Set(items.map((x) => Number(x.replace(/^iter_/, ''))))] };
  throw usage(`iterations=${spec}: expected all, latest, every:N (iterations divisible by N) or a comma-separated list such as 1000,2000 (or iter_0001000)`);
}

/** The run's iteration directories that hold a checkpoint, by iteration. */
export async function runIterations(runDir: string): Promise<RunIteration[]> {
  const names = await readdir(runDir).catch((e: NodeJS.ErrnoException) => {
    throw badInput(`${runDir}: cannot list the run directory (${e.code ?? e.message})`, runDir);
  });
  const out: RunIteration[] = [];
  for (const name of names) {
    const m = /^iter_(\d{7,})$/.exec(name);
    if (m && (await holdsCheckpoint(join(runDir, name)))) out.push({ iteration: Number(m[1]), dir: join(runDir, name), name });
  }
  return out.sort((a, b) => a.iteration - b.iteration);
}

/** The iterations `choice` takes from the run directory; a named one that is missing is an error naming it. */
export async function selectIterations(runDir: string, choice: IterationChoice): Promise<RunIteration[]> {
  const all = await runIterations(runDir);
  if (!all.length) throw badInput(`${runDir}: iterations= needs a run directory holding iter_* checkpoints, and this one holds none`, runDir);
  switch (choice.kind) {
    case 'all':
      return all;
    case 'latest': {
      // The tracker names the latest save a run finished; without one, the highest iteration.
      if (await isFile(join(runDir, TRACKER))) {
        const r = await resolveIteration(runDir);
        const hit = all.find((i) => i.dir === r.iterDir);
        if (hit) return [hit];
      }
      return [all.at(-1)!];
    }
    case 'every': {
      const hits = all.filter((i) => i.iteration % choice.step === 0);
      if (!hits.length) throw usage(`iterations=every:${choice.step}: none of ${runDir}'s iterations (${all.map((i) => i.iteration).join(', ')}) is a multiple of ${choice.step}`);
      return hits;
    }
    case 'list': {
      const missing = choice.iterations.filter((n) => !all.some((i) => i.iteration === n));
      if (missing.length) throw usage(`iterations=: ${runDir} has no ${missing.map((n) => iterDirName(n)).join(', ')} (it has ${all.map((i) => i.name).join(', ')})`);
      return all.filter((i) => choice.iterations.includes(i.iteration));
    }
  }
}
