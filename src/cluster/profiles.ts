/**
 * Cluster profiles: the `[profile]` sections of an `env.toml`, as Nemotron's `-r/--run` and
 * `-b/--batch` read them (its generated `env.slurm.toml` files are accepted as they are):
 * `extends` inheritance (child keys over parent, tables merged), and OmegaConf's
 * `${oc.env:VAR,default}` placeholders (nested defaults too) resolved from the environment.
 *
 * Search order: `--env FILE`, `$SHARDSHIFT_ENV`, `$NEMOTRON_ENV_FILE` (the file the user already
 * points Nemotron at), `./env.toml`, then `<config dir>/shardshift/env.toml` (`$XDG_CONFIG_HOME`
 * or `~/.config`). TOML is parsed by smol-toml.
 */
import { parse as parseToml } from 'smol-toml';
import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { readTextFile } from '../io/file.js';
import { usage } from '../util/errors.js';

/** Keys a profile may hold, with their TOML types. Nemotron's keys shardshift has no use for are accepted and ignored (listed in `IGNORED`). */
const KEYS = {
  extends: 'string',
  executor: 'string',
  account: 'string',
  partition: 'string',
  qos: 'string',
  time: 'string',
  nodes: 'integer',
  mem: 'string',
  cpus_per_task: 'integer',
  ntasks_per_node: 'integer',
  gpus_per_node: 'integer',
  gres: 'string',
  constraint: 'string',
  exclusive: 'boolean',
  container_image: 'string',
  /** The container image has shardshift: run the parts inside it (pyxis). */
  container: 'boolean',
  mounts: 'string[]',
  env_vars: 'table',
  startup_commands: 'string[]',
  // shardshift's own: how many parts, and what each array task asks for.
  parts: 'integer',
  cpus_per_part: 'integer',
  mem_per_part: 'string',
  // Kubernetes (executor = "k8s").
  namespace: 'string',
  image: 'string',
  pvc: 'string',
  mount_path: 'string',
} as const;

/** Nemotron keys for its own launcher (ssh tunnels, NeMo-Run staging, image builds, W&B): accepted, not used. */
const IGNORED = new Set(['tunnel', 'host', 'user', 'workspace', 'remote_job_dir', 'lustre_mount', 'build_partition', 'build_include_gpus', 'build_gpus_per_node', 'run_command', 'job_dir', 'identity']);

type KeyType = (typeof KEYS)[keyof typeof KEYS];

export interface Profile {
  readonly name: string;
  readonly file: string;
  readonly executor: string;
  readonly values: Readonly<Record<string, unknown>>;
  /** Keys of Nemotron's launcher that shardshift does not use (said in the submission's notes). */
  readonly ignored: readonly string[];
}

/** Top-level sections that are not profiles (Nemotron's). */
const NOT_PROFILES = new Set(['wandb', 'cli', 'cache', 'artifacts']);

export function envFileCandidates(explicit: string | undefined, env: NodeJS.ProcessEnv, cwd: string): string[] {
  if (explicit) return [resolve(cwd, explicit)];
  const out: string[] = [];
  if (env.SHARDSHIFT_ENV) return [resolve(cwd, env.SHARDSHIFT_ENV)];
  if (env.NEMOTRON_ENV_FILE) out.push(resolve(cwd, env.NEMOTRON_ENV_FILE));
  out.push(join(cwd, 'env.toml'));
  out.push(join(env.XDG_CONFIG_HOME || join(homedir(), '.config'), 'shardshift', 'env.toml'));
  return out;
}

/** `${oc.env:VAR}` / `${oc.env:VAR,default}` (defaults may nest placeholders; `''` is empty). */
export function interpolate(s: string, env: NodeJS.ProcessEnv, where: string): string {
  let out = '';
  let i = 0;
  while (i < s.length) {
    const at = s.indexOf('${', i);
    if (at < 0) {
      out += s.slice(i);
      break;
    }
    out += s.slice(i, at);
    // Find the matching close brace.
    let depth = 0;
    let end = -1;
    for (let j = at; j < s.length; j++) {
      if (s.startsWith('${', j)) {
        depth++;
        j++;
      } else if (s[j] === '}' && --depth === 0) {
        end = j;
        break;
      }
    }
    if (end < 0) throw usage(`${where}: unclosed \${ in ${JSON.stringify(s)}`);
    const body = s.slice(at + 2, end);
    const m = /^oc\.env:([A-Za-z_][A-Za-z0-9_]*)(?:,([\s\S]*))?$/.exec(body);
    if (!m) throw usage(`${where}: ${JSON.stringify('${' + body + '}')} is not an \${oc.env:VAR,default} placeholder (the only interpolation supported)`);
    const value = env[m[1]!];
    if (value !== undefined) out += value;
    else if (m[2] !== undefined) out += m[2] === "''" || m[2] === '""' ? '' : interpolate(m[2], env, where);
    else throw usage(`${where}: the environment variable ${m[1]} is not set and has no default`);
    i = end + 1;
  }
  return out;
}

function typeOf(v: unknown): KeyType | 'other' {
  if (typeof v === 'string') return 'string';
  if (typeof v === 'boolean') return 'boolean';
  if (typeof v === 'number' || typeof v === 'bigint') return Number.isInteger(Number(v)) ? 'integer' : 'other';
  if (Array.isArray(v)) return v.every((x) => typeof x === 'string') ? 'string[]' : 'other';
  if (v && typeof v === 'object' && !(v instanceof Date)) return 'table';
  return 'other';
}

function merge(parent: Record<string, unknown>, child: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...parent };
  for (const [k, v] of Object.entries(child)) {
    const p = out[k];
    out[k] = typeOf(v) === 'table' && typeOf(p) === 'table' ? merge(p as Record<string, unknown>, v as Record<string, unknown>) : v;
  }
  return out;
}

function resolveValues(v: unknown, env: NodeJS.ProcessEnv, where: string): unknown {
  if (typeof v === 'string') return interpolate(v, env, where);
  if (Array.isArray(v)) return v.map((x) => resolveValues(x, env, where));
  if (typeOf(v) === 'table') return Object.fromEntries(Object.entries(v as Record<string, unknown>).map(([k, x]) => [k, resolveValues(x, env, `${where}.${k}`)]));
  return v;
}

/** Reads and resolves profile `name`; every error names the file and the key. */
export async function loadProfile(name: string, opts: { envFile?: string; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<Profile> {
  const env = opts.env ?? process.env;
  const cwd = opts.cwd ?? process.cwd();
  const candidates = envFileCandidates(opts.envFile, env, cwd);
  const file = candidates.find((c) => existsSync(c));
  if (!file) throw usage(`profile ${name}: no env.toml found (looked for ${candidates.join(', ')}); pass --env FILE or set SHARDSHIFT_ENV (docs: README, "Cluster")`);
  let doc: Record<string, unknown>;
  try {
    doc = parseToml(await readTextFile(file)) as Record<string, unknown>;
  } catch (e) {
    throw usage(`${file}: not valid TOML (${(e as Error).message.split('\n')[0]})`);
  }
  const profiles = Object.keys(doc).filter((k) => !NOT_PROFILES.has(k) && typeOf(doc[k]) === 'table');
  if (!profiles.includes(name)) throw usage(`${file} has no profile ${JSON.stringify(name)}; it has: ${profiles.join(', ') || '(none)'}`);
  const chain: string[] = [];
  const build = (n: string): Record<string, unknown> => {
    if (chain.includes(n)) throw usage(`${file}: profile ${n} extends itself (${[...chain, n].join(' → ')})`);
    chain.push(n);
    const own = doc[n];
    if (typeOf(own) !== 'table') throw usage(`${file}: profile ${chain.at(-2)} extends ${JSON.stringify(n)}, which is not a profile in this file`);
    const o = own as Record<string, unknown>;
    for (const [k, v] of Object.entries(o)) {
      if (IGNORED.has(k)) continue;
      const want = (KEYS as Record<string, KeyType>)[k];
      // A profile is configuration the user wrote: its mistakes are usage errors (exit 2).
      if (!want) throw usage(`${file}: [${n}] has an unknown key ${JSON.stringify(k)}; valid keys: ${Object.keys(KEYS).join(', ')} (and Nemotron's launcher keys, ignored: ${[...IGNORED].join(', ')})`);
      if (typeOf(v) !== want) throw usage(`${file}: [${n}] ${k} must be ${want === 'string[]' ? 'a list of strings' : `a ${want}`}, not ${JSON.stringify(v)}`);
    }
    const parent = typeof o.extends === 'string' ? build(o.extends) : {};
    const { extends: _e, ...rest } = o;
    return merge(parent, rest);
  };
  const raw = build(name);
  const ignored = chain.flatMap((n) => Object.keys(doc[n] as Record<string, unknown>).filter((k) => IGNORED.has(k)));
  const values = resolveValues(raw, env, `${file}: [${name}]`) as Record<string, unknown>;
  if (typeof values.executor !== 'string') throw usage(`${file}: profile ${name} names no executor (executor = "slurm" or "k8s")`);
  return { name, file, executor: values.executor, values, ignored: [...new Set(ignored)] };
}
