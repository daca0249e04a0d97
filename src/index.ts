/** shardshift's library entry point. */
export * from './tensor/dtype.js';
export { castBytes, canCast } from './tensor/cast.js';
export type { Box } from './tensor/layout.js';
export * from './pickle/values.js';
export { unpickle, pickle } from './pickle/index.js';
export { openCheckpoint, detectFormat, writeFormat, FORMATS, FORMAT_NAMES } from './formats/index.js';
export type { CheckpointSource, SourceTensor, SourceObject, TargetTensor, OutputFile, FormatName } from './formats/types.js';
export { convert, type ConvertOptions, type ConvertPlan, type ConvertResult } from './plan/convert.js';
export { inspectCheckpoint, type InspectReport } from './plan/inspect.js';
export { ShardshiftError } from './errors.js';
export { VERSION } from './version.js';
