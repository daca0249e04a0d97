/** shardshift's library entry point. */
export * from './tensor/dtype.js';
export { castBytes, canCast } from './tensor/cast.js';
export type { Box } from './tensor/layout.js';
export * from './pickle/values.js';
export { unpickle, pickle } from './pickle/index.js';
export { openCheckpoint, detectFormat, writeFormat, FORMATS, FORMAT_NAMES } from './checkpoints/registry.js';
export type { CheckpointSource, SourceObject, FormatName } from './formats/types.js';
export type { SourceTensor, TargetTensor, ProducedTensor, CastTensor, OutputFile } from './lazy/types.js';
export { convert, type ConvertOptions, type ConvertPlan, type ConvertResult } from './plan/convert.js';
export { inspectCheckpoint, type InspectReport } from './plan/inspect.js';
// Every command of the CLI, as the function it calls (docs/library.md has one example each).
export { convertHfToMegatron, convertMegatronToHf, type ModelConvertOptions } from './plan/model-convert.js';
export { convertDcpToHf, type DcpToHfOptions } from './plan/dcp-to-hf.js';
export { mergeLora, type MergeLoraOptions } from './plan/lora-convert.js';
export { exportMbAdapterToPeft, mergeMbToHf, mergeMbToMegatron, type MbLoraOptions } from './plan/lora-mb.js';
export { convertHfToNxd, convertNxdToHf, type NxdConvertOptions } from './plan/nxd-convert.js';
export { verifyOutput, diffCheckpoints, type VerifyReport, type DiffReport, type CheckProgress } from './plan/verify.js';
export { parseIterations, selectIterations, type IterationChoice, type RunIteration } from './plan/iterations.js';
export { runStep, type RunStepOptions } from './steps/run.js';
export { listSteps, getStep, BatchRun, type BatchItem, type Step, type StepParams } from './steps/registry.js';
export { resolveModel } from './hub/download.js';
export { pushToHub, type PushOptions, type PushResult } from './hub/push.js';
export { openHubSource, type HubSource, type HubSourceOptions } from './plan/hub-source.js';
export { track, type Tracked } from './exec/progress-stream.js';
export type { ProgressEvent } from './exec/executor.js';
export type { OutputOutcome } from './exec/output.js';
export { ShardshiftError, type ErrorCode } from './util/errors.js';
export { VERSION } from './util/version.js';
