/**
 * `--part i/n` on every command that writes an output, and the two commands of a partitioned
 * run's end: `finalize` (check every part, write what depends on all, rename into place) and
 * `status` (every part's state, from the shared directory alone).
 */
import { Option, type Command } from 'commander';
import { resolve } from 'node:path';
import { formatBytes } from '../util/size.js';
import { usage } from '../util/errors.js';
import { parsePart, partResult, runPartitioned } from '../exec/parts.js';
import { PARTS_NAME, partStates, readPartsRecord, partCommand } from '../exec/part-output.js';
import { MANIFEST_NAME } from '../exec/manifest.js';
import { existsSync } from 'node:fs';
import type { ConvertResult } from '../plan/convert.js';

/** The command line being run (main sets it; `finalize` re-runs a recorded one). */
let commandLine: readonly string[] = [];
export function setCommandLine(argv: readonly string[]): void {
  commandLine = argv;
}

/** The command line without `--part` (what each part and the finalize record and re-run). */
export function withoutPart(argv: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--part') i++;
    else if (!a.startsWith('--part=')) out.push(a);
  }
  return out;
}

export const partOption = (): Option => new Option('--part <i/n>', 'write only part i of n of the output (0-based, as a Slurm array task id) into the shared <out>.partial; the last part to finish (or `shardshift finalize <out>`) completes it');

/** Wraps a command's action: with `--part`, the whole command runs as that part of its output. */
export function partitionable<A extends unknown[]>(action: (...args: A) => Promise<void>): (...args: A) => Promise<void> {
  return (...args: A) => {
    const opts = args.find((a, i) => i === args.length - 2 && a !== null && typeof a === 'object') as { part?: string } | undefined;
    if (!opts?.part) return action(...args);
    const part = parsePart(opts.part);
    return runPartitioned({ kind: 'part', part, argv: withoutPart(commandLine), cwd: process.cwd() }, () => action(...args));
  };
}

/** The line a part run prints instead of "wrote …" (undefined when the run was not a part). */
export function partLine(r: ConvertResult): string | undefined {
  const p = partResult();
  if (!p) return undefined;
  const head = `part ${p.part.index}/${p.part.count} of ${p.out}: ${p.files} file${p.files === 1 ? '' : 's'}, ${formatBytes(p.bytes)}${p.filesReused ? ` (${p.filesReused} kept from an interrupted run)` : ''} in ${r.seconds.toFixed(2)} s`;
  if (p.finalized) return `${head}; it was the last part: checked all ${p.part.count} parts and finalized ${p.out}\n`;
  const left = p.part.count - p.partsDone;
  return `${head}; ${p.partsDone} of ${p.part.count} parts done${left ? ` — the last part to finish completes ${p.out} (or run \`shardshift finalize ${p.out}\`)` : ''}${p.note ? ` (${p.note})` : ''}\n`;
}

export function registerPartCommands(p: Command, run: (argv: string[]) => Promise<number>): void {
  p.command('finalize')
    .description('Complete a partitioned run (--part): check every part\'s files (sizes and SHA-256s), write the indexes, metadata and manifest, and rename <out>.partial into place.')
    .argument('<out>', 'the output the parts wrote (its <out>.partial)')
    .option('-q, --quiet', 'no progress display')
    .addHelpText('after', '\nExample:\n  $ shardshift finalize /lustre/me/llama-megatron')
    .action(async (out: string, f: { quiet?: boolean }) => {
      const partial = `${resolve(out)}.partial`;
      const rec = await readPartsRecord(partial);
      if (!rec) {
        if (existsSync(`${resolve(out)}/${MANIFEST_NAME}`) && !existsSync(partial)) {
          process.stdout.write(`${out} is already finalized\n`);
          return;
        }
        throw usage(`${out} is not a partitioned run: ${existsSync(partial) ? `${partial} has no ${PARTS_NAME}` : `there is no ${partial}`} (parts are written with --part i/n)`);
      }
      // Plan again, exactly as the parts did, then finish instead of writing a part.
      const argv = [...rec.argv];
      if (f.quiet && !argv.includes('-q') && !argv.includes('--quiet')) argv.push('-q');
      const prev = process.cwd();
      process.chdir(rec.cwd);
      try {
        const code = await runPartitioned({ kind: 'finalize' }, () => run(argv));
        if (code !== 0) process.exitCode = code;
      } finally {
        process.chdir(prev);
      }
    });

  p.command('status')
    .description('Show the state of every part of a partitioned run (done, running, interrupted, failed, not run) from its shared directory.')
    .argument('<out>', 'the output the parts write')
    .option('--json', 'print one JSON document')
    .action(async (out: string, f: { json?: boolean }) => {
      const partial = `${resolve(out)}.partial`;
      const rec = await readPartsRecord(partial);
      if (!rec) {
        if (existsSync(`${resolve(out)}/${MANIFEST_NAME}`)) {
          process.stdout.write(f.json ? JSON.stringify({ out, state: 'finalized' }) + '\n' : `${out}: finalized\n`);
          return;
        }
        throw usage(`${out} is not a partitioned run in progress (no ${PARTS_NAME} in ${partial})`);
      }
      const states = await partStates(partial, rec.parts, rec.planHash);
      if (f.json) {
        const parts = states.map((s) => (s.kind === 'missing' ? { part: s.part, state: 'not-run' } : { part: s.part, state: s.kind, host: s.record.host, pid: s.record.pid, slurmJob: s.record.slurmJob, files: Object.keys(s.record.files).length, filesTotal: s.record.filesTotal, bytesDone: s.record.bytesDone, bytesTotal: s.record.bytesTotal, updated: s.record.updated, error: s.record.error }));
        process.stdout.write(JSON.stringify({ out, planHash: rec.planHash, parts }, null, 2) + '\n');
        return;
      }
      const lines = [`${out}: ${rec.parts} parts of \`shardshift ${rec.argv.join(' ')}\``];
      for (const s of states) {
        if (s.kind === 'missing') {
          lines.push(`  part ${s.part}/${rec.parts}  not run     (${partCommand(rec, s.part)})`);
          continue;
        }
        const r = s.record;
        const where = `${r.host}:${r.pid}${r.slurmJob ? `, job ${r.slurmJob}` : ''}`;
        lines.push(`  part ${s.part}/${rec.parts}  ${s.kind.padEnd(11)} ${Object.keys(r.files).length}/${r.filesTotal} files, ${formatBytes(r.bytesDone)} of ${formatBytes(r.bytesTotal)}  (${where}, ${r.updated})${r.error ? `: ${r.error}` : ''}`);
      }
      const done = states.filter((s) => s.kind === 'done').length;
      lines.push(done === rec.parts ? `all parts done: run \`shardshift finalize ${out}\`` : `${done} of ${rec.parts} parts done`);
      process.stdout.write(lines.join('\n') + '\n');
    });
}
