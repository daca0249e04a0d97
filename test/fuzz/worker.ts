/**
 * Runs fuzz cases for scripts/fuzz.mjs in a worker thread: cases `from … from+count` of one
 * target, generated deterministically from (seed, case index); after each case it reports the
 * outcome and its RSS, so the parent can tell a hang (no report within the time limit) or a crash
 * (the worker dies) from a result.
 */
import { parentPort, workerData } from 'node:worker_threads';
import fc from 'fast-check';
import { isTyped, TARGETS } from './targets.js';

const { target, seed, from, count } = workerData as { target: number; seed: number; from: number; count: number };
const t = TARGETS[target]!;
for (let i = from; i < from + count; i++) {
  const [input] = fc.sample(t.input, { seed: seed + i, numRuns: 1 });
  parentPort!.postMessage({ type: 'start', i });
  let outcome: 'ok' | 'typed' | 'untyped' = 'ok';
  let message = '';
  try {
    await t.run(input!);
  } catch (e) {
    outcome = isTyped(e) ? 'typed' : 'untyped';
    message = outcome === 'untyped' ? String((e as Error)?.stack ?? e).slice(0, 400) : '';
  }
  parentPort!.postMessage({ type: 'done', i, outcome, message, rss: process.memoryUsage().rss });
}
