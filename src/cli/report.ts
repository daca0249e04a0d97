/**
 * What a writing command shows while and after it runs, in one place for every command: the TTY
 * display or `--json` events, the opening status, the note that a run resumed (and what it kept),
 * the note that a dry run would resume a partial output, and the message of an interrupt.
 */
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { ProgressEvent } from '../exec/executor.js';
import { activeOutputs } from '../exec/output.js';
import { PROGRESS_NAME } from '../exec/manifest.js';
import { formatBytes } from '../util/size.js';
import { progressPrinter } from './progress.js';
import type { WindowEvent } from '../hub/window.js';
import { jsonEvents } from './events.js';
import type { ConvertResult } from '../plan/convert.js';

export interface Reporter {
  readonly onProgress: (e: ProgressEvent) => void;
  /** What the run is doing before bytes move. */
  status(text: string): void;
  /** A hub source's shard downloads (streamed conversions). */
  readonly source: (e: WindowEvent) => void;
  /**
   * Awaits the run: on success clears the display, ends the JSON events and says whether it
   * resumed; on failure clears the display (the error follows on its own line).
   */
  watch(run: Promise<ConvertResult>): Promise<ConvertResult>;
  /** Awaits a run that may not be one conversion (a batch): clears the display, nothing more. */
  settle<T>(run: Promise<T>): Promise<T>;
}

export function reporter(f: { quiet?: boolean; json?: boolean; dryRun?: boolean }): Reporter {
  const events = f.json && !f.dryRun ? jsonEvents(process.stderr) : undefined;
  const display = f.quiet || f.json || f.dryRun ? undefined : progressPrinter(process.stderr);
  let last: ProgressEvent | undefined;
  return {
    onProgress: (e) => {
      last = e;
      events?.progress(e);
      display?.update(e);
    },
    status: (text) => {
      events?.status(text);
      display?.status(text);
    },
    source: (e) => {
      events?.source(e);
      display?.source(e);
    },
    settle: async (run) => {
      try {
        return await run;
      } finally {
        display?.done();
      }
    },
    watch: async (run) => {
      let r: ConvertResult;
      try {
        r = await run;
      } finally {
        display?.done();
      }
      events?.done(r);
      if (!f.json && !f.quiet && last && last.filesReused > 0) {
        process.stderr.write(`resumed ${r.plan.target.path}.partial: kept ${last.filesReused} finished file${last.filesReused === 1 ? '' : 's'} (${formatBytes(last.bytesReused)}) of the interrupted run, wrote the rest\n`);
      }
      return r;
    },
  };
}

/** For a dry run: the note that running the command would resume an interrupted run's partial output. */
export function partialNote(out: string): string | undefined {
  const partial = `${out}.partial`;
  if (!existsSync(partial)) return undefined;
  let n: number | undefined;
  try {
    const p = JSON.parse(readFileSync(join(partial, PROGRESS_NAME), 'utf8')) as { files?: Record<string, unknown> };
    n = p.files && typeof p.files === 'object' ? Object.keys(p.files).length : undefined;
  } catch {
    n = undefined;
  }
  return n === undefined
    ? `${partial} exists (an interrupted run's partial output); running this command reuses it if it holds only that run's remnants, else refuses it`
    : `${partial} holds an interrupted run (${n} finished file${n === 1 ? '' : 's'}): running this command resumes it if it is the same conversion`;
}

/**
 * Ctrl-C: every finished file of a directory output is already fsynced and recorded, so the
 * partial output is kept for a resume and the message says so; a single-file output (not
 * resumable) is removed. The lock this process holds is released. Exit 130, as shells expect.
 */
export function onInterrupt(): void {
  if (process.stderr.isTTY) process.stderr.write('\r\x1b[K');
  const outs = activeOutputs();
  if (!outs.length) process.stderr.write('shardshift: interrupted; nothing was written\n');
  for (const a of outs) {
    if (a.kind === 'file') {
      rmSync(a.partial, { force: true });
      process.stderr.write(`shardshift: interrupted; ${a.out} was not written (a single file is not resumable) and nothing is left behind\n`);
    } else if (a.part) {
      process.stderr.write(`shardshift: interrupted; part ${a.part.index}/${a.part.count} kept ${a.filesDone} of its ${a.filesTotal} finished files in ${a.partial} — re-run the same part (--part ${a.part.index}/${a.part.count}) to resume\n`);
    } else {
      process.stderr.write(`shardshift: interrupted; kept ${a.partial} (${a.filesDone} of ${a.filesTotal} files finished) — re-run the same command to resume\n`);
    }
    rmSync(a.lock, { force: true });
  }
  process.exit(130);
}
