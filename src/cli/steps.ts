import { listSteps, getStep, defaultOutputBase, BatchRun, type BatchItem } from '../steps/registry.js';
import { runStep } from '../steps/run.js';
import { stepConfigDir } from '../steps/config.js';
import { partialNote, reporter } from './report.js';
import { partLine } from './partition.js';
import { pushLine } from './push.js';
import { describePlan } from './convert.js';
import { formatBytes } from '../util/size.js';
import { formatLogitsReport } from './verify.js';
import { EXIT_VERIFY_FAILED } from './exit.js';
import { readdir } from 'node:fs/promises';

export async function runStepsList(): Promise<void> {
  for (const s of listSteps()) process.stdout.write(`${s.name.padEnd(26)} ${s.description}\n`);
}

export async function runStepsShow(name: string): Promise<void> {
  const s = getStep(name);
  const lines = [`${s.name}: ${s.description}`, '', 'parameters (key=value; nested keys with dots):'];
  for (const [k, p] of Object.entries(s.params)) {
    const def = p.required ? 'required' : `default ${JSON.stringify(p.default)}`;
    lines.push(`  ${k.padEnd(30)} ${p.type}${p.choices ? ` (${p.choices.join('|')})` : ''}, ${def} — ${p.description}${p.aliases ? ` (also: ${p.aliases.join(', ')})` : ''}`);
  }
  const dir = stepConfigDir(s);
  const configs = (await readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith('.yaml')).map((f) => f.replace(/\.yaml$/, ''));
  lines.push('', `configs (-c): ${configs.join(', ') || '-'}  (${dir})`, `default output base: ${defaultOutputBase(process.env)}`);
  process.stdout.write(lines.join('\n') + '\n');
}

export async function runStepsRun(name: string, overrides: string[], f: { config?: string; dryRun?: boolean; json?: boolean; quiet?: boolean }): Promise<void> {
  const rep = reporter(f);
  rep.status(`${name}: opening …`);
  const { params, result: r } = await rep.settle(
    runStep(name, overrides, {
      config: f.config,
      dryRun: !!f.dryRun,
      onProgress: rep.onProgress,
      log: f.quiet || f.json ? undefined : (m) => process.stderr.write(`${m}\n`),
    }),
  );
  if (r instanceof BatchRun) return batchSummary(name, r, f);
  // One conversion: end the JSON events and say whether it resumed.
  await rep.watch(Promise.resolve(r));
  if (f.json) {
    process.stdout.write(JSON.stringify({ step: name, params, plan: r.plan, seconds: r.seconds, bytesWritten: r.bytesWritten, dryRun: !!f.dryRun, outcome: r.outcome, ...(r.push ? { push: r.push } : {}), ...(r.logits ? { logits: r.logits } : {}) }, null, 2) + '\n');
    if (r.logits && !r.logits.ok) process.exitCode = EXIT_VERIFY_FAILED;
    return;
  }
  if (f.dryRun) {
    const note = partialNote(r.plan.target.path);
    process.stdout.write(`${name} (dry run: nothing written)\n${describePlan(r.plan)}\n${note ? `${note}\n` : ''}`);
    return;
  }
  const pl = partLine(r);
  if (pl) {
    process.stdout.write(`${name}: ${pl}`);
    return;
  }
  process.stdout.write(`${name}: wrote ${r.plan.target.path} (${formatBytes(r.bytesWritten)} in ${r.seconds.toFixed(2)} s)\n`);
  if (r.logits) {
    process.stdout.write(formatLogitsReport(r.logits));
    if (!r.logits.ok) process.exitCode = EXIT_VERIFY_FAILED;
  }
  if (r.push) process.stdout.write(pushLine(r.push));
}

/** The table at the end of a batch conversion (`iterations=`): one row per checkpoint; exit 1 (2 if every failure was usage) when any failed. */
function batchSummary(name: string, b: BatchRun, f: { dryRun?: boolean; json?: boolean }): void {
  const failed = b.items.filter((i) => !i.result.ok);
  if (f.json) {
    const rows = b.items.map((i) => (i.result.ok ? { checkpoint: i.name, source: i.source, out: i.out, outcome: i.result.convert.outcome, bytesWritten: i.result.convert.bytesWritten, seconds: i.result.convert.seconds, ...(i.result.convert.push ? { push: i.result.convert.push } : {}) } : { checkpoint: i.name, source: i.source, out: i.out, outcome: 'failed', error: i.result.error }));
    process.stdout.write(JSON.stringify({ step: name, batch: rows }, null, 2) + '\n');
  } else {
    const label = (i: BatchItem): string => (i.result.ok ? ({ written: 'converted', reused: 'skipped (finished)', 'dry-run': 'planned', 'part-written': 'part written' } as const)[i.result.convert.outcome] : 'FAILED');
    const size = (i: BatchItem): string => (i.result.ok ? (i.result.convert.outcome === 'written' ? formatBytes(i.result.convert.bytesWritten) : '-') : '-');
    const secs = (i: BatchItem): string => (i.result.ok && i.result.convert.outcome === 'written' ? `${i.result.convert.seconds.toFixed(1)} s` : '-');
    const head = ['checkpoint', 'result', 'written', 'time', 'output'];
    const rows = b.items.map((i) => [i.name, label(i), size(i), secs(i), i.out]);
    const w = head.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
    const line = (r: readonly string[]): string => r.map((x, c) => (c === r.length - 1 ? x : x.padEnd(w[c]!))).join('  ');
    const n = (k: string): number => b.items.filter((i) => label(i) === k).length;
    const lines = [`${name}${f.dryRun ? ' (dry run: nothing written)' : ''}: ${b.items.length} checkpoint${b.items.length === 1 ? '' : 's'}`, line(head), ...rows.map(line)];
    lines.push(f.dryRun ? `${n('planned')} planned, ${failed.length} failed` : `${n('converted')} converted, ${n('skipped (finished)')} skipped (already finished), ${failed.length} failed`);
    process.stdout.write(lines.join('\n') + '\n');
    for (const i of b.items) if (i.result.ok && i.result.convert.push) process.stdout.write(`${i.name}: ${pushLine(i.result.convert.push)}`);
    for (const i of failed) if (!i.result.ok) process.stderr.write(`shardshift: error: ${i.name}: ${i.result.error}\n`);
  }
  if (failed.length) process.exitCode = failed.every((i) => !i.result.ok && i.result.exitCode === 2) ? 2 : 1;
}
