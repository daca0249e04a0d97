/**
 * Format conversion (safetensors ↔ torch ↔ DCP): the plan — every target tensor, every output
 * file, every entry that cannot be carried — built and checked before a byte is written, then run
 * through the bounded-memory executor into an atomic output.
 */
import type { LogitsReport } from './logits.js';
import type { PushResult } from '../hub/push.js';
import type { Skipped } from '../bridge/map.js';
import { stat } from 'node:fs/promises';
import { extname, basename, join } from 'node:path';
import { openCheckpoint, writeFormat, FORMAT_NAMES, type CheckpointSource, type FormatName, type TargetTensor } from '../checkpoints/registry.js';
import type { OutputFile } from '../lazy/types.js';
import type { DType } from '../tensor/dtype.js';
import { usage } from '../util/errors.js';
import { castTo } from '../lazy/expr.js';
import type { ProgressEvent } from '../exec/executor.js';
import { writeOutput, type OutputOutcome } from '../exec/output.js';
import { partResult, recordPlanned } from '../exec/parts.js';
import type { PyValue } from '../pickle/values.js';

export interface ConvertOptions {
  to: (typeof FORMAT_NAMES)[number];
  /** Source format, when detection should be skipped. */
  from?: FormatName;
  maxMemory?: number;
  maxShardSize?: number;
  dcpFiles?: number;
  /** Cast floating-point tensors to this dtype. */
  dtype?: DType;
  overwrite?: boolean;
  /** Hash whole source files into the output manifest. */
  hashSource?: boolean;
  dryRun?: boolean;
  onProgress?: (e: ProgressEvent) => void;
  /** Stops the run; a directory output keeps its finished files for a resume (as after Ctrl-C). */
  signal?: AbortSignal;
}

export interface ConvertPlan {
  readonly source: { path: string; format: string; tensors: number; bytes: number };
  readonly target: { path: string; format: string; kind: 'dir' | 'file' };
  readonly files: ReadonlyArray<{ path: string; bytes: number; tensors: number }>;
  /** Entries the target cannot hold (data not carried: warned about). */
  readonly dropped: ReadonlyArray<{ name: string; reason: string }>;
  /** Source entries left out by a named rule (optimizer state, RNG, TE extra state ...). */
  readonly skipped?: readonly Skipped[];
  readonly sideFiles: readonly string[];
  readonly totalBytes: number;
  /** Decisions worth showing (model family, where the config came from, iteration chosen ...). */
  readonly notes?: readonly string[];
  /** Target tensors stored in another dtype than the requested one, and why (a family's precision rule). */
  readonly dtypeExceptions?: ReadonlyArray<{ name: string; dtype: string; reason: string }>;
  /** The dtype asked for (`--dtype` or its default), when the conversion has one. */
  readonly dtype?: string;
}

export interface ConvertResult {
  readonly plan: ConvertPlan;
  readonly seconds: number;
  readonly bytesWritten: number;
  /** 'reused': the output already held this finished conversion and was kept (`reuseComplete`). */
  readonly outcome: 'dry-run' | OutputOutcome;
  /** The hub commit, when the step pushed its output (`push_to_hub`). */
  readonly push?: PushResult;
  /** The logits comparison, when the step ran one (`verify_logits`). */
  readonly logits?: LogitsReport;
}

/** File extensions of single-file checkpoints, by the format they name. */
const FILE_EXTENSIONS: Readonly<Record<string, string>> = { '.safetensors': 'safetensors', '.bin': 'torch', '.pt': 'torch', '.pth': 'torch', '.distcp': 'dcp' };

/**
 * Refuses an output path whose extension names a checkpoint file the target does not write as one
 * file (`--to safetensors … x.pt` made a directory called `x.pt`; `--to megatron … y.safetensors` a
 * directory called `y.safetensors`). `to` is any `convert --to` target.
 */
export function checkOutputName(out: string, to: string): void {
  const ext = extname(out).toLowerCase();
  const named = FILE_EXTENSIONS[ext];
  if (!named) return;
  if ((to === 'safetensors' && ext === '.safetensors') || (to === 'torch' && named === 'torch')) return;
  const single = to === 'safetensors' ? ' (or a .safetensors name for one file)' : to === 'torch' ? ' (or a .bin, .pt or .pth name for one file)' : '';
  throw usage(`output ${out}: ${ext} names a ${named} file, but --to ${to} writes ${single ? 'this output as a directory' : 'a directory'}; give a directory name${single}`);
}

/** Output kind from the destination's name: a known file extension means one file. */
function outputKind(out: string, to: FormatName): { kind: 'dir' | 'file'; singleFile?: string } {
  checkOutputName(out, to);
  const ext = extname(out);
  if (to === 'safetensors' && ext === '.safetensors') return { kind: 'file', singleFile: basename(out) };
  if (to === 'torch' && ['.bin', '.pt', '.pth'].includes(ext)) return { kind: 'file', singleFile: basename(out) };
  return { kind: 'dir' };
}

/** A target that copies a source tensor, optionally casting floating-point ones. */
function targetFor(src: CheckpointSource, name: string, dtype: DType | undefined): TargetTensor {
  const s = src.tensors.get(name)!;
  const copy: TargetTensor = { kind: 'produced', name, dtype: s.dtype, shape: s.shape, byteLength: s.byteLength, produce: (b, out) => s.read(b, out), describe: `${src.format}:${s.where}` };
  return dtype && isFloat(s.dtype) ? castTo(copy, dtype) : copy;
}

function isFloat(d: DType): boolean {
  return d === 'F32' || d === 'F16' || d === 'BF16' || d === 'F64' || d === 'F8_E4M3' || d === 'F8_E5M2';
}

export async function convert(srcPath: string, outPath: string, opts: ConvertOptions): Promise<ConvertResult> {
  const t0 = performance.now();
  const src = await openCheckpoint(srcPath, opts.from);
  try {
    const { kind, singleFile } = outputKind(outPath, opts.to);
    const targets = [...src.tensors.keys()].map((n) => targetFor(src, n, opts.dtype));
    const objects = new Map<string, PyValue>();
    const opaque: Array<{ name: string; reason: string }> = [];
    for (const [n, o] of src.objects) {
      if (o.opaque) opaque.push({ name: n, reason: `could not be decoded safely: ${o.opaque}` });
      else objects.set(n, o.value);
    }
    const report = writeFormat(opts.to, targets, {
      maxShardSize: opts.maxShardSize,
      singleFile,
      dcpFiles: opts.dcpFiles,
      tree: opts.to === 'torch' ? src.tree : undefined,
      objects,
      metadata: src.format === 'safetensors' && src.metadata.size ? src.metadata : undefined,
    });
    if (kind === 'file' && report.files.length !== 1) throw usage(`${outPath}: this output needs ${report.files.length} files; give a directory path`);
    checkComplete(targets, report.files);
    const srcIsDir = (await stat(srcPath)).isDirectory();
    const sideFiles = kind === 'dir' && srcIsDir ? src.sideFiles : [];
    const plan: ConvertPlan = {
      source: { path: srcPath, format: src.format, tensors: src.tensors.size, bytes: [...src.tensors.values()].reduce((s, t) => s + t.byteLength, 0) },
      target: { path: outPath, format: opts.to, kind },
      files: filePlan(report.files),
      dropped: [...opaque, ...report.dropped],
      sideFiles,
      totalBytes: report.files.reduce((s, f) => s + f.size, 0),
    };
    return await finish(plan, t0, opts.dryRun, () =>
      writeOutput(srcPath, outPath, kind, report.files, sideFiles.map((rel) => ({ from: join(src.root, rel), to: rel })), {
        ...opts,
        manifest: { command: `convert --to ${opts.to}`, sourceFormat: src.format, targetFormat: opts.to, sourceDir: src.root, sourceFiles: src.dataFiles },
      }),
    );
  } finally {
    await src.close();
  }
}

/** The plan's view of output files: path, size and how many tensor parts each holds. */
export function filePlan(files: readonly OutputFile[]): ConvertPlan['files'] {
  return files.map((f) => ({ path: f.relPath, bytes: f.size, tensors: f.parts.filter((p) => typeof p === 'object' && 'kind' in p).length }));
}

/** Every target tensor (or chunk) must be written exactly once across the output files. */
export function checkComplete(targets: readonly TargetTensor[], files: readonly OutputFile[]): void {
  const seen = new Map<TargetTensor, number>();
  for (const f of files) for (const p of f.parts) if (typeof p === 'object' && 'kind' in p) seen.set(p.tensor, (seen.get(p.tensor) ?? 0) + 1);
  const missing = targets.filter((t) => !seen.has(t)).map((t) => t.name);
  const twice = [...seen].filter(([, n]) => n > 1).map(([t]) => t.name);
  if (missing.length || twice.length) throw new Error(`internal: plan incomplete (missing ${missing.slice(0, 5).join(', ')}; written twice ${twice.slice(0, 5).join(', ')})`);
}

/**
 * The end every use case shares: a dry run returns the plan alone; otherwise `write` writes the
 * output (atomically, `exec/output.ts`) and the result reports the plan's bytes. Await it inside
 * the use case's `try` so its sources stay open until the output is complete.
 */
export async function finish(plan: ConvertPlan, t0: number, dryRun: boolean | undefined, write: () => Promise<OutputOutcome | void>): Promise<ConvertResult> {
  if (dryRun) {
    recordPlanned({ source: plan.source.path, path: plan.target.path, kind: plan.target.kind, files: plan.files.length });
    return { plan, seconds: (performance.now() - t0) / 1000, bytesWritten: 0, outcome: 'dry-run' };
  }
  const outcome = (await write()) ?? 'written';
  // A part of a partitioned run wrote its own files only.
  const part = partResult();
  const bytesWritten = outcome === 'reused' ? 0 : part ? part.bytes : plan.totalBytes;
  return { plan, seconds: (performance.now() - t0) / 1000, bytesWritten, outcome };
}

