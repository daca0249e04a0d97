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
export { ShardshiftError } from './util/errors.js';
export { VERSION } from './util/version.js';
