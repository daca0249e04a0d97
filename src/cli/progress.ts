/** A one-line progress display on a TTY (bytes, rate, ETA, current file); silent otherwise. */
import { formatBytes } from '../util/size.js';
import type { ProgressEvent } from '../exec/executor.js';

export function progressPrinter(stream: NodeJS.WriteStream): { update: (e: ProgressEvent) => void; done: () => void } | undefined {
  if (!stream.isTTY) return undefined;
  const t0 = Date.now();
  let shown = false;
  return {
    update: (e) => {
      const s = (Date.now() - t0) / 1000;
      const rate = s > 0 ? e.bytesDone / s : 0;
      const eta = rate > 0 ? (e.bytesTotal - e.bytesDone) / rate : 0;
      const pct = e.bytesTotal ? ((100 * e.bytesDone) / e.bytesTotal).toFixed(1) : '100';
      stream.write(`\r\x1b[K${pct}%  ${formatBytes(e.bytesDone)} / ${formatBytes(e.bytesTotal)}  ${formatBytes(rate)}/s  ETA ${eta.toFixed(0)}s  ${e.file}`);
      shown = true;
    },
    done: () => {
      if (shown) stream.write('\r\x1b[K');
    },
  };
}
