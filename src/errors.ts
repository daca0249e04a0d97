/**
 * Errors shardshift reports to users. Every failure a user can cause (bad input, wrong flags)
 * is a `ShardshiftError` whose message names the file and tensor involved; the CLI prints just
 * the message and exits non-zero. Anything else is a bug and keeps its stack.
 */
export type ErrorCode =
  | 'BAD_INPUT' // the checkpoint is malformed, truncated, inconsistent or unsafe
  | 'UNSUPPORTED' // well-formed, but something shardshift does not handle (named)
  | 'USAGE' // flags or paths that cannot work
  | 'IO'; // the filesystem said no

export class ShardshiftError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly file?: string,
    readonly tensor?: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'ShardshiftError';
  }
}

export function badInput(message: string, file?: string, tensor?: string, cause?: unknown): ShardshiftError {
  return new ShardshiftError('BAD_INPUT', message, file, tensor, { cause });
}

export function unsupported(message: string, file?: string, tensor?: string): ShardshiftError {
  return new ShardshiftError('UNSUPPORTED', message, file, tensor);
}

export function usage(message: string): ShardshiftError {
  return new ShardshiftError('USAGE', message);
}
