/**
 * `shardshift push <dir> org/name[@branch]` (and `convert … --push-to-hub`): a finished output to
 * the hub as one commit, checked against its manifest first; files the branch already holds with
 * the same bytes are not uploaded, so pushing the same output again uploads nothing.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { pushToHub, type PushResult } from '../hub/push.js';
import { MANIFEST_NAME } from '../exec/manifest.js';
import { readTextFile } from '../io/file.js';
import { badInput, usage } from '../util/errors.js';
import { formatBytes } from '../util/size.js';
import { modelSourceKind } from '../plan/sources.js';

export interface PushFlags {
  createRepo?: boolean;
  private?: boolean;
  message?: string;
  json?: boolean;
  quiet?: boolean;
}

/** The SHA-256 of each file the output's manifest records (the manifest itself excluded). */
async function manifestHashes(dir: string): Promise<Map<string, string> | undefined> {
  const p = join(dir, MANIFEST_NAME);
  if (!existsSync(p)) return undefined;
  let m: { files?: Record<string, { sha256?: unknown }> };
  try {
    m = JSON.parse(await readTextFile(p));
  } catch (e) {
    throw badInput(`${p}: not valid JSON (${(e as Error).message}); nothing was pushed`, p);
  }
  return new Map(Object.entries(m.files ?? {}).flatMap(([k, v]) => (typeof v?.sha256 === 'string' ? [[k, v.sha256] as [string, string]] : [])));
}

export async function pushOutput(dir: string, target: string, f: PushFlags, log?: (m: string) => void): Promise<PushResult> {
  if ((await modelSourceKind(dir)) === 'missing') throw usage(`${dir}: no such directory`);
  if (dir.replace(/\/+$/, '').endsWith('.partial') || existsSync(`${dir.replace(/\/+$/, '')}.partial`)) throw usage(`${dir}: an unfinished output (a .partial is there); finish or resume the conversion before pushing`);
  return pushToHub(dir, target, { createRepo: f.createRepo, private: f.private, message: f.message, log, expected: await manifestHashes(dir) });
}

export function pushLine(p: PushResult): string {
  return p.uploaded.length
    ? `pushed ${p.uploaded.length} file${p.uploaded.length === 1 ? '' : 's'} (${formatBytes(p.bytesUploaded)}; ${p.unchanged} already there) to ${p.repo}@${p.branch}: ${p.commitUrl}\n`
    : `${p.repo}@${p.branch} already holds these ${p.unchanged} files; nothing uploaded (head ${p.commitUrl})\n`;
}

export async function runPush(dir: string, target: string, f: PushFlags): Promise<void> {
  const r = await pushOutput(dir, target, f, f.quiet || f.json ? undefined : (m) => process.stderr.write(`${m}\n`));
  if (f.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
  else process.stdout.write(pushLine(r));
}
