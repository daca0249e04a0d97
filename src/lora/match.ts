/**
 * Which modules a PEFT LoRA config targets, and each module's rank and alpha — the rules of peft
 * 0.21 (`tuners/tuners_utils.py: check_target_module_exists`, `utils/other.py: get_pattern_key`,
 * `tuners/lora/model.py: _create_and_replace`, `tuners/lora/layer.py: update_layer`), applied to
 * module names as they appear in the base checkpoint (`model.layers.0.self_attn.q_proj`).
 */
import { unsupported } from '../util/errors.js';
import type { LoraAdapterConfig } from '../formats/peft.js';

/**
 * A Python `re` pattern as a JS RegExp (`u` flag). Named groups `(?P<n>…)`/`(?P=n)` are rewritten;
 * constructs JS lacks are refused by name rather than matched differently.
 */
export function pyRegex(pattern: string, anchored: 'full' | 'start', where: string): RegExp {
  if (/\(\?[aiLmsux]+\)|\(\?[aiLmsux-]+:|\\[AZ]/.test(pattern)) {
    throw unsupported(`${where}: the Python regular expression ${JSON.stringify(pattern)} uses inline flags or \\A/\\Z, which shardshift does not translate`);
  }
  const js = pattern.replace(/\(\?P</g, '(?<').replace(/\(\?P=(\w+)\)/g, '\\k<$1>');
  try {
    return new RegExp(anchored === 'full' ? `^(?:${js})$` : `^(?:${js})`, 'u');
  } catch (e) {
    throw unsupported(`${where}: cannot use the regular expression ${JSON.stringify(pattern)} (${(e as Error).message})`);
  }
}

const cache = new Map<string, RegExp>();
function re(key: string, build: () => RegExp): RegExp {
  let r = cache.get(key);
  if (!r) cache.set(key, (r = build()));
  return r;
}

/** `re.match(rf"(.*\.)?({key})$", name)` — peft's get_pattern_key test for one pattern key. */
function patternKeyMatches(key: string, name: string, where: string): boolean {
  return re(`pk\0${key}`, () => pyRegex(`(.*\\.)?(${key})$`, 'start', where)).test(name);
}

/** peft's get_pattern_key + dict lookup: the first key (in file order) matching `name`, else `dflt`. */
export function patternValue(patterns: ReadonlyArray<readonly [string, number]>, name: string, dflt: number, where: string): number {
  for (const [k, v] of patterns) if (patternKeyMatches(k, name, where)) return v;
  // get_pattern_key falls back to the name itself, which is then looked up as a key.
  for (const [k, v] of patterns) if (k === name) return v;
  return dflt;
}

/** Rank, alpha and scaling (a Python float: alpha/r, or alpha/sqrt(r) with rsLoRA) of one module. */
export function moduleScaling(cfg: LoraAdapterConfig, name: string): { r: number; alpha: number; scaling: number } {
  const r = patternValue(cfg.rankPattern, name, cfg.r, `${cfg.file}: rank_pattern`);
  const alpha = patternValue(cfg.alphaPattern, name, cfg.loraAlpha, `${cfg.file}: alpha_pattern`);
  return { r, alpha, scaling: cfg.useRslora ? alpha / Math.sqrt(r) : alpha / r };
}

function listMatch(list: readonly string[], name: string): boolean {
  return list.includes(name) || list.some((k) => name.endsWith(`.${k}`));
}

/** Why a module is or is not adapted: `true`, or a reason it is not. */
export function targetStatus(cfg: LoraAdapterConfig, name: string): true | string {
  const where = cfg.file;
  const ex = cfg.excludeModules;
  if (ex !== null) {
    if (typeof ex === 'string' ? re(`full\0${ex}`, () => pyRegex(ex, 'full', `${where}: exclude_modules`)).test(name) : listMatch(ex, name)) return 'excluded by exclude_modules';
  }
  if (cfg.modulesToSave?.some((m) => re(`mts\0${m}`, () => pyRegex(`(^|.*\\.)${m}($|\\..*)`, 'start', `${where}: modules_to_save`)).test(name))) {
    return 'in modules_to_save';
  }
  const t = cfg.targetModules;
  if (t === null) return 'target_modules is empty';
  if (typeof t === 'string') {
    if (t === 'all-linear') return true; // decided by the caller (every linear layer except the output layer)
    return re(`full\0${t}`, () => pyRegex(t, 'full', `${where}: target_modules`)).test(name) ? true : 'not matched by target_modules';
  }
  if (t.includes(name)) return true; // named directly: layers_to_transform does not apply
  if (!t.some((k) => name.endsWith(`.${k}`))) return 'not matched by target_modules';
  const idx = cfg.layersToTransform;
  if (idx === null || (Array.isArray(idx) && idx.length === 0)) return true;
  let layer: number | undefined;
  const patterns = cfg.layersPattern;
  if (patterns === null || patterns.length === 0) {
    const m = /^.*?\.[^.]*\.(\d+)\./u.exec(name);
    layer = m ? Number(m[1]) : undefined;
  } else {
    for (const p of patterns) {
      const m = re(`lp\0${p}`, () => pyRegex(`(?:^|.*?\\.)${p}\\.(?P<idx>\\d+)\\.`, 'start', `${where}: layers_pattern`)).exec(name);
      if (m) {
        layer = Number(m.groups!.idx);
        break;
      }
    }
  }
  if (layer === undefined) return 'no layer index in the name (layers_to_transform)';
  const ok = typeof idx === 'number' ? layer === idx : idx.includes(layer);
  return ok ? true : `layer ${layer} not in layers_to_transform`;
}
