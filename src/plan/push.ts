/**
 * A finished output to the hub (`--push-to-hub`, `shardshift push`, the steps' `push_to_hub`): the
 * output must be finished (no `.partial` beside it) and its files must still hold the SHA-256s its
 * manifest records; then `hub/push.ts` uploads what the branch does not already hold.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { pushToHub, type PushResult } from '../hub/push.js';
import { MANIFEST_NAME } from '../exec/manifest.js';
import { readTextFile } from '../io/file.js';
import { badInput, usage } from '../util/errors.js';
import { modelSourceKind } from './sources.js';

export interface PushOutputOptions {
  readonly createRepo?: boolean;
  readonly private?: boolean;
  readonly message?: string;
  readonly env?: NodeJS.ProcessEnv;
  readonly log?: (m: string) => void;
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

export async function pushOutput(dir: string, target: string, o: PushOutputOptions = {}): Promise<PushResult> {
  if ((await modelSourceKind(dir)) === 'missing') throw usage(`${dir}: no such directory`);
  const d = dir.replace(/\/+$/, '');
  if (d.endsWith('.partial') || existsSync(`${d}.partial`)) throw usage(`${dir}: an unfinished output (a .partial is there); finish or resume the conversion before pushing`);
  return pushToHub(dir, target, { createRepo: o.createRepo, private: o.private, message: o.message, env: o.env, log: o.log, expected: await manifestHashes(dir) });
}

/** `org/name[@prefix]` → the branch one checkpoint of a batch goes to: `org/name@[prefix-]iter_0001000`. */
export function iterationTarget(target: string, iteration: string): string {
  const at = target.indexOf('@');
  return at < 0 ? `${target}@${iteration}` : `${target}-${iteration}`;
}
