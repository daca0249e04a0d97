/**
 * Step configuration: schema defaults ← a YAML config (`-c default` = the step's shipped
 * `default.yaml`, or a path) ← `key=value` dotlist overrides. Nested YAML mappings and dotted
 * override keys address the same parameters (`parallel: {tp: 2}` ≡ `parallel.tp=2`).
 */
import { stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml } from 'yaml';
import { usage, badInput } from '../util/errors.js';
import { canonicalKey, parseParam, type Step, type StepParams } from './registry.js';
import { readTextFile } from '../io/file.js';

/** Where the package's step configs live: `steps/<step>/default.yaml` at the package root. */
export function stepConfigDir(step: Step): string {
  const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
  return join(root, 'steps', ...step.name.split('/'));
}

/** Flattens nested mappings into dotted keys. */
function flatten(obj: Record<string, unknown>, prefix = '', out: Record<string, unknown> = {}): Record<string, unknown> {
  for (const [k, v] of Object.entries(obj)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === 'object' && !Array.isArray(v)) flatten(v as Record<string, unknown>, key, out);
    else out[key] = v;
  }
  return out;
}

export async function loadConfigFile(step: Step, nameOrPath: string): Promise<Record<string, unknown>> {
  const isPath = nameOrPath.includes('/') || nameOrPath.endsWith('.yaml') || nameOrPath.endsWith('.yml');
  const path = isPath ? nameOrPath : join(stepConfigDir(step), `${nameOrPath}.yaml`);
  if (!(await stat(path).then((s) => s.isFile(), () => false))) {
    throw usage(`${step.name}: no config ${isPath ? path : `named ${JSON.stringify(nameOrPath)} (looked for ${path})`}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(await readTextFile(path));
  } catch (e) {
    throw badInput(`${path}: not valid YAML (${(e as Error).message})`, path);
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== 'object' || Array.isArray(doc)) throw badInput(`${path}: a step config must be a YAML mapping`, path);
  return flatten(doc as Record<string, unknown>);
}

/** `key=value` tokens → entries; a token without `=` is a usage error. */
export function parseDotlist(tokens: readonly string[]): Array<[string, string]> {
  return tokens.map((t) => {
    const i = t.indexOf('=');
    if (i <= 0) throw usage(`override ${JSON.stringify(t)} is not key=value`);
    return [t.slice(0, i), t.slice(i + 1)];
  });
}

/** Defaults ← config file ← overrides, each value checked against the step's schema. */
export async function resolveParams(step: Step, config: string | undefined, overrides: readonly string[]): Promise<StepParams> {
  const out: Record<string, string | number | boolean | null> = {};
  for (const [k, spec] of Object.entries(step.params)) if (spec.default !== undefined) out[k] = spec.default;
  if (config) for (const [k, v] of Object.entries(await loadConfigFile(step, config))) out[canonicalKey(step, k)] = parseParam(step, canonicalKey(step, k), v);
  for (const [k, v] of parseDotlist(overrides)) out[canonicalKey(step, k)] = parseParam(step, canonicalKey(step, k), v);
  for (const [k, spec] of Object.entries(step.params)) {
    if (spec.required && (out[k] === undefined || out[k] === null)) throw usage(`${step.name}: ${k} is required (pass ${k}=…)`);
  }
  // Sizes given as text in defaults become bytes.
  for (const [k, spec] of Object.entries(step.params)) if (spec.type === 'size' && typeof out[k] === 'string') out[k] = parseParam(step, k, out[k]);
  return out;
}
