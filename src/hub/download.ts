/**
 * Hugging Face hub model ids → local directories, for every command and step that takes a model
 * id (`hf_model_id`, `--hf-model`, a convert source).
 *
 * A local directory is used as it is. A model id (`org/name`, optionally `org/name@revision`) is
 * resolved to its commit and file list through the hub (`listing.ts`); each file the caller needs
 * is then taken from the Hugging Face cache when it is already there (`cache.ts`: files
 * huggingface_hub downloaded are read in place), or downloaded into it — resumable, verified
 * against the hub's sha256 / git blob id (`transfer.ts`). `HF_HUB_OFFLINE=1` uses the cache only.
 * The directory returned is the cache's snapshot of that commit.
 */
import { mkdir, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { badInput, usage } from '../util/errors.js';
import { CachedRepo, hubCacheRoot } from './cache.js';
import { listRepo, type RemoteFile, type RepoListing } from './listing.js';
import { hubRepo, looksLikeModelId, shown, type HubRepo } from './repo.js';
import { downloadVerified, type TransferOptions } from './transfer.js';

export { looksLikeModelId } from './repo.js';

/** Weight files of any framework: never fetched for a config-only use. */
const WEIGHTS = /\.(safetensors|bin|pt|pth|h5|msgpack|onnx|gguf|ckpt|distcp)$|\.safetensors\.index\.json$|\.bin\.index\.json$/;

export interface HubOptions {
  readonly env?: NodeJS.ProcessEnv;
  /** Print a line per downloaded file. */
  readonly log?: (msg: string) => void;
  readonly transfer?: TransferOptions;
}

/** The model's weights as the hub lists them: safetensors (with their index) if any, else pytorch_model*.bin. */
export function weightFiles(l: RepoListing): RemoteFile[] {
  const st = l.files.filter((f) => /\.safetensors$|\.safetensors\.index\.json$/.test(f.path) && !f.path.includes('/'));
  if (st.length) return st;
  const bin = l.files.filter((f) => /^pytorch_model.*\.bin$|^pytorch_model\.bin\.index\.json$/.test(f.path));
  if (bin.length) return bin;
  throw badInput(`${shown(l.repo)}: the repository lists no safetensors or pytorch_model*.bin weights at its top level (${l.files.length} files: ${l.files.slice(0, 6).map((f) => f.path).join(', ')}${l.files.length > 6 ? ', …' : ''})`);
}

/** Config, generation config, tokenizer, chat template, README …: everything but weights. */
export function sideFilesOf(l: RepoListing): RemoteFile[] {
  return l.files.filter((f) => !WEIGHTS.test(f.path) && f.path !== '.gitattributes');
}

/**
 * Puts `files` of the listed commit into the cache (those it lacks) and returns the snapshot
 * directory. `onFile` hears of each download.
 */
export async function fetchIntoCache(l: RepoListing, files: readonly RemoteFile[], opts: HubOptions = {}): Promise<string> {
  const cache = new CachedRepo(hubCacheRoot(opts.env), l.repo.id);
  for (const f of files) {
    if (await cache.file(l.commit, f.path, f.size)) continue;
    const blob = cache.blob(f.identity.hex);
    const have = await stat(blob).catch(() => undefined);
    if (!have || have.size !== f.size) {
      await mkdir(dirname(blob), { recursive: true });
      await downloadVerified(l.repo, l.commit, f, blob, opts.transfer);
      opts.log?.(`downloaded ${l.repo.id}/${f.path}`);
    }
    await cache.link(l.commit, f.path, f.identity.hex);
  }
  await cache.writeRef(l.repo.revision, l.commit);
  return cache.snapshot(l.commit);
}

/** The commit `repo` resolved to when it was last fetched, and its snapshot (HF_HUB_OFFLINE). */
async function offlineSnapshot(repo: HubRepo, env: NodeJS.ProcessEnv | undefined): Promise<string> {
  const cache = new CachedRepo(hubCacheRoot(env), repo.id);
  const commit = await cache.commitOf(repo.revision);
  const dir = commit ? cache.snapshot(commit) : undefined;
  if (!dir || !(await cache.file(commit!, 'config.json'))) throw badInput(`${shown(repo)}: HF_HUB_OFFLINE is set and the cache (${cache.dir}) holds no snapshot of ${repo.revision} with a config.json`);
  return dir;
}

/**
 * A local directory for `idOrPath`: the directory itself, or the hub model's snapshot in the
 * cache (`what: 'config'` fetches config, generation config, tokenizer and template files only;
 * `'all'` adds the weights, preferring safetensors).
 */
export async function resolveModel(idOrPath: string, what: 'config' | 'all', opts: HubOptions = {}): Promise<string> {
  const st = await stat(idOrPath).catch(() => undefined);
  if (st?.isDirectory()) return idOrPath;
  // A local file (`src/model.safetensors` also reads as org/name) is never a hub id.
  if (st) throw usage(`${idOrPath} is a file; give the HF model directory (the one holding config.json)`);
  if (!looksLikeModelId(idOrPath)) throw usage(`${idOrPath}: no such directory, and not a hub model id (org/name)`);
  const env = opts.env ?? process.env;
  const repo = hubRepo(idOrPath, env);
  if (env.HF_HUB_OFFLINE === '1' || env.HF_HUB_OFFLINE === 'true') return offlineSnapshot(repo, env);
  const l = await listRepo(repo);
  const files = what === 'all' ? [...sideFilesOf(l), ...weightFiles(l)] : sideFilesOf(l);
  if (!files.some((f) => f.path === 'config.json')) throw badInput(`${shown(repo)}: the repository has no config.json`);
  return fetchIntoCache(l, files, opts);
}
