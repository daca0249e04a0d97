import { convertDcpToHf } from '../plan/dcp-to-hf.js';
import { resolveModel } from '../hub/download.js';
import { dtypeFromTorch } from '../tensor/dtype.js';
import { parseSize, formatBytes } from '../util/size.js';
import { usage } from '../util/errors.js';
import { partialNote, reporter } from './report.js';
import { partLine } from './partition.js';
import { describePlan } from './convert.js';

interface Flags {
  config?: string;
  dcpCkptPath?: string;
  hfCkptPath?: string;
  hfModelName?: string;
  dtype?: string;
  maxMemory: string;
  overwrite?: boolean;
  dryRun?: boolean;
  json?: boolean;
  quiet?: boolean;
}

/** `shardshift dcp-to-hf`: NeMo RL's convert_dcp_to_hf.py flags, same meaning. */
export async function runDcpToHf(f: Flags): Promise<void> {
  if (!f.dcpCkptPath) throw usage('--dcp-ckpt-path is required (the run\'s step_N/policy/weights)');
  if (!f.hfCkptPath) throw usage('--hf-ckpt-path is required (where to write the HF checkpoint)');
  const rep = reporter(f);
  const log = f.quiet || f.json ? undefined : (m: string): boolean => process.stderr.write(`${m}\n`);
  rep.status(`opening ${f.dcpCkptPath} …`);
  const r = await rep.watch(convertDcpToHf(f.dcpCkptPath, f.hfCkptPath, {
    config: f.config,
    hfModelName: f.hfModelName,
    resolveModel: (id) => resolveModel(id, 'config', { log }),
    dtype: f.dtype ? dtypeFromTorch(f.dtype) : undefined,
    maxMemory: parseSize(f.maxMemory, '--max-memory'),
    overwrite: f.overwrite,
    dryRun: f.dryRun,
    onProgress: rep.onProgress,
  }));
  if (f.json) process.stdout.write(JSON.stringify({ plan: r.plan, seconds: r.seconds, bytesWritten: r.bytesWritten, dryRun: !!f.dryRun, outcome: r.outcome }, null, 2) + '\n');
  else if (f.dryRun) {
    const note = partialNote(r.plan.target.path);
    process.stdout.write(describePlan(r.plan) + `\n${note ? `${note}\n` : ''}(dry run: nothing written)\n`);
  }
  else if (partLine(r)) process.stdout.write(partLine(r)!);
  else process.stdout.write(`Saved HF checkpoint to: ${r.plan.target.path} (${formatBytes(r.bytesWritten)} in ${r.seconds.toFixed(2)} s)\n`);
}
