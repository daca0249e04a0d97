/* global process */
// What every benchmark runner measures with: the bytes a tool wrote, an fsync of all of them (so
// every tool is timed to the same end point: its bytes on disk), and the median of runs.
import { closeSync, fsyncSync, mkdirSync, openSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';

export function dirBytes(p) {
  const st = statSync(p);
  if (!st.isDirectory()) return st.size;
  return readdirSync(p).reduce((s, n) => s + dirBytes(join(p, n)), 0);
}

/** fsyncs every file and directory under `p` (what a tool left in the page cache goes to disk). */
export function syncTree(p) {
  const st = statSync(p);
  if (st.isDirectory()) for (const n of readdirSync(p)) syncTree(join(p, n));
  const fd = openSync(p, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/**
 * Times each tool's `go(out)` run by run, interleaved (tool A, tool B, …, then again), each into a
 * fresh `work/out` and fsynced inside the timed region; fills `t.times` (seconds) and `t.written`.
 */
export async function runInterleaved(tools, { runs, work, log }) {
  for (let i = 0; i < runs; i++) {
    for (const t of tools) {
      rmSync(work, { recursive: true, force: true });
      mkdirSync(work, { recursive: true });
      const out = join(work, 'out');
      const t0 = process.hrtime.bigint();
      await t.go(out);
      syncTree(out);
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      t.times.push(s);
      t.written = dirBytes(out);
      log(`  ${t.label}: run ${i + 1}/${runs} ${s.toFixed(2)} s`);
    }
  }
  rmSync(work, { recursive: true, force: true });
}
