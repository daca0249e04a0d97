/**
 * `--json` progress: one JSON object per line on stderr, stdout keeping the final document. The
 * events (docs/json-events.md is their schema):
 *
 * - `{"event":"status","text":…}` — what the run is doing before bytes move (opening, planning);
 * - `{"event":"progress","phase":"writing"|"finishing","file":…,"bytesDone":…,"bytesTotal":…,
 *   "bytesReused":…,"filesReused":…,"rate":…|null,"etaSeconds":…|null}` — rate in bytes/s of the
 *   bytes written by this run (smoothed; null until known), reused bytes excluded;
 * - `{"event":"source","kind":"download"|"downloaded"|"evicted","file":…,"size":…,"again":…,
 *   "bytesFetched":…}` — a hub source's shards as they are downloaded, and deleted under --max-disk;
 * - `{"event":"done","outcome":"written"|"reused"|"dry-run","seconds":…,"bytesWritten":…,
 *   "bytesReused":…,"filesReused":…}` — last, once the output is in place.
 */
import type { ProgressEvent } from '../exec/executor.js';
import { RateMeter } from './progress.js';
import type { WindowEvent } from '../hub/window.js';

export interface JsonEvents {
  status(text: string): void;
  progress(e: ProgressEvent): void;
  source(e: WindowEvent): void;
  done(r: { outcome: string; seconds: number; bytesWritten: number }): void;
}

export function jsonEvents(stream: NodeJS.WritableStream, now: () => number = () => performance.now() / 1000): JsonEvents {
  const meter = new RateMeter();
  let last: ProgressEvent | undefined;
  let fetched = 0;
  const line = (o: Record<string, unknown>): void => void stream.write(JSON.stringify(o) + '\n');
  return {
    status: (text) => line({ event: 'status', text }),
    source: (e) => {
      if (e.kind === 'bytes') {
        fetched += e.n;
        return;
      }
      line({ event: 'source', kind: e.kind, file: e.file, size: e.size, ...(e.kind === 'download' ? { again: e.again } : {}), bytesFetched: fetched });
    },
    progress: (e) => {
      last = e;
      const rate = e.phase === 'writing' ? meter.sample(now(), e.bytesDone - e.bytesReused) : undefined;
      const eta = rate ? (e.bytesTotal - e.bytesDone) / rate : e.phase === 'finishing' ? 0 : undefined;
      line({ event: 'progress', phase: e.phase, file: e.file, bytesDone: e.bytesDone, bytesTotal: e.bytesTotal, bytesReused: e.bytesReused, filesReused: e.filesReused, rate: rate ?? null, etaSeconds: eta === undefined ? null : Math.round(eta) });
    },
    done: (r) => line({ event: 'done', outcome: r.outcome, seconds: r.seconds, bytesWritten: r.bytesWritten, bytesReused: last?.bytesReused ?? 0, filesReused: last?.filesReused ?? 0 }),
  };
}
