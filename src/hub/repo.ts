/**
 * Which hub repository a user named, where the hub is, and who is asking: `org/name[@revision]`,
 * `HF_ENDPOINT`, `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`, the older name Python tools still read).
 * Also turns the hub client's errors into one readable message naming the repository and what to
 * do: a token without access, a gated repo, a missing repo or revision, an unreachable hub.
 */
import { ShardshiftError, badInput, usage } from '../util/errors.js';

export const DEFAULT_ENDPOINT = 'https://huggingface.co';

export interface HubRepo {
  /** `org/name`. */
  readonly id: string;
  /** What the user asked for: a branch, tag or commit (default `main`). */
  readonly revision: string;
  readonly endpoint: string;
  readonly token?: string;
}

/** `org/name` or `org/name@revision`, nothing that could escape a directory. */
export function looksLikeModelId(s: string): boolean {
  return /^[A-Za-z0-9][\w.-]*\/[\w.-]+(@[\w./-]+)?$/.test(s) && !s.startsWith('.') && !s.includes('..');
}

export function hubRepo(idAtRev: string, env: NodeJS.ProcessEnv = process.env): HubRepo {
  if (!looksLikeModelId(idAtRev)) throw usage(`${idAtRev}: not a hub model id (org/name or org/name@revision)`);
  const at = idAtRev.indexOf('@');
  const id = at < 0 ? idAtRev : idAtRev.slice(0, at);
  const revision = at < 0 ? 'main' : idAtRev.slice(at + 1);
  const token = env.HF_TOKEN || env.HUGGING_FACE_HUB_TOKEN || undefined;
  // The JS client refuses tokens that are not hub access tokens; say so before it throws a TypeError.
  if (token && !token.startsWith('hf_')) throw usage(`HF_TOKEN does not look like a hub access token (they start with "hf_"); create one at ${hubEndpoint(env)}/settings/tokens`);
  return { id, revision, endpoint: hubEndpoint(env), token };
}

export function hubEndpoint(env: NodeJS.ProcessEnv = process.env): string {
  return (env.HF_ENDPOINT || DEFAULT_ENDPOINT).replace(/\/+$/, '');
}

/** `org/name@rev` for messages (the revision only when it is not main). */
export function shown(r: HubRepo): string {
  return r.revision === 'main' ? r.id : `${r.id}@${r.revision}`;
}

/** The hub client's error fields we read (its HubApiError), without importing its class into types. */
interface ApiErrorLike {
  statusCode: number;
  url?: string;
  data?: { error?: string; message?: string };
  message: string;
}

function isApiError(e: unknown): e is ApiErrorLike {
  return e instanceof Error && typeof (e as Partial<ApiErrorLike>).statusCode === 'number';
}

/**
 * A failed hub call as one message: `doing` says what was being done ("listing the files of",
 * "downloading model-00001-of-00002.safetensors from").
 */
export function hubFailure(e: unknown, r: HubRepo, doing: string): ShardshiftError {
  if (e instanceof ShardshiftError) return e;
  const where = `${doing} ${shown(r)}`;
  if (isApiError(e)) {
    const text = `${e.data?.error ?? e.data?.message ?? ''}`;
    if (/gated/i.test(text)) return badInput(`${where}: the repository is gated (HTTP ${e.statusCode}); accept its terms on ${r.endpoint}/${r.id} and set HF_TOKEN to a token of that account`);
    if (e.statusCode === 401) return badInput(`${where}: the hub refused access (HTTP 401)${r.token ? '; HF_TOKEN is not valid for this repository' : '; set HF_TOKEN to a token that can read it'} (a repository that does not exist also answers 401)`);
    if (e.statusCode === 403) return badInput(`${where}: the hub refused access (HTTP 403); HF_TOKEN has no access to this repository${/write/i.test(doing) || /push|upload|commit|creat/i.test(doing) ? ' for writing' : ''}`);
    if (e.statusCode === 404) {
      if (/revision|rev id/i.test(text)) return badInput(`${where}: no revision ${r.revision} (a branch, tag or commit of ${r.id})`);
      return badInput(`${where}: not found on ${r.endpoint} (no such repository, revision ${r.revision} or file)`);
    }
    return badInput(`${where}: the hub answered HTTP ${e.statusCode} (${e.message})`);
  }
  const msg = e instanceof Error ? `${e.message}${e.cause instanceof Error ? `: ${e.cause.message}` : ''}` : String(e);
  if (e instanceof TypeError || /fetch failed|ECONNREFUSED|ENOTFOUND|EAI_AGAIN|socket|network/i.test(msg)) {
    return badInput(`${where}: cannot reach the hub at ${r.endpoint} (${msg}); check the network or HF_ENDPOINT, or pass a local directory`);
  }
  return badInput(`${where}: ${msg}`);
}
