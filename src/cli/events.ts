/** `--json` progress: one JSON object per line on stderr (`{"event":"progress",…}`), stdout keeps the final document. */
import type { ProgressEvent } from '../exec/executor.js';

export function jsonEvents(stream: NodeJS.WritableStream): { progress: (e: ProgressEvent) => void } {
  return {
    progress: (e) => stream.write(JSON.stringify({ event: 'progress', file: e.file, bytesDone: e.bytesDone, bytesTotal: e.bytesTotal }) + '\n'),
  };
}
