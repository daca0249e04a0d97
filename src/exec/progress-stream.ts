/**
 * Progress as an async iterator, for library callers: `track(run)` starts a run with an
 * `onProgress` that feeds a queue, and gives back the events (ended when the run settles) and
 * the run's result. The events are the ones the CLI's display and `--json` use (docs/json-events.md).
 */
import type { ProgressEvent } from './executor.js';

export interface Tracked<E, R> {
  /** Every event, in order; the iteration ends when the run has finished or failed. */
  readonly events: AsyncIterable<E>;
  /** The run's result (rejects with the run's error). */
  readonly result: Promise<R>;
}

/** `E` defaults to the conversions' events; pass `CheckProgress` for verify and diff. */
export function track<R, E = ProgressEvent>(run: (onProgress: (e: E) => void) => Promise<R>): Tracked<E, R> {
  const queue: E[] = [];
  let wake: (() => void) | undefined;
  let ended = false;
  const result = run((e) => {
    queue.push(e);
    wake?.();
  });
  void result.then(
    () => undefined,
    () => undefined,
  ).finally(() => {
    ended = true;
    wake?.();
  });
  async function* events(): AsyncGenerator<E> {
    for (;;) {
      while (queue.length) yield queue.shift()!;
      if (ended) return;
      await new Promise<void>((r) => (wake = r));
      wake = undefined;
    }
  }
  return { events: { [Symbol.asyncIterator]: events }, result };
}
