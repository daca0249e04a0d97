/**
 * An exclusive lock on an output path for the whole run: `<out>.lock`, created with O_EXCL (never
 * through a link), holding the holder's pid, host and start time. Two runs into the same output
 * used to share one `.partial` and interleave their writes. A lock left by a killed run is stale
 * when its holder is on this host and no longer alive; it is then taken over. A lock held by a
 * live process, or by another host (a shared filesystem, where liveness cannot be checked), is
 * refused with the holder named.
 */
import { hostname } from 'node:os';
import { unlink } from 'node:fs/promises';
import { createExclusive } from './create.js';
import { usage } from '../util/errors.js';
import { readTextFile } from './file.js';

interface Holder {
  readonly pid: number;
  readonly host: string;
  readonly started: string;
}

export interface OutputLock {
  release(): Promise<void>;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function readHolder(path: string): Promise<Holder | undefined> {
  try {
    const h = JSON.parse(await readTextFile(path)) as Holder;
    return typeof h.pid === 'number' && typeof h.host === 'string' ? h : undefined;
  } catch {
    return undefined;
  }
}

/** Takes `<out>.lock`, or throws a usage error naming the run that holds it. */
export async function lockOutput(out: string): Promise<OutputLock> {
  const path = `${out}.lock`;
  const me: Holder = { pid: process.pid, host: hostname(), started: new Date().toISOString() };
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fh = await createExclusive(path);
      try {
        await fh.writeFile(JSON.stringify(me) + '\n');
        await fh.sync();
      } finally {
        await fh.close();
      }
      return {
        release: async () => {
          const h = await readHolder(path);
          if (h?.pid === me.pid && h.host === me.host) await unlink(path).catch(() => undefined);
        },
      };
    } catch (e) {
      if (attempt > 0 || !(e instanceof Error) || !/already exists/.test(e.message)) throw e;
      const h = await readHolder(path);
      if (h && h.host === me.host && !alive(h.pid)) {
        // Stale: its holder was killed. Take it over (a racing run fails its own exclusive create).
        await unlink(path).catch(() => undefined);
        continue;
      }
      const who = h ? `process ${h.pid} on ${h.host}, started ${h.started}` : 'an unreadable lock file';
      throw usage(`${out} is being written by another run (${who}); wait for it, or remove ${path} if that run is gone`);
    }
  }
  throw usage(`${out}: could not take ${path}`);
}
