import { checkOutputName, convert, type ConvertPlan, type ConvertResult } from '../plan/convert.js';
import { convertHfToMegatron, convertMegatronToHf } from '../plan/model-convert.js';
import type { FormatName, FORMAT_NAMES } from '../checkpoints/registry.js';
import { dtypeFromTorch } from '../tensor/dtype.js';
import { formatBytes, parseSize } from '../util/size.js';
import { usage } from '../util/errors.js';
import { partialNote, reporter } from './report.js';
import { partLine } from './partition.js';
import { partResult } from '../exec/parts.js';
import { resolveModel } from '../hub/download.js';
import type { CkptFormat } from '../megatron/run-dir.js';
import { modelSourceKind } from '../plan/sources.js';
import { convertHfToNxd, convertNxdToHf } from '../plan/nxd-convert.js';
import { join, resolve } from 'node:path';
import { looksLikeModelId } from '../hub/repo.js';
import { openHubSource, type HubSource } from '../plan/hub-source.js';
import type { PushResult } from '../hub/push.js';
import { pushLine, pushOutput } from './push.js';

interface Flags {
  to: (typeof FORMAT_NAMES)[number] | 'megatron' | 'hf' | 'nxd';
  modelStyle: 'hf' | 'megatron';
  kvSizeMultiplier?: string;
  qkvLinear?: boolean;
  fuseQkv?: boolean;
  xser?: boolean;
  hwBackend?: string;
  tp: string;
  pp: string;
  ep: string;
  etp?: string;
  makeVocabSizeDivisibleBy: string;
  iteration: string;
  hfModel?: string;
  allowUnmapped?: boolean;
  dropMtp?: boolean;
  quantize?: 'mxfp4' | 'fp8';
  ckptFormat: CkptFormat;
  megatronSpec: 'te' | 'local';
  from?: FormatName;
  maxMemory: string;
  shardSize: string;
  dcpFiles?: string;
  dtype?: string;
  overwrite?: boolean;
  hashSource?: boolean;
  dryRun?: boolean;
  json?: boolean;
  quiet?: boolean;
  verbose?: boolean;
  part?: string;
  maxDisk?: string;
  pushToHub?: string;
  createRepo?: boolean;
  private?: boolean;
}

/** `TransformerEngine extra state (FP8 metadata) ×8 (decoder.layers.…)` per reason. */
function skippedSummary(plan: ConvertPlan, which: 'all' | 'data' = 'all'): string[] {
  const by = new Map<string, string[]>();
  for (const s of plan.skipped ?? []) if (which === 'all' || s.carriesData) by.set(s.reason, [...(by.get(s.reason) ?? []), s.name]);
  return [...by].map(([reason, names]) => `${reason} ×${names.length} (${names[0]}${names.length > 1 ? ', …' : ''})`);
}

/** `46 tensors stored as F32, not BF16 — <reason> (first, …)` per reason. */
function dtypeSummary(plan: ConvertPlan): string[] {
  const by = new Map<string, string[]>();
  for (const d of plan.dtypeExceptions ?? []) {
    const k = `${d.dtype}\0${d.reason}`;
    by.set(k, [...(by.get(k) ?? []), d.name]);
  }
  return [...by].map(([k, names]) => {
    const [dtype, reason] = k.split('\0');
    return `${names.length} tensor${names.length === 1 ? '' : 's'} stored as ${dtype}${plan.dtype ? `, not ${plan.dtype}` : ''} — ${reason} (${names[0]}${names.length > 1 ? ', …' : ''})`;
  });
}

export function describePlan(plan: ConvertPlan): string {
  const lines = [
    `source: ${plan.source.path} (${plan.source.format}, ${plan.source.tensors} tensors, ${formatBytes(plan.source.bytes)})`,
    `target: ${plan.target.path} (${plan.target.format}, ${plan.target.kind === 'file' ? 'one file' : 'directory'})`,
    ...plan.files.map((f) => `  ${f.path}  ${formatBytes(f.bytes)}${f.tensors ? `  ${f.tensors} tensors` : ''}`),
  ];
  if (plan.sideFiles.length) lines.push(`side files copied: ${plan.sideFiles.join(', ')}`);
  for (const n of plan.notes ?? []) lines.push(`note: ${n}`);
  for (const d of dtypeSummary(plan)) lines.push(`dtype: ${d}`);
  for (const s of skippedSummary(plan)) lines.push(`skipped: ${s}`);
  for (const d of plan.dropped) lines.push(`not carried: ${d.name} (${d.reason})`);
  return lines.join('\n');
}

function whole(s: string, flag: string): number {
  const n = Number(s);
  if (!Number.isInteger(n) || n < 0) throw usage(`${flag}: ${s} is not a whole number`);
  return n;
}

function positive(s: string, flag: string): number {
  const n = whole(s, flag);
  if (n < 1) throw usage(`${flag}: must be at least 1`);
  return n;
}

/** What streaming from the hub did: downloads, the disk the shards took, re-downloads, cache reads. */
function streamSummary(hub: HubSource, maxDisk: number | undefined): string {
  const s = hub.stats();
  const parts = [`${s.downloads} shard download${s.downloads === 1 ? '' : 's'} (${formatBytes(s.bytesFetched)} fetched)`];
  if (maxDisk !== undefined) parts.push(`at most ${formatBytes(s.peakDisk)} of source on disk (--max-disk ${formatBytes(maxDisk)})`);
  if (s.again) parts.push(`${s.again} shard${s.again === 1 ? '' : 's'} downloaded again after being deleted to make room`);
  if (s.inPlace) parts.push(`${s.inPlace} read in place from the hub cache`);
  return `streamed ${hub.listing.repo.id}@${hub.listing.commit.slice(0, 12)}: ${parts.join(', ')}`;
}

export async function runConvert(src: string, out: string, f: Flags): Promise<void> {
  const maxMemory = parseSize(f.maxMemory, '--max-memory');
  const maxShardSize = parseSize(f.shardSize, '--shard-size');
  if (f.quantize && f.to !== 'hf') throw usage(`--quantize ${f.quantize} applies to exports (--to hf), not --to ${f.to}`);
  let dcpFiles: number | undefined;
  if (f.dcpFiles !== undefined) {
    dcpFiles = Number(f.dcpFiles);
    if (!Number.isInteger(dcpFiles) || dcpFiles < 1) throw usage(`--dcp-files: ${f.dcpFiles} is not a positive whole number`);
  }
  const dtype = f.dtype ? dtypeFromTorch(f.dtype) : undefined;
  const rep = reporter(f);
  const hubLog = { log: f.quiet || f.json ? undefined : (m: string) => process.stderr.write(`${m}\n`) };
  const common = { maxMemory, maxShardSize, dcpFiles, dtype, overwrite: f.overwrite, hashSource: f.hashSource, dryRun: f.dryRun, onProgress: rep.onProgress };
  const nxd = {
    modelStyle: f.modelStyle,
    kvSizeMultiplier: f.kvSizeMultiplier === undefined ? undefined : positive(f.kvSizeMultiplier, '--kv-size-multiplier'),
    qkvLinear: f.qkvLinear,
    fuseQkv: f.fuseQkv,
    hwBackend: f.hwBackend,
  };
  checkOutputName(out, f.to);
  const kind = await modelSourceKind(src);
  const maxDisk = f.maxDisk === undefined ? undefined : parseSize(f.maxDisk, '--max-disk');
  // Offline, the cache's snapshot is the model (nothing to stream or bound).
  const offline = process.env.HF_HUB_OFFLINE === '1' || process.env.HF_HUB_OFFLINE === 'true';
  const streamed = kind === 'missing' && looksLikeModelId(src) && f.to === 'megatron' && !offline;
  if (maxDisk !== undefined && !streamed && !offline) throw usage(`--max-disk applies to a hub model streamed into --to megatron (a source given as org/name); ${src} is ${kind === 'missing' ? 'not a hub model id' : 'on local disk'}${kind === 'missing' || f.to === 'megatron' ? '' : ` and the target is ${f.to}`}`);
  if ((f.createRepo || f.private) && !f.pushToHub) throw usage('--create-repo and --private go with --push-to-hub org/name');
  const ref = async (): Promise<string | undefined> => (f.hfModel ? await resolveModel(f.hfModel, 'config', hubLog) : undefined);
  // A source that is not a Megatron or NxD checkpoint (or a file) may be a hub model id.
  const model = async (): Promise<string> => (kind === 'megatron' || kind === 'nxd' || kind === 'file' ? src : await resolveModel(src, 'all', hubLog));
  // HF → Megatron from the hub: planned from the shards' headers, each shard downloaded as the
  // conversion reaches it (at most --max-disk of them on disk), instead of the whole model first.
  let hub: HubSource | undefined;
  const streamedModel = async (): Promise<string> => {
    rep.status(`listing ${src} and reading its shards' headers …`);
    hub = await openHubSource(src, { ...hubLog, maxDisk, spoolDir: `${resolve(out)}.source-spool`, onEvent: rep.source });
    return hub.dir;
  };
  // The route table: target × what the source is.
  const routes: Record<Flags['to'], () => Promise<ConvertResult>> = {
    hf: async () => {
      if (kind === 'nxd') {
        const r = await ref();
        return convertNxdToHf(src, out, { ...common, ...nxd, modelStyle: undefined, hfModel: r, config: r ? join(r, 'config.json') : undefined });
      }
      return convertMegatronToHf(src, out, { ...common, allowUnmapped: f.allowUnmapped, dropMtp: f.dropMtp, quantize: f.quantize, hfModel: await ref() });
    },
    nxd: async () => {
      const r = await ref();
      return convertHfToNxd(await model(), out, { ...common, ...nxd, tp: positive(f.tp, '--tp'), pp: positive(f.pp, '--pp'), xser: f.xser, hfModel: r, config: r ? join(r, 'config.json') : undefined });
    },
    megatron: async () =>
      convertHfToMegatron(streamed ? await streamedModel() : await model(), out, {
        ...common,
        weights: hub?.source,
        nxd,
        allowUnmapped: f.allowUnmapped,
        dropMtp: f.dropMtp,
        ckptFormat: f.ckptFormat,
        megatronSpec: f.megatronSpec,
        hfModel: await ref(),
        tp: positive(f.tp, '--tp'),
        pp: positive(f.pp, '--pp'),
        ep: positive(f.ep, '--ep'),
        etp: f.etp === undefined ? undefined : positive(f.etp, '--etp'),
        makeVocabSizeDivisibleBy: positive(f.makeVocabSizeDivisibleBy, '--make-vocab-size-divisible-by'),
        iteration: whole(f.iteration, '--iteration'),
      }),
    safetensors: () => convert(src, out, { ...common, to: 'safetensors', from: f.from }),
    torch: () => convert(src, out, { ...common, to: 'torch', from: f.from }),
    dcp: () => convert(src, out, { ...common, to: 'dcp', from: f.from }),
  };
  rep.status(`opening ${src} …`);
  let r: ConvertResult;
  try {
    r = await rep.watch(routes[f.to]());
  } finally {
    await hub?.source.close();
  }
  const streamedNote = hub ? streamSummary(hub, maxDisk) : undefined;
  let pushed: PushResult | undefined;
  const part = partResult();
  if (f.pushToHub && !f.dryRun && (!part || part.finalized)) {
    if (r.plan.target.kind !== 'dir') throw usage(`--push-to-hub uploads a directory output; ${r.plan.target.path} is one file`);
    rep.status(`pushing ${r.plan.target.path} to ${f.pushToHub} …`);
    pushed = await rep.settle(pushOutput(r.plan.target.path, f.pushToHub, { createRepo: f.createRepo, private: f.private, log: hubLog.log }));
  }
  if (f.json) {
    const hubStats = hub ? { repo: hub.listing.repo.id, commit: hub.listing.commit, maxDisk: maxDisk ?? null, ...hub.stats() } : undefined;
    process.stdout.write(JSON.stringify({ plan: r.plan, seconds: r.seconds, bytesWritten: r.bytesWritten, dryRun: !!f.dryRun, outcome: r.outcome, ...(hubStats ? { hub: hubStats } : {}), ...(pushed ? { push: pushed } : {}) }, null, 2) + '\n');
    return;
  }
  if (streamedNote && !f.dryRun && !f.quiet) process.stderr.write(`${streamedNote}\n`);
  if (pushed) process.stderr.write(pushLine(pushed));
  for (const d of r.plan.dropped) process.stderr.write(`shardshift: warning: ${d.name} not carried: ${d.reason}\n`);
  if (f.dryRun) {
    const note = partialNote(r.plan.target.path);
    process.stdout.write(describePlan(r.plan) + `\n${note ? `${note}\n` : ''}(dry run: nothing written)\n`);
    return;
  }
  // Information, not a warning: what was left out and why. Model data the output lacks is always
  // listed; state a consumer regenerates or never needs only with --verbose.
  for (const s of skippedSummary(r.plan, f.verbose ? 'all' : 'data')) process.stderr.write(`note: skipped ${s}\n`);
  const pl = partLine(r);
  if (pl) {
    process.stdout.write(pl);
    return;
  }
  const rate = r.seconds > 0 ? r.bytesWritten / r.seconds : 0;
  process.stdout.write(
    `wrote ${r.plan.target.path}: ${r.plan.files.length} file${r.plan.files.length === 1 ? '' : 's'}, ${formatBytes(r.bytesWritten)} in ${r.seconds.toFixed(2)} s (${formatBytes(rate)}/s)\n`,
  );
}
