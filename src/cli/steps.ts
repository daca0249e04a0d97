import { listSteps, getStep, defaultOutputBase } from '../steps/registry.js';
import { resolveParams, stepConfigDir } from '../steps/config.js';
import { resolveModel } from '../hub/download.js';
import { partialNote, reporter } from './report.js';
import { partLine } from './partition.js';
import { describePlan } from './convert.js';
import { formatBytes } from '../util/size.js';
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
  const step = getStep(name);
  const params = await resolveParams(step, f.config, overrides);
  const rep = reporter(f);
  rep.status(`${name}: opening …`);
  const r = await rep.watch(
    step.run(params, {
      dryRun: !!f.dryRun,
      env: process.env,
      onProgress: rep.onProgress,
      resolveModel: (id, what) => resolveModel(id, what, { log: f.quiet || f.json ? undefined : (m) => process.stderr.write(`${m}\n`) }),
    }),
  );
  if (f.json) {
    process.stdout.write(JSON.stringify({ step: name, params, plan: r.plan, seconds: r.seconds, bytesWritten: r.bytesWritten, dryRun: !!f.dryRun, outcome: r.outcome }, null, 2) + '\n');
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
}
