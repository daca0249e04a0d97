/**
 * Errors shardshift reports to users. Every failure a user can cause (bad input, wrong flags)
 * is a `ShardshiftError` whose message names the file and tensor involved; the CLI prints just
 * the message and exits non-zero. Anything else is a bug and keeps its stack.
 */
export type ErrorCode =
  | 'BAD_INPUT' // the checkpoint is malformed, truncated, inconsistent or unsafe
  | 'UNSUPPORTED' // well-formed, but something shardshift does not handle (named)
  | 'USAGE' // flags or paths that cannot work
  | 'IO' // the filesystem said no
  | 'ABORTED'; // the caller's AbortSignal stopped the run (a directory output stays resumable)

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

/** The run was stopped through its AbortSignal; `reason` is the signal's. */
export function aborted(message: string, reason?: unknown): ShardshiftError {
  return new ShardshiftError('ABORTED', message, undefined, undefined, { cause: reason });
}

export function usage(message: string): ShardshiftError {
  return new ShardshiftError('USAGE', message);
}

/** What to tell a user about a filesystem error, by errno code. */
const ERRNO_HINTS: Readonly<Record<string, string>> = {
  ENOSPC: 'no space left on the device; free space or choose another output path, then re-run',
  EDQUOT: 'the disk quota is exhausted; free space or choose another output path, then re-run',
  EROFS: 'the filesystem is read-only; choose a writable output path',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  ENOTDIR: 'a component of the path is not a directory',
  EISDIR: 'is a directory',
  ENOENT: 'no such file or directory',
  EEXIST: 'already exists',
  EMFILE: 'too many open files (raise the limit: ulimit -n)',
  ENFILE: 'too many open files on the system',
  EIO: 'the device reported an I/O error',
  EFBIG: 'the file is too large for this filesystem',
  ENAMETOOLONG: 'the path is too long',
};

/** Whether `e` is an error from a system call (it has an errno code). */
export function isErrno(e: unknown): e is NodeJS.ErrnoException {
  return e instanceof Error && typeof (e as NodeJS.ErrnoException).code === 'string' && typeof (e as NodeJS.ErrnoException).syscall === 'string';
}

/**
 * A filesystem error as one readable message naming `path` (Node's own text — "ENOSPC: no
 * space left on device, write" — names neither the file nor what to do).
 */
export function ioError(e: NodeJS.ErrnoException, path: string | undefined): ShardshiftError {
  const where = path ?? e.path ?? 'a file';
  const hint = ERRNO_HINTS[e.code!] ?? e.message;
  return new ShardshiftError('IO', `${where}: ${hint} (${e.code} in ${e.syscall})`, where, undefined, { cause: e });
}
