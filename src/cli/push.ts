/**
 * `shardshift push <dir> org/name[@branch]` (and `convert … --push-to-hub`): a finished output to
 * the hub as one commit, checked against its manifest first (`plan/push.ts`); files the branch
 * already holds with the same bytes are not uploaded, so pushing the same output again uploads
 * nothing.
 */
import type { PushResult } from '../hub/push.js';
import { pushOutput } from '../plan/push.js';
import { formatBytes } from '../util/size.js';

export { pushOutput } from '../plan/push.js';

export interface PushFlags {
  createRepo?: boolean;
  private?: boolean;
  message?: string;
  json?: boolean;
  quiet?: boolean;
}

export function pushLine(p: PushResult): string {
  return p.uploaded.length
    ? `pushed ${p.uploaded.length} file${p.uploaded.length === 1 ? '' : 's'} (${formatBytes(p.bytesUploaded)}; ${p.unchanged} already there) to ${p.repo}@${p.branch}: ${p.commitUrl}\n`
    : `${p.repo}@${p.branch} already holds these ${p.unchanged} files; nothing uploaded (head ${p.commitUrl})\n`;
}

export async function runPush(dir: string, target: string, f: PushFlags): Promise<void> {
  const r = await pushOutput(dir, target, { ...f, log: f.quiet || f.json ? undefined : (m) => process.stderr.write(`${m}\n`) });
  if (f.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
  else process.stdout.write(pushLine(r));
}
