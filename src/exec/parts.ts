/**
 * Partitioned runs: one conversion cut into `n` parts that separate processes (Slurm array tasks
 * on many nodes, sharing a file system) write into the same `<out>.partial`, then finished by a
 * cheap final step. Once the plan exists every output file is independent of the others, so a
 * part is a set of whole files: the files holding tensor data are dealt out by bytes, and the
 * small files made of plan bytes alone (indexes, DCP `.metadata`, the Megatron tracker) are left
 * to the finalize, which writes them after checking every part's files.
 *
 * Which part a run is lives in an AsyncLocalStorage context rather than in every use case's
 * options: it is a property of the run (set once by the CLI around the whole command), and each
 * of the ten output-writing use cases honours it through `writeOutput` without threading it.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { OutputFile } from '../lazy/types.js';
import { usage } from '../util/errors.js';

/** One part of a partitioned run: index (0-based, as Slurm's SLURM_ARRAY_TASK_ID) of `count`. */
export interface PartSpec {
  readonly index: number;
  readonly count: number;
}

/** How the command that is running writes its output. */
export type Partition =
  /** Write part `index` of `count` into the shared partial; the last part to finish finalizes. */
  | { readonly kind: 'part'; readonly part: PartSpec; readonly argv: readonly string[]; readonly cwd: string }
  /** Check every part and write what depends on all of them (`shardshift finalize`). */
  | { readonly kind: 'finalize' }
  /** Plan only (a dry run), to learn the output before submitting parts to a cluster. */
  | { readonly kind: 'probe' };

/** What a probe learnt: the output the command writes and its files. */
export interface PlannedOutput {
  /** What it converts (the plan's source path). */
  readonly source: string;
  readonly path: string;
  readonly kind: 'dir' | 'file';
  readonly files: number;
}

/** What a part run did, for the CLI's summary line. */
export interface PartResult {
  readonly part: PartSpec;
  readonly out: string;
  readonly files: number;
  readonly bytes: number;
  readonly filesReused: number;
  /** Parts recorded as done, this one included. */
  readonly partsDone: number;
  /** The run completed the output (it was the last part, and finalized). */
  readonly finalized: boolean;
  /** Why it did not finalize although it was the last (another process is finalizing). */
  readonly note?: string;
}

interface RunContext {
  readonly partition: Partition;
  /** Outputs this run has written: a partitioned run splits exactly one. */
  outputs: number;
  result?: PartResult;
  /** Outputs planned (a command converting many checkpoints plans one per checkpoint). */
  planned: PlannedOutput[];
}

const context = new AsyncLocalStorage<RunContext>();

/** Runs `fn` (a whole command) as the given partition of its output. */
export function runPartitioned<T>(partition: Partition, fn: () => Promise<T>): Promise<T> {
  return context.run({ partition, outputs: 0, planned: [] }, fn);
}

/** The partition of the running command, if it is partitioned. */
export function currentPartition(): Partition | undefined {
  return context.getStore()?.partition;
}

/** Counts an output of a partitioned run; a second one is refused (its plan could read the first). */
export function claimPartitionedOutput(out: string): void {
  const c = context.getStore();
  if (!c) return;
  if (c.outputs++ > 0) throw usage(`--part splits one output, and this command writes a second (${out}); run it as its own command`);
}

export function recordPartResult(r: PartResult): void {
  const c = context.getStore();
  if (c) c.result = r;
}

export function recordPlanned(p: PlannedOutput): void {
  const c = context.getStore();
  if (c) c.planned.push(p);
}

/** Every output the command planned, in order. */
export function plannedOutputs(): readonly PlannedOutput[] {
  return context.getStore()?.planned ?? [];
}

/** What the part run in this context did (undefined when it was not a part run). */
export function partResult(): PartResult | undefined {
  return context.getStore()?.result;
}

/** `--part i/n`: 0 ≤ i < n, whole numbers. */
export function parsePart(s: string, flag = '--part'): PartSpec {
  const m = /^(\d+)\/(\d+)$/.exec(s.trim());
  if (!m) throw usage(`${flag} ${s}: expected i/n (part i of n, 0 ≤ i < n; i is the Slurm array task id), e.g. --part 0/4`);
  const index = Number(m[1]);
  const count = Number(m[2]);
  if (count < 1) throw usage(`${flag} ${s}: n must be at least 1`);
  if (count > 10000) throw usage(`${flag} ${s}: at most 10000 parts`);
  if (index >= count) throw usage(`${flag} ${s}: there is no part ${index} of ${count} (parts are numbered 0 to ${count - 1})`);
  return { index, count };
}

/** Files made of plan bytes alone (no tensor data): written by the finalize. */
function holdsTensorData(f: OutputFile): boolean {
  return f.parts.some((p) => typeof p === 'object' && !(p instanceof Uint8Array));
}

/**
 * Which part writes each file: `'final'` for the files without tensor data, else a part index.
 * Longest-processing-time dealing by bytes (largest file first, to the least-loaded part; ties by
 * path and lowest index), so the same plan always splits the same way and the parts' bytes are
 * within one file's size of each other.
 */
export function assignParts(files: readonly OutputFile[], count: number): Map<string, number | 'final'> {
  const out = new Map<string, number | 'final'>();
  const data: OutputFile[] = [];
  for (const f of files) {
    if (holdsTensorData(f)) data.push(f);
    else out.set(f.relPath, 'final');
  }
  data.sort((a, b) => b.size - a.size || (a.relPath < b.relPath ? -1 : a.relPath > b.relPath ? 1 : 0));
  const load = new Array<number>(count).fill(0);
  for (const f of data) {
    let best = 0;
    for (let i = 1; i < count; i++) if (load[i]! < load[best]!) best = i;
    load[best]! += f.size;
    out.set(f.relPath, best);
  }
  return out;
}
