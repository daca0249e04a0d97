/**
 * A step run from the library: the same parameter resolution as `shardshift steps run` (schema
 * defaults, then the `config` file, then `key=value` overrides, each checked against the schema)
 * and the same runner. Hub ids in the parameters are resolved as the CLI resolves them.
 */
import type { ConvertResult } from '../plan/convert.js';
import type { ProgressEvent } from '../exec/executor.js';
import { resolveModel } from '../hub/download.js';
import { resolveParams } from './config.js';
import { getStep, type BatchRun, type StepParams } from './registry.js';
// The steps that register themselves (as the CLI's imports do), so every step is runnable here.
import './nxd.js';

export interface RunStepOptions {
  /** `-c`: a config name shipped with the step (`default`) or a YAML file. */
  readonly config?: string;
  readonly dryRun?: boolean;
  readonly onProgress?: (e: ProgressEvent) => void;
  /** Where `$CONVERT_OUTPUT_DIR`, `$NEMO_RUN_DIR` and `$HF_TOKEN` are read (default process.env). */
  readonly env?: NodeJS.ProcessEnv;
  /** Where hub downloads report what they fetch (the CLI prints it). */
  readonly log?: (message: string) => void;
}

/** `overrides` as the CLI takes them (`['megatron_path=…', 'parallel.tp=2']`) or as an object. */
export async function runStep(name: string, overrides: readonly string[] | Readonly<Record<string, string | number | boolean>> = [], opts: RunStepOptions = {}): Promise<{ params: StepParams; result: ConvertResult | BatchRun }> {
  const step = getStep(name);
  const list = Array.isArray(overrides) ? overrides : Object.entries(overrides).map(([k, v]) => `${k}=${String(v)}`);
  const params = await resolveParams(step, opts.config, list);
  const result = await step.run(params, {
    dryRun: !!opts.dryRun,
    env: opts.env ?? process.env,
    onProgress: opts.onProgress,
    resolveModel: (id, what) => resolveModel(id, what, { log: opts.log }),
    log: opts.log,
  });
  return { params, result };
}
