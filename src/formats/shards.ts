/**
 * Sharded checkpoints: splitting into shard files and the Hugging Face `*.index.json` that maps
 * each tensor to its shard, and reading that index back — shared by safetensors and torch.
 */
import type { OutputFile } from '../lazy/types.js';
import { badInput } from '../util/errors.js';
import { readTextFile } from '../io/file.js';

/**
 * The `weight_map` of an HF `*.index.json`: tensor name → shard file, each a plain file name
 * beside the index (never a path that leaves its directory) that `isShard` accepts.
 */
export async function readWeightMap(path: string, isShard: (name: string) => boolean, what: string): Promise<Map<string, string>> {
  let json: unknown;
  try {
    json = JSON.parse(await readTextFile(path));
  } catch (e) {
    throw badInput(`${path}: not valid JSON (${(e as Error).message})`, path);
  }
  const wm = (json as { weight_map?: unknown })?.weight_map;
  if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) throw badInput(`${path}: has no weight_map object`, path);
  const m = new Map<string, string>();
  for (const [k, v] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof v !== 'string' || v.includes('/') || v.includes('\\') || v === '..' || !isShard(v)) {
      throw badInput(`${path}: weight_map entry ${k} names ${JSON.stringify(v)}, not a ${what} file beside the index`, path, k);
    }
    m.set(k, v);
  }
  return m;
}

/** transformers 5's `save_pretrained` default `max_shard_size` ("50GB" = 5·10¹⁰ bytes; 4.x used "5GB"). */
export const DEFAULT_MAX_SHARD_SIZE = 50_000_000_000;

/**
 * Splits tensors into shards the way huggingface_hub's `split_state_dict_into_shards` does
 * (greedy in the given order; a tensor larger than the limit gets a shard of its own).
 */
export function planShards<T extends { byteLength: number }>(tensors: readonly T[], maxShardSize: number): T[][] {
  const shards: T[][] = [];
  let cur: T[] = [];
  let size = 0;
  for (const t of tensors) {
    if (t.byteLength > maxShardSize) {
      shards.push([t]);
      continue;
    }
    if (cur.length && size + t.byteLength > maxShardSize) {
      shards.push(cur);
      cur = [];
      size = 0;
    }
    cur.push(t);
    size += t.byteLength;
  }
  if (cur.length) shards.push(cur);
  return shards;
}

/** `model.safetensors` for one shard, `model-00002-of-00003.safetensors` for several. */
export function shardName(prefix: string, ext: string, i: number, count: number): string {
  if (count === 1) return `${prefix}.${ext}`;
  const p5 = (n: number): string => String(n).padStart(5, '0');
  return `${prefix}-${p5(i + 1)}-of-${p5(count)}.${ext}`;
}

/** The index file as transformers writes it (`json.dumps(index, indent=2, sort_keys=True) + "\n"`). */
export function indexFile(relPath: string, weightMap: ReadonlyArray<[string, string]>, totalSize: number): OutputFile {
  const sorted = [...weightMap].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
  const index = { metadata: { total_size: totalSize }, weight_map: Object.fromEntries(sorted) };
  const bytes = Buffer.from(JSON.stringify(index, null, 2) + '\n', 'utf8');
  return { relPath, size: bytes.length, parts: [bytes] };
}
