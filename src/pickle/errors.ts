/**
 * Errors of the pickle reader and writer. Messages name the problem in Python's terms (the
 * global as `module.attribute`, the opcode) and where it happened (byte offset, file/record).
 */

export interface UnpicklingErrorInfo {
  /** Byte offset of the opcode that failed. */
  pos?: number;
  /** The file (and record) being read, e.g. `model.pt:archive/data.pkl`. */
  source?: string;
  /** The global involved, as `module.attribute`. */
  global?: string;
  cause?: unknown;
}

/** A pickle that is malformed, truncated, too large, or asks for something that is not allowed. */
export class UnpicklingError extends Error {
  override readonly name = 'UnpicklingError';
  /** The message without the location suffix. */
  readonly reason: string;
  readonly pos: number | undefined;
  readonly source: string | undefined;
  readonly global: string | undefined;

  constructor(reason: string, info: UnpicklingErrorInfo = {}) {
    super(withLocation(reason, info.pos, info.source), info.cause === undefined ? undefined : { cause: info.cause });
    this.reason = reason;
    this.pos = info.pos;
    this.source = info.source;
    this.global = info.global;
  }
}

/** A value that cannot be written as a pickle. */
export class PicklingError extends Error {
  override readonly name = 'PicklingError';
}

function withLocation(reason: string, pos: number | undefined, source: string | undefined): string {
  if (pos === undefined && source === undefined) return reason;
  if (pos === undefined) return `${reason} (in ${source})`;
  return `${reason} (at byte ${pos}${source === undefined ? '' : ` of ${source}`})`;
}
