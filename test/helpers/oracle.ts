/**
 * Access to the Python oracle (real torch, safetensors, ...) for interop tests.
 * `npm test` (scripts/test.mjs) creates the venv and sets SHARDSHIFT_PYTHON; an interop test run
 * without it fails loudly rather than skipping. Calls go to a long-lived interpreter per test
 * file (test/oracle/serve.py), so torch and transformers are imported once per file, not once per
 * call; `SHARDSHIFT_ORACLE_FRESH=1` runs every call in a fresh interpreter as before.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { promisify } from 'node:util';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const pexec = promisify(execFile);

/** Repository root (tests run from dist/test/..., sources live in test/oracle/*.py). */
export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

export function pythonPath(): string {
  const p = process.env.SHARDSHIFT_PYTHON;
  if (!p) throw new Error('SHARDSHIFT_PYTHON is not set: run the interop tests through `npm test`');
  return p;
}

/**
 * Scripts that start processes (torch.multiprocessing ranks: their children import the script
 * as `__main__` of their own) or that patch what they import (the vendored NxD converter's
 * loaders) run in a fresh interpreter per call. A request that leaves a process group or
 * megatron-core's parallel state behind ends its server (serve.py's `dirty`).
 */
const STATEFUL = new Set(['nxd_oracle.py']);
const freshCache = new Map<string, boolean>();
export function needsFreshProcess(script: string): boolean {
  let v = freshCache.get(script);
  if (v === undefined) {
    v = STATEFUL.has(script) || /\b(multiprocessing|mp\.spawn)\b/.test(readFileSync(join(repoRoot, 'test', 'oracle', script), 'utf8'));
    freshCache.set(script, v);
  }
  return v;
}

const ORACLE_ENV = (): NodeJS.ProcessEnv => ({ ...process.env, PYTHONHASHSEED: '0', OMP_NUM_THREADS: '1' });

interface Pending {
  readonly script: string;
  readonly args: readonly string[];
  readonly timeoutMs: number;
  readonly resolve: (stdout: string) => void;
  readonly reject: (e: Error) => void;
}

/**
 * One long-lived oracle interpreter (test/oracle/serve.py): requests on stdin, replies on fd 3,
 * one at a time. Its handles are unref'd while it is idle, so an idle server never keeps a test
 * file's process alive; it dies with that process.
 */
class OracleServer {
  private readonly child: ChildProcess;
  private buf = '';
  private current: (Pending & { timer: NodeJS.Timeout }) | undefined;
  dead = false;
  private stderr = '';

  constructor(private readonly onIdle: (s: OracleServer) => void) {
    this.child = spawn(pythonPath(), [join(repoRoot, 'test', 'oracle', 'serve.py')], { stdio: ['pipe', 'ignore', 'pipe', 'pipe'], env: ORACLE_ENV() });
    const replies = this.child.stdio[3] as Readable;
    replies.setEncoding('utf8').on('data', (d: string) => this.onData(d));
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => (this.stderr = (this.stderr + d).slice(-8000)));
    this.child.on('exit', (code, signal) => {
      this.dead = true;
      const c = this.current;
      this.current = undefined;
      if (c) {
        clearTimeout(c.timer);
        c.reject(new Error(`oracle ${c.script} ${c.args.join(' ')} failed: the oracle process ended (${signal ?? `exit ${code}`}): ${this.stderr}`));
      }
    });
    this.idle(true);
  }

  private idle(yes: boolean): void {
    const handles = [this.child, this.child.stdin, this.child.stderr, this.child.stdio[3]] as Array<{ ref?: () => void; unref?: () => void } | null>;
    for (const h of handles) (yes ? h?.unref : h?.ref)?.call(h);
  }

  send(p: Pending): void {
    this.idle(false);
    const timer = setTimeout(() => {
      this.child.kill('SIGKILL');
    }, p.timeoutMs);
    this.current = { ...p, timer };
    this.child.stdin!.write(JSON.stringify({ script: p.script, args: p.args }) + '\n');
  }

  private onData(d: string): void {
    this.buf += d;
    for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      const c = this.current;
      if (!c) continue;
      this.current = undefined;
      clearTimeout(c.timer);
      const r = JSON.parse(line) as { ok: boolean; stdout: string; stderr?: string; code?: number; exiting?: boolean };
      // The server exits after this reply (it left process-wide state behind): never reuse it.
      if (r.exiting) this.dead = true;
      if (r.ok) c.resolve(r.stdout);
      else c.reject(new Error(`oracle ${c.script} ${c.args.join(' ')} failed (exit ${r.code}): ${r.stderr || r.stdout}`));
      this.idle(true);
      this.onIdle(this);
    }
  }
}

/** At most two interpreters per test file (its oracle calls rarely overlap more). */
const POOL_SIZE = 2;
const pool: OracleServer[] = [];
const free: OracleServer[] = [];
const waiting: Pending[] = [];

function dispatch(): void {
  while (waiting.length) {
    let s = free.pop();
    while (s?.dead) s = free.pop();
    if (!s) {
      for (let i = pool.length - 1; i >= 0; i--) if (pool[i]!.dead) pool.splice(i, 1);
      if (pool.length >= POOL_SIZE) return;
      s = new OracleServer((x) => {
        free.push(x);
        dispatch();
      });
      pool.push(s);
    }
    s.send(waiting.shift()!);
  }
}

/** Runs test/oracle/<script> with the oracle's python; returns stdout. Throws with stderr on failure. */
export async function runOracle(script: string, args: string[], opts: { timeoutMs?: number } = {}): Promise<string> {
  const timeoutMs = opts.timeoutMs ?? 300_000;
  if (process.env.SHARDSHIFT_ORACLE_FRESH === '1' || needsFreshProcess(script)) {
    try {
      const { stdout } = await pexec(pythonPath(), [join(repoRoot, 'test', 'oracle', script), ...args], { maxBuffer: 64 * 1024 * 1024, timeout: timeoutMs, env: ORACLE_ENV() });
      return stdout;
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`oracle ${script} ${args.join(' ')} failed: ${err.stderr || err.message}`, { cause: e });
    }
  }
  return new Promise((resolve, reject) => {
    waiting.push({ script, args, timeoutMs, resolve, reject });
    dispatch();
  });
}
