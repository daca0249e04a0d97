// The whole test suite: build, make sure the Python oracle venv exists, then run every test
// (pure-TypeScript unit tests and the interop tests that check shardshift against real torch).
// `.ci/run` calls exactly `npm test`, which runs this.
import { execFileSync, spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { oracleVenv } from './oracle-venv.mjs';
import { startSlurm } from './slurm.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
process.chdir(root);

execFileSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], { stdio: 'inherit' });
// The layering (docs/design.md, "Floors"): an upward import or an import circle fails the run.
execFileSync(process.execPath, [join(root, 'node_modules', 'dependency-cruiser', 'bin', 'dependency-cruise.mjs'), 'src', '--config', '.dependency-cruiser.cjs'], { stdio: 'inherit' });

const only = process.argv.slice(2);
const env = { ...process.env };
const dirs = ['dist/test/unit'];
if (process.env.SHARDSHIFT_NO_ORACLE === '1') {
  process.stderr.write('SHARDSHIFT_NO_ORACLE=1: running the pure-TypeScript tests only (golden fixtures)\n');
} else {
  const python = oracleVenv();
  if (!python) {
    process.stderr.write('no python3 found: the interop tests need it (set SHARDSHIFT_NO_ORACLE=1 to run only the pure-TypeScript tests)\n');
    process.exit(1);
  }
  env.SHARDSHIFT_PYTHON = python;
  dirs.push('dist/test/interop');
}

function testFiles(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...testFiles(p));
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}
let files = dirs.flatMap((d) => testFiles(join(root, d))).sort();
if (only.length) files = files.filter((f) => only.some((o) => f.includes(o)));

// The cluster tests submit to a real Slurm: a private one (own munge key, ports and state dir),
// installed when missing (root + apt-get), started here and stopped when the tests end.
let slurm;
if (process.env.SHARDSHIFT_NO_SLURM === '1') {
  process.stderr.write('SHARDSHIFT_NO_SLURM=1: the Slurm tests (test/unit/slurm.test.ts) are skipped\n');
} else if (files.some((f) => f.endsWith('slurm.test.js'))) {
  try {
    slurm = await startSlurm();
  } catch (e) {
    process.stderr.write(`slurm: ${e.message}\n(set SHARDSHIFT_NO_SLURM=1 to run without the Slurm tests)\n`);
    process.exit(1);
  }
  Object.assign(env, slurm.env);
}
let r;
try {
  r = spawnSync(process.execPath, ['--test', '--test-reporter=spec', '--test-concurrency=2', ...files], { stdio: 'inherit', env });
} finally {
  slurm?.stop();
}
process.exit(r.status ?? 1);
