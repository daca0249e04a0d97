// Regenerates test/published/tensors/<id>.json.gz — each published model's exact tensor list as
// transformers 5.24 saves it plus the hub-only tensors (test/oracle/published_oracle.py) — from
// the configs in test/published/configs. `--check` regenerates into a temporary directory and exits
// non-zero when a committed list differs (test/interop/published.test.ts runs the same check).
//
//   node scripts/published-tensors.mjs [--check] [model-id …]
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync, gunzipSync } from 'node:zlib';
import { oracleVenv } from './oracle-venv.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dir = join(root, 'test', 'published');
const args = process.argv.slice(2);
const check = args.includes('--check');
const only = args.filter((a) => !a.startsWith('--'));
const models = JSON.parse(readFileSync(join(dir, 'models.json'), 'utf8')).models.filter((m) => only.length === 0 || only.includes(m.id));
const python = process.env.SHARDSHIFT_PYTHON ?? oracleVenv();
if (!python) throw new Error('no python3: the tensor lists come from transformers in the oracle venv');
const tmp = mkdtempSync(join(tmpdir(), 'ss-published-'));
try {
  const jobs = models.map((m) => ({ config: join(dir, 'configs', m.config), hub: m.hub, out: join(tmp, `${m.id}.json`) }));
  execFileSync(python, [join(root, 'test', 'oracle', 'published_oracle.py'), 'names'], { input: JSON.stringify(jobs), stdio: ['pipe', 'inherit', 'inherit'] });
  mkdirSync(join(dir, 'tensors'), { recursive: true });
  let stale = 0;
  for (const m of models) {
    const fresh = JSON.parse(readFileSync(join(tmp, `${m.id}.json`), 'utf8'));
    const path = join(dir, 'tensors', `${m.id}.json.gz`);
    if (check) {
      let old;
      try {
        old = JSON.parse(gunzipSync(readFileSync(path)).toString('utf8'));
      } catch {
        old = undefined;
      }
      if (JSON.stringify(old) !== JSON.stringify(fresh)) {
        stale++;
        process.stderr.write(`${path}: differs from what transformers ${fresh.transformers} derives (run node scripts/published-tensors.mjs)\n`);
      }
    } else {
      // One tensor per line: small diffs when a transformers version changes a name.
      const text = `{"transformers":${JSON.stringify(fresh.transformers)},"architecture":${JSON.stringify(fresh.architecture)},"tensors":[\n${fresh.tensors.map((t) => JSON.stringify(t)).join(',\n')}\n]}\n`;
      writeFileSync(path, gzipSync(Buffer.from(text), { level: 9, mtime: 0 }));
      process.stderr.write(`wrote ${path} (${fresh.tensors.length} tensors)\n`);
    }
  }
  if (stale) process.exit(1);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
