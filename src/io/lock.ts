/**
 * An exclusive lock on an output path for the whole run: `<out>.lock`, holding the holder's pid, host and start time. Two runs into the same output
 * used to share one `.partial` and interleave their writes. A lock left by a killed run is stale
 * when its holder is on this host and no longer alive; it is then taken over. A lock held by a
 * live process, or by another host (a shared filesystem, where liveness cannot be checked), is
 * refused with the holder named.
 */
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { link, readdir, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { createExclusive } from './create.js';
import { ioError, isErrno, usage } from '../util/errors.js';
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

/** The temp name a lock is written under before it is linked into place. */
const tempName = (lock: string, pid: number): string => `${lock}.${pid}-${randomBytes(4).toString('hex')}.tmp`;

/** Temps of killed runs (this host, pid gone) beside `lock`: never a lock, only litter. */
async function removeDeadTemps(lock: string): Promise<void> {
  const base = basename(lock);
  const names = await readdir(dirname(lock)).catch(() => [] as string[]);
  for (const n of names) {
    const m = n.startsWith(`${base}.`) ? /^(\d+)-[0-9a-f]{8}\.tmp$/.exec(n.slice(base.length + 1)) : null;
    if (m && !alive(Number(m[1]))) await unlink(join(dirname(lock), n)).catch(() => undefined);
  }
}

/**
 * Takes `<out>.lock`, or throws a usage error naming the run that holds it. The lock is written
 * whole under a temp name and then linked into place (link fails if it exists, as O_EXCL does),
 * so a run killed at any moment leaves either no lock or a complete one — never an empty lock
 * that no later run could judge stale.
 */
export async function lockOutput(out: string): Promise<OutputLock> {
  const path = `${out}.lock`;
  const me: Holder = { pid: process.pid, host: hostname(), started: new Date().toISOString() };
  await removeDeadTemps(path);
  for (let attempt = 0; attempt < 2; attempt++) {
    const tmp = tempName(path, me.pid);
    const fh = await createExclusive(tmp);
    try {
      await fh.writeFile(JSON.stringify(me) + '\n');
      await fh.sync();
    } finally {
      await fh.close();
    }
    let taken = false;
    try {
      await link(tmp, path);
      taken = true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw isErrno(e) ? ioError(e, path) : e;
    } finally {
      await unlink(tmp).catch(() => undefined);
    }
    if (taken) {
      return {
        release: async () => {
          const h = await readHolder(path);
          if (h?.pid === me.pid && h.host === me.host) await unlink(path).catch(() => undefined);
        },
      };
    }
    if (attempt > 0) break;
    const h = await readHolder(path);
    if (h && h.host === me.host && !alive(h.pid)) {
      // Stale: its holder was killed. Take it over (a racing run's link fails).
      await unlink(path).catch(() => undefined);
      continue;
    }
    const who = h ? `process ${h.pid} on ${h.host}, started ${h.started}` : 'an unreadable lock file (not written by shardshift)';
    throw usage(`${out} is being written by another run (${who}); wait for it, or remove ${path} if that run is gone`);
  }
  throw usage(`${out}: could not take ${path}`);
}
