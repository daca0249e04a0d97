/**
 * A base checksum shardshift records beside the adapters it writes (`shardshift-adapter.json`, a
 * file peft and vLLM ignore), and checks when such an adapter is merged: the size and a SHA-256 of
 * the first and last MiB of each weight file of the HF base (the manifest's `sha256-head-tail`),
 * enough to tell a different fine-tune of the same architecture apart without reading the whole
 * model. A base re-sharded into other files no longer matches; `--force-base` waives the check.
 */
import { join } from 'node:path';
import { openCheckpoint } from '../checkpoints/registry.js';
import { badInput } from '../util/errors.js';
import { identifySource } from '../exec/manifest.js';
import { VERSION } from '../util/version.js';
import { readTextFile } from '../io/file.js';

export const ADAPTER_RECORD = 'shardshift-adapter.json';

export interface BaseFingerprint {
  readonly files: ReadonlyArray<{ readonly path: string; readonly size: number; readonly hash: string; readonly hashKind: string }>;
}

/** The fingerprint of an HF model directory's weight files, or undefined when it holds none. */
export async function baseFingerprint(dir: string): Promise<BaseFingerprint | undefined> {
  let files: readonly string[];
  try {
    const src = await openCheckpoint(dir);
    files = src.dataFiles;
    await src.close();
  } catch {
    return undefined;
  }
  if (!files.length) return undefined;
  const rels = [...files].sort();
  const ids = await identifySource(dir, rels, false);
  return { files: ids.map((f, i) => ({ path: rels[i]!, size: f.size, hash: f.hash, hashKind: f.hashKind })) };
}

/** The bytes of shardshift-adapter.json for an exported adapter. */
export function adapterRecord(baseName: string, fp: BaseFingerprint): Buffer {
  return Buffer.from(JSON.stringify({ tool: 'shardshift', version: VERSION, base_model_name_or_path: baseName, base_checksum: fp }, null, 2) + '\n');
}

/**
 * Compares an adapter's recorded base checksum (if it has one) with `baseDir`; returns a note for
 * the plan, or throws naming the first file that differs (unless `force`).
 */
export async function checkRecordedBase(adapterDir: string, baseDir: string, force: boolean): Promise<string | undefined> {
  const path = join(adapterDir, ADAPTER_RECORD);
  let rec: { base_checksum?: BaseFingerprint };
  try {
    rec = JSON.parse(await readTextFile(path)) as { base_checksum?: BaseFingerprint };
  } catch {
    return undefined;
  }
  const want = rec.base_checksum;
  if (!want || !Array.isArray(want.files)) return undefined;
  const have = await baseFingerprint(baseDir);
  const haveBy = new Map((have?.files ?? []).map((f) => [f.path, f]));
  for (const w of want.files) {
    const h = haveBy.get(w.path);
    const why = !h ? `the base has no ${w.path}` : h.size !== w.size ? `${w.path} is ${h.size} bytes, recorded ${w.size}` : h.hash !== w.hash ? `${w.path} has other contents (${w.hashKind} ${h.hash.slice(0, 12)}…, recorded ${w.hash.slice(0, 12)}…)` : undefined;
    if (why) {
      if (force) return `base checksum recorded in ${ADAPTER_RECORD} does not match (${why}); merged anyway (--force-base)`;
      throw badInput(`${path}: the adapter records the base it was exported for, and ${baseDir} is not it: ${why}; pass --force-base if it is the same model stored differently (shapes are checked regardless)`, path);
    }
  }
  return `base checksum recorded in ${ADAPTER_RECORD} matches (${want.files.length} weight file${want.files.length === 1 ? '' : 's'})`;
}
