/** Runs the built CLI (dist/src/cli/main.js) as a child process, as a user would. */
import { execFile } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The CLI built beside these tests (`<outDir>/src/cli/main.js`, whatever the build's output directory). */
export const cli = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'cli', 'main.js');

export interface CliRun {
  readonly code: number | null;
  readonly signal: string | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** The exit code (null when a signal ended it), the signal, and what it printed. */
export function runCli(args: readonly string[], env: Record<string, string> = {}): Promise<CliRun> {
  return new Promise((res) =>
    execFile(process.execPath, [cli, ...args], { env: { ...process.env, ...env } }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number; signal?: string }) | null;
      res({ code: e ? (e.code ?? null) : 0, signal: e?.signal ?? null, stdout, stderr });
    }),
  );
}
