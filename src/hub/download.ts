/**
 * Hugging Face hub model ids → local directories, for the steps that take `hf_model_id`.
 *
 * A local directory is used as it is. A model id (`org/name`, optionally `org/name@revision`) is
 * listed through the hub API (`GET {endpoint}/api/models/{id}/revision/{rev}`) and its files are
 * fetched from `{endpoint}/{id}/resolve/{rev}/{file}`, with `HF_TOKEN` as a bearer token and
 * `HF_ENDPOINT` honoured. Files land in a cache (`$SHARDSHIFT_HUB_CACHE`, else
 * `~/.cache/shardshift/hub`), each downloaded to a temporary name and renamed when complete, so
 * an interrupted download is never mistaken for a finished one.
 */
import { createExclusive } from '../io/create.js';
import { mkdir, rename, stat, rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { badInput, usage } from '../util/errors.js';

const WEIGHTS = /\.(safetensors|bin|pt|pth|h5|msgpack|onnx|gguf|ckpt)$|\.safetensors\.index\.json$|\.bin\.index\.json$/;

export interface HubOptions {
  readonly env?: NodeJS.ProcessEnv;
  /** Print a line per downloaded file. */
  readonly log?: (msg: string) => void;
}

async function isDir(p: string): Promise<boolean> {
  return stat(p).then(
    (s) => s.isDirectory(),
    () => false,
  );
}

export function looksLikeModelId(s: string): boolean {
  return /^[A-Za-z0-9][\w.-]*\/[\w.-]+(@[\w./-]+)?$/.test(s) && !s.startsWith('.') && !s.includes('..');
}

/**
 * A local directory for `idOrPath`: the directory itself, or the downloaded files of a hub model
 * (`what: 'config'` fetches config, generation config and tokenizer files only; `'all'` adds the
 * weights, preferring safetensors).
 */
export async function resolveModel(idOrPath: string, what: 'config' | 'all', opts: HubOptions = {}): Promise<string> {
  if (await isDir(idOrPath)) return idOrPath;
  // A local file (`src/model.safetensors` also reads as org/name) is never a hub id.
  if (await stat(idOrPath).then((st) => !st.isDirectory(), () => false)) throw usage(`${idOrPath} is a file; give the HF model directory (the one holding config.json)`);
  if (!looksLikeModelId(idOrPath)) throw usage(`${idOrPath}: no such directory, and not a hub model id (org/name)`);
  const env = opts.env ?? process.env;
  const [id, revision = 'main'] = idOrPath.split('@') as [string, string?];
  const endpoint = (env.HF_ENDPOINT ?? 'https://huggingface.co').replace(/\/+$/, '');
  const headers: Record<string, string> = { 'user-agent': 'shardshift' };
  if (env.HF_TOKEN) headers.authorization = `Bearer ${env.HF_TOKEN}`;
  const apiUrl = `${endpoint}/api/models/${id}/revision/${encodeURIComponent(revision)}`;
  let res: Response;
  try {
    res = await fetch(apiUrl, { headers });
  } catch (e) {
    throw badInput(`${id}: cannot reach the hub at ${endpoint} (${(e as Error).message}); set HF_ENDPOINT or pass a local directory`);
  }
  if (res.status === 401 || res.status === 403) throw badInput(`${id}: the hub refused access (HTTP ${res.status}); set HF_TOKEN to a token that can read this model`);
  if (res.status === 404) throw badInput(`${id}: no such model (or revision ${revision}) on ${endpoint}`);
  if (!res.ok) throw badInput(`${id}: the hub answered HTTP ${res.status} for ${apiUrl}`);
  const info = (await res.json()) as { siblings?: Array<{ rfilename?: unknown }>; sha?: unknown };
  const files = (info.siblings ?? []).map((s) => s.rfilename).filter((f): f is string => typeof f === 'string' && !f.includes('..') && !f.startsWith('/'));
  let wanted = files.filter((f) => !WEIGHTS.test(f));
  if (what === 'all') {
    const st = files.filter((f) => /\.safetensors$|\.safetensors\.index\.json$/.test(f));
    const bin = files.filter((f) => /(^|\/)pytorch_model.*\.bin$|\.bin\.index\.json$/.test(f));
    const weights = st.length ? st : bin;
    if (!weights.length) throw badInput(`${id}: the model lists no safetensors or pytorch_model*.bin weights`);
    wanted = [...wanted, ...weights];
  }
  const sha = typeof info.sha === 'string' ? info.sha : revision;
  const base = env.SHARDSHIFT_HUB_CACHE ?? join(homedir(), '.cache', 'shardshift', 'hub');
  const dir = join(base, id.replace('/', '--'), sha.replace(/[^\w.-]/g, '_'));
  for (const f of wanted) {
    const dst = join(dir, f);
    if (await stat(dst).then((s) => s.isFile(), () => false)) continue;
    const url = `${endpoint}/${id}/resolve/${encodeURIComponent(sha)}/${f.split('/').map(encodeURIComponent).join('/')}`;
    const r = await fetch(url, { headers });
    if (!r.ok || !r.body) throw badInput(`${id}: downloading ${f} failed (HTTP ${r.status})`);
    await mkdir(dirname(dst), { recursive: true });
    const tmp = `${dst}.download`;
    try {
      const fh = await createExclusive(tmp, { replace: true });
      await pipeline(Readable.fromWeb(r.body as import('node:stream/web').ReadableStream), fh.createWriteStream());
    } catch (e) {
      await rm(tmp, { force: true });
      throw badInput(`${id}: downloading ${f} was interrupted (${(e as Error).message})`);
    }
    await rename(tmp, dst);
    opts.log?.(`downloaded ${id}/${f}`);
  }
  return dir;
}
