// What every benchmark runner measures with: the bytes a tool wrote, an fsync of all of them (so
// every tool is timed to the same end point: its bytes on disk), and the median of runs.
import { closeSync, fsyncSync, openSync, readdirSync, statSync } from 'node:fs';
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
