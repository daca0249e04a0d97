import { verifyOutput, diffCheckpoints } from '../plan/verify.js';
import { EXIT_VERIFY_FAILED } from './exit.js';
import { checkPrinter } from './progress.js';

export async function runVerify(out: string, f: { against?: string; json?: boolean }): Promise<void> {
  const display = f.json ? undefined : checkPrinter(process.stderr);
  const r = await verifyOutput(out, { against: f.against, onProgress: display?.update }).finally(() => display?.done());
  if (f.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
  else {
    for (const c of r.checks) process.stdout.write(`${c.ok ? 'ok  ' : 'FAIL'}  ${c.check}: ${c.detail}\n`);
    process.stdout.write(r.ok ? `verified ${out} (${r.format})\n` : `verification of ${out} FAILED\n`);
  }
  if (!r.ok) process.exitCode = EXIT_VERIFY_FAILED;
}

export async function runDiff(a: string, b: string, f: { json?: boolean; all?: boolean }): Promise<void> {
  const display = f.json ? undefined : checkPrinter(process.stderr);
  const r = await diffCheckpoints(a, b, { onProgress: display?.update }).finally(() => display?.done());
  if (f.json) process.stdout.write(JSON.stringify(r, (_k, v) => (v === Infinity ? 'Infinity' : v), 2) + '\n');
  else {
    const rows = r.tensors.filter((d) => f.all || !d.equal);
    for (const d of rows) {
      process.stdout.write(
        `${d.equal ? 'same' : 'DIFF'}  ${d.name}${d.note ? `  (${d.note})` : `  ${d.differing} elements differ, max |a−b| ${d.maxAbs.toPrecision(3)}, max ${d.maxUlp} ulp`}\n`,
      );
    }
    for (const n of r.onlyInA) process.stdout.write(`only in ${a}: ${n}\n`);
    for (const n of r.onlyInB) process.stdout.write(`only in ${b}: ${n}\n`);
    const same = r.tensors.filter((d) => d.equal).length;
    process.stdout.write(`${r.tensors.length} tensors compared: ${same} identical, ${r.tensors.length - same} different; ${r.onlyInA.length + r.onlyInB.length} unmatched\n`);
  }
  if (!r.identical) process.exitCode = 1;
}
