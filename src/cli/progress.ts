/**
 * The one-line progress display on a TTY (silent otherwise): what the run is doing from its first
 * moment (opening and planning before any byte moves), then percent, bytes, a smoothed rate and
 * an ETA as h:mm:ss, then the finishing phase (fsync, manifest, rename). Bytes kept from an
 * interrupted run count toward the percentage but never toward the rate or the ETA.
 */
import { formatBytes } from '../util/size.js';
import type { ProgressEvent } from '../exec/executor.js';
import type { CheckProgress } from '../plan/verify.js';
import type { WindowEvent } from '../hub/window.js';

/** Seconds as h:mm:ss (or m:ss under an hour). */
export function clock(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/**
 * Rate of the bytes written in this run (reused bytes excluded), smoothed: an exponential moving
 * average with a 3 s time constant over the samples, reported only once half a second of writing
 * has been seen (the first frames of a run otherwise show a rate off by orders of magnitude).
 */
export class RateMeter {
  private last?: { t: number; bytes: number };
  private first?: number;
  private avg = 0;

  constructor(private readonly tau = 3) {}

  /** Adds a sample (`bytes` written so far at `t` seconds); returns bytes/s, or undefined while unknown. */
  sample(t: number, bytes: number): number | undefined {
    if (!this.last) {
      this.last = { t, bytes };
      this.first = t;
      return undefined;
    }
    const dt = t - this.last.t;
    if (dt <= 0) return this.rate(t);
    const inst = (bytes - this.last.bytes) / dt;
    const w = 1 - Math.exp(-dt / this.tau);
    this.avg = this.avg === 0 ? inst : this.avg + w * (inst - this.avg);
    this.last = { t, bytes };
    return this.rate(t);
  }

  private rate(t: number): number | undefined {
    return this.first !== undefined && t - this.first >= 0.5 && this.avg > 0 ? this.avg : undefined;
  }
}

export interface ProgressDisplay {
  /** Says what the run is doing before bytes move (opening, planning). */
  status(text: string): void;
  update(e: ProgressEvent): void;
  /** A hub source's downloads, shown after the conversion's own progress. */
  source(e: WindowEvent): void;
  done(): void;
}

/** One line rewritten in place on a TTY, cut to the terminal's width. */
export function statusLine(stream: NodeJS.WriteStream): { show(text: string): void; clear(): void } {
  let shown = false;
  return {
    show: (text) => {
      const width = stream.columns && stream.columns > 20 ? stream.columns - 1 : 119;
      stream.write(`\r\x1b[K${text.length > width ? `${text.slice(0, width - 1)}…` : text}`);
      shown = true;
    },
    clear: () => {
      if (shown) stream.write('\r\x1b[K');
      shown = false;
    },
  };
}

export function progressPrinter(stream: NodeJS.WriteStream, now: () => number = () => performance.now() / 1000): ProgressDisplay | undefined {
  if (!stream.isTTY) return undefined;
  const meter = new RateMeter();
  const status = statusLine(stream);
  // The hub downloads in progress (streamed sources): appended to every frame.
  let fetched = 0;
  const downloading = new Set<string>();
  const suffix = (): string => (downloading.size ? `  ↓ ${[...downloading].join(', ')} (${formatBytes(fetched)} fetched)` : '');
  const line = (text: string): void => status.show(`${text}${suffix()}`);
  let lastText = '';
  return {
    status: (text) => {
      lastText = text;
      line(text);
    },
    source: (e) => {
      if (e.kind === 'bytes') fetched += e.n;
      else if (e.kind === 'download') downloading.add(e.file);
      else if (e.kind === 'downloaded') downloading.delete(e.file);
      if (e.kind !== 'bytes') line(lastText);
    },
    update: (e) => {
      const pct = e.bytesTotal ? ((100 * e.bytesDone) / e.bytesTotal).toFixed(1) : '100.0';
      if (e.phase === 'finishing') {
        lastText = `100.0%  ${formatBytes(e.bytesTotal)}  finishing: fsync, manifest, rename into place …`;
        line(lastText);
        return;
      }
      const rate = meter.sample(now(), e.bytesDone - e.bytesReused);
      const left = e.bytesTotal - e.bytesDone;
      const eta = rate ? clock(left / rate) : '-:--';
      const reused = e.bytesReused ? `  (${formatBytes(e.bytesReused)} kept from the interrupted run)` : '';
      lastText = `${pct}%  ${formatBytes(e.bytesDone)} / ${formatBytes(e.bytesTotal)}  ${rate ? `${formatBytes(rate)}/s` : '…/s'}  ETA ${eta}  ${e.file}${reused}`;
      line(lastText);
    },
    done: status.clear,
  };
}

/** The display of `verify` and `diff`: the stage, percent, bytes, rate and ETA, the file or tensor. */
export function checkPrinter(stream: NodeJS.WriteStream, now: () => number = () => performance.now() / 1000): { update: (e: CheckProgress) => void; done: () => void } | undefined {
  if (!stream.isTTY) return undefined;
  let meter = new RateMeter();
  let stage = '';
  const status = statusLine(stream);
  return {
    update: (e) => {
      if (e.stage !== stage) {
        stage = e.stage;
        meter = new RateMeter();
      }
      const rate = meter.sample(now(), e.bytesDone);
      const pct = e.bytesTotal ? ((100 * e.bytesDone) / e.bytesTotal).toFixed(1) : '100.0';
      status.show(`${e.stage}: ${pct}%  ${formatBytes(e.bytesDone)} / ${formatBytes(e.bytesTotal)}  ${rate ? `${formatBytes(rate)}/s` : '…/s'}  ETA ${rate ? clock((e.bytesTotal - e.bytesDone) / rate) : '-:--'}  ${e.item}`);
    },
    done: status.clear,
  };
}
