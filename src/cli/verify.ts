import { verifyOutput, diffCheckpoints } from '../plan/verify.js';
import { verifyLogits, type LogitsReport } from '../plan/logits.js';
import { usage } from '../util/errors.js';
import { parseSize } from '../util/size.js';
import { EXIT_VERIFY_FAILED } from './exit.js';
import { checkPrinter, statusLine } from './progress.js';

interface VerifyFlags {
  against?: string;
  json?: boolean;
  logits?: boolean;
  prompt?: string;
  tokens?: string;
  positions?: string;
  generate?: string;
  tolerance?: string;
  minCosine?: string;
  hfModel?: string;
  maxMemory?: string;
}

function count(v: string | undefined, flag: string, min = 1): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw usage(`${flag}: expected a whole number ≥ ${min}, got ${JSON.stringify(v)}`);
  return n;
}

function fraction(v: string | undefined, flag: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw usage(`${flag}: expected a non-negative number, got ${JSON.stringify(v)}`);
  return n;
}

export async function runVerify(out: string, f: VerifyFlags): Promise<void> {
  if (f.logits) return runVerifyLogits(out, f);
  for (const k of ['prompt', 'tokens', 'positions', 'generate', 'tolerance', 'minCosine', 'hfModel'] as const) {
    if (f[k] !== undefined) throw usage(`--${k.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase())} applies to verify --logits`);
  }
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

async function runVerifyLogits(out: string, f: VerifyFlags): Promise<void> {
  if (!f.against) throw usage('verify --logits needs --against <src>: the checkpoint the output was converted from');
  const tokens = f.tokens?.split(',').map((t) => {
    const n = Number(t.trim());
    if (!Number.isInteger(n) || n < 0) throw usage(`--tokens: ${JSON.stringify(t)} is not a token id`);
    return n;
  });
  const status = f.json || !process.stderr.isTTY ? undefined : statusLine(process.stderr);
  const r = await verifyLogits(out, {
    against: f.against,
    tokens,
    prompt: f.prompt,
    positions: count(f.positions, '--positions'),
    generate: count(f.generate, '--generate'),
    maxMemory: parseSize(f.maxMemory ?? '1GiB', '--max-memory'),
    tolerance: { ...(f.tolerance !== undefined ? { maxAbs: fraction(f.tolerance, '--tolerance') } : {}), ...(f.minCosine !== undefined ? { minCosine: fraction(f.minCosine, '--min-cosine') } : {}) },
    hfModel: f.hfModel,
    onProgress: status ? (e) => status.show(`forward pass of the ${e.side}${e.steps > 1 ? ` (step ${e.step}/${e.steps})` : ''}: layer ${e.layer}/${e.layers}`) : undefined,
  }).finally(() => status?.clear());
  if (f.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
  else process.stdout.write(formatLogitsReport(r));
  if (!r.ok) process.exitCode = EXIT_VERIFY_FAILED;
}

const g = (x: number, p = 3) => (Number.isNaN(x) ? 'NaN' : x === 0 ? '0' : x.toPrecision(p));

export function formatLogitsReport(r: LogitsReport): string {
  const lines: string[] = [];
  const side = (label: string, s: LogitsReport['source']) => `${label} ${s.path}: ${s.describe}, ${s.dtype}, shape from ${s.config}; ${(s.bytesRead / 2 ** 20).toFixed(1)} MiB read in ${s.seconds.toFixed(2)} s`;
  lines.push(side('source', r.source), side('output', r.output));
  lines.push(`tokens: ${r.tokens.join(' ')}${r.text !== undefined ? `  (${JSON.stringify(r.text)})` : ''}`);
  lines.push('pos  token   max|Δ|      cosine     KL        top-1 src/out');
  for (const p of r.comparison.positions) {
    lines.push(`${String(p.position).padStart(3)}  ${String(p.token).padStart(6)}  ${g(p.maxAbs).padEnd(10)}  ${p.cosine.toFixed(7)}  ${g(p.kl, 2).padEnd(8)}  ${p.top1Reference}/${p.top1Output}${p.top1Reference === p.top1Output ? '' : '  ≠'}`);
  }
  const c = r.comparison;
  lines.push(`max |Δ| ${g(c.maxAbs)} (largest |logit| ${g(c.scale)}), min cosine ${c.minCosine.toFixed(7)}, top-1 agreement ${(100 * c.top1Agreement).toFixed(1)}%, max KL ${g(c.maxKl, 2)}`);
  lines.push(`tolerance: max |Δ| ≤ ${r.tolerance.maxAbs} × largest |logit|, cosine ≥ ${r.tolerance.minCosine} (${r.tolerance.basis})`);
  if (r.generated) {
    const gen = r.generated;
    lines.push(`greedy continuation (${gen.source.length} tokens):`);
    lines.push(`  source: ${gen.source.join(' ')}${gen.sourceText !== undefined ? `  ${JSON.stringify(gen.sourceText)}` : ''}`);
    lines.push(`  output: ${gen.output.join(' ')}${gen.outputText !== undefined ? `  ${JSON.stringify(gen.outputText)}` : ''}`);
    const at = gen.source.findIndex((t, i) => t !== gen.output[i]);
    lines.push(at < 0 ? '  identical' : `  they differ from token ${at + 1} on`);
  }
  for (const fl of r.failures) lines.push(`FAIL  ${fl}`);
  lines.push(r.ok ? `logits agree: ${r.output.path} computes the same model as ${r.source.path}` : `logits verification of ${r.output.path} FAILED`);
  return lines.join('\n') + '\n';
}
