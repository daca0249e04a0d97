// Creates (or reuses) the Python venv that holds the test oracle (torch, safetensors, ...).
// The venv lives outside the work tree, keyed by the hash of test/oracle/requirements.txt, so a
// fresh clone on the same machine reuses it and a changed requirement builds a new one.
// Usage: node scripts/oracle-venv.mjs  → prints the venv's python path on stdout.
import { createHash } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

export function oracleVenv({ log = (m) => process.stderr.write(m + '\n') } = {}) {
  const reqPath = join(root, 'test', 'oracle', 'requirements.txt');
  const req = readFileSync(reqPath, 'utf8');
  const hash = createHash('sha256').update(req).digest('hex').slice(0, 12);
  const base = process.env.SHARDSHIFT_ORACLE_DIR ?? join(homedir(), '.cache', 'shardshift');
  const venv = join(base, `oracle-venv-${hash}`);
  const python = join(venv, 'bin', 'python');
  const stamp = join(venv, '.complete');
  if (existsSync(stamp)) return python;
  const py = process.env.PYTHON ?? 'python3';
  if (spawnSync(py, ['--version']).status !== 0) return undefined;
  log(`oracle: creating venv ${venv} (first run only)`);
  rmSync(venv, { recursive: true, force: true });
  mkdirSync(base, { recursive: true });
  execFileSync(py, ['-m', 'venv', venv], { stdio: 'inherit' });
  execFileSync(python, ['-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', '-r', reqPath], {
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  writeFileSync(stamp, req);
  return python;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const p = oracleVenv();
  if (!p) {
    process.stderr.write('oracle: no python3 on this machine\n');
    process.exit(1);
  }
  process.stdout.write(p + '\n');
}
