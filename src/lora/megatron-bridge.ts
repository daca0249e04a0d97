/**
 * Megatron-Bridge LoRA adapters (`megatron/bridge/peft/lora.py`): a torch_dist checkpoint holding
 * only the adapter tensors (`apply_peft_adapter_filter_to_state_dict`) plus `run_config.yaml`,
 * whose `peft:` section gives `dim` (the rank), `alpha`, `target_modules`, `dropout`.
 *
 * Each adapted linear `<m>` of a layer carries `<m>.adapter.linear_in.weight` (A, [dim, in]) and
 * `<m>.adapter.linear_out.weight` (B, [out, dim]) — stacked over layers as torch_dist saves them
 * (`decoder.layers.self_attention.linear_qkv.adapter.linear_in.weight`, [L, dim, H]) or per layer.
 * `linear_out` rows follow the base weight's layout: per-query-group interleaved q/k/v for
 * `linear_qkv`, `[gate; up]` for `linear_fc1` (the swiglu sharded factory makes the global tensor
 * that). The forward adds `alpha/dim · linear_out(linear_in(x))`; no rsLoRA, no bias.
 *
 * The PEFT view (`AutoBridge.export_adapter_ckpt` → `save_hf_adapter`): fused targets are split
 * into the HF modules by B's rows — `linear_qkv` → q_proj/k_proj/v_proj with the same split as the
 * weight (`split_qkv_weights` with the rank as feature dim), `linear_fc1` → gate_proj/up_proj
 * (`torch.chunk(B, 2)`) — and the shared A is written once per HF module (the same tensor under
 * each name, as Megatron-Bridge does; PEFT then computes B_q·A, B_k·A, B_v·A, exactly the rows of
 * B·A). `linear_proj` → o_proj and `linear_fc2` → down_proj map 1:1.
 */
import { join, dirname } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { openMegatron, type MegatronCheckpoint } from '../megatron/checkpoint.js';
import type { LoraModuleTensors } from '../formats/peft.js';
import type { CheckpointSource } from '../formats/types.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import { badInput, unsupported } from '../util/errors.js';
import { rowConcat, rows, allRows, type RowSegment, produceBox } from '../lazy/expr.js';
import type { ModelConfig } from '../models/config.js';
import type { LayerParam } from '../models/spec.js';
import { MEGATRON_IGNORED } from '../models/dense.js';
import { fill, type Skipped } from '../bridge/map.js';
import { familyOf } from '../models/registry.js';
import { readTextFile } from '../io/file.js';

/**
 * The Megatron linears Megatron-Bridge's LoRA adapts (its `target_modules` names), in its order.
 * What each becomes on the HF side — module names, how B's rows split, the shapes — is the
 * family table's (`Family.layerParams`), not repeated here.
 */
export const MB_TARGETS = ['self_attention.linear_qkv', 'self_attention.linear_proj', 'mlp.linear_fc1', 'mlp.linear_fc2'] as const;
export type MbTarget = (typeof MB_TARGETS)[number];

export interface MbPeftConfig {
  readonly file: string;
  readonly target: string;
  readonly dim: number;
  readonly alpha: number;
  readonly dropout: number;
  readonly targetModules: readonly string[];
  readonly raw: Readonly<Record<string, unknown>>;
}

/** One factor of one layer: a stacked tensor at [layer], or a per-layer tensor. */
export interface LayerFactor {
  readonly src: SourceTensor;
  readonly prefix: readonly number[];
}

export interface MbAdapterModule {
  readonly layer: number;
  readonly target: MbTarget;
  readonly linearIn: LayerFactor;
  readonly linearOut: LayerFactor;
}

export interface MbAdapter {
  readonly checkpoint: MegatronCheckpoint;
  readonly config: MbPeftConfig;
  readonly runConfigPath: string;
  /** Sorted by layer, then target. */
  readonly modules: readonly MbAdapterModule[];
  readonly numLayers: number;
  /** Entries left out by a named rule (extra state, optimizer, base weights). */
  readonly skipped: readonly Skipped[];
  close(): Promise<void>;
}

/** The `peft:` section of run_config.yaml (in the iteration directory or the run directory). */
async function readPeftSection(iterDir: string): Promise<{ cfg: MbPeftConfig; path: string }> {
  let path = join(iterDir, 'run_config.yaml');
  let text: string | undefined = await readTextFile(path).catch(() => undefined);
  if (text === undefined) {
    path = join(dirname(iterDir), 'run_config.yaml');
    text = await readTextFile(path).catch(() => undefined);
  }
  if (text === undefined) {
    throw badInput(`${iterDir}: no run_config.yaml (here or in the run directory); a Megatron-Bridge LoRA checkpoint records its dim and alpha there`, join(iterDir, 'run_config.yaml'));
  }
  let doc: unknown;
  try {
    doc = parseYaml(text, { customTags: [], uniqueKeys: false });
  } catch (e) {
    throw badInput(`${path}: not valid YAML (${(e as Error).message})`, path);
  }
  const peft = (doc as Record<string, unknown> | null)?.peft;
  if (!peft || typeof peft !== 'object') throw badInput(`${path}: no peft: section (is this a LoRA fine-tuning checkpoint?)`, path);
  const p = peft as Record<string, unknown>;
  const target = String(p._target_ ?? '');
  const cls = target.slice(target.lastIndexOf('.') + 1);
  if (cls !== 'LoRA' && cls !== 'VLMLoRA') {
    throw unsupported(`${path}: peft._target_ ${target || '(none)'} is not supported; shardshift reads Megatron-Bridge LoRA adapters (megatron.bridge.peft.lora.LoRA)${cls === 'CanonicalLoRA' ? ' — CanonicalLoRA keeps separate q/k/v adapters' : cls === 'DoRA' ? ' — DoRA has a magnitude vector' : ''}`, path);
  }
  for (const k of ['normalize_moe_lora', 'experts_shared_outer_loras']) if (p[k] === true) throw unsupported(`${path}: peft.${k} (MoE LoRA) is not supported`, path);
  const dim = p.dim ?? 32;
  const alpha = p.alpha ?? 32;
  if (typeof dim !== 'number' || !Number.isInteger(dim) || dim <= 0) throw badInput(`${path}: peft.dim must be a positive integer`, path);
  if (typeof alpha !== 'number' || !Number.isFinite(alpha)) throw badInput(`${path}: peft.alpha must be a number`, path);
  const tm = p.target_modules ?? ['linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2'];
  if (!Array.isArray(tm) || !tm.every((x) => typeof x === 'string')) throw badInput(`${path}: peft.target_modules must be a list of names`, path);
  const dropout = typeof p.dropout === 'number' ? p.dropout : 0;
  return { cfg: { file: path, target, dim, alpha, dropout, targetModules: tm as string[], raw: p }, path };
}

const ADAPTER_KEY = /^decoder\.layers\.(?:(\d+)\.)?(self_attention\.linear_qkv|self_attention\.linear_proj|mlp\.linear_fc1|mlp\.linear_fc2)\.adapter\.(linear_in|linear_out)\.weight$/;

/** Opens a Megatron-Bridge LoRA checkpoint (run directory or iter_* directory). */
export async function openMbAdapter(path: string): Promise<MbAdapter> {
  const ck = await openMegatron(path);
  try {
    const { cfg, path: rc } = await readPeftSection(ck.resolved.iterDir);
    const src: CheckpointSource = ck.source;
    const parts = new Map<string, { layer: number; target: MbTarget; in?: LayerFactor; out?: LayerFactor }>();
    const skipped: Skipped[] = [];
    const unknown: string[] = [];
    let stackedLayers: number | undefined;
    const add = (layer: number, target: MbTarget, which: string, f: LayerFactor): void => {
      const key = `${layer}:${target}`;
      const p = parts.get(key) ?? { layer, target };
      if (which === 'linear_in') p.in = f;
      else p.out = f;
      parts.set(key, p);
    };
    for (const t of src.tensors.values()) {
      const m = ADAPTER_KEY.exec(t.name);
      if (m) {
        const target = m[2] as MbTarget;
        if (m[1] !== undefined) {
          if (t.shape.length !== 2) throw badInput(`${t.name}: a per-layer LoRA factor must be 2-D, it is [${t.shape.join(', ')}]`, src.path, t.name);
          add(Number(m[1]), target, m[3]!, { src: t, prefix: [] });
        } else {
          if (t.shape.length !== 3) throw badInput(`${t.name}: a stacked LoRA factor must be [layers, rows, cols], it is [${t.shape.join(', ')}]`, src.path, t.name);
          if (stackedLayers !== undefined && stackedLayers !== t.shape[0]) throw badInput(`${t.name}: holds ${t.shape[0]} layers, other adapter tensors ${stackedLayers}`, src.path, t.name);
          stackedLayers = t.shape[0]!;
          for (let l = 0; l < t.shape[0]!; l++) add(l, target, m[3]!, { src: t, prefix: [l] });
        }
        continue;
      }
      const rule = MEGATRON_IGNORED.find((r) => r.pattern.test(t.name));
      if (rule) skipped.push({ name: t.name, reason: rule.reason, carriesData: rule.carriesData });
      else if (!t.name.includes('.adapter.')) skipped.push({ name: t.name, reason: 'base weight in the adapter checkpoint (the base comes from --base)', carriesData: false });
      else unknown.push(t.name);
    }
    if (unknown.length) throw unsupported(`${src.path}: adapter tensors shardshift does not know: ${unknown.slice(0, 6).join(', ')}${unknown.length > 6 ? ', …' : ''} (MoE, CanonicalLoRA or DoRA adapters are not supported)`, src.path);
    const modules: MbAdapterModule[] = [];
    for (const p of parts.values()) {
      if (!p.in || !p.out) throw badInput(`${src.path}: layer ${p.layer} ${p.target} has ${p.in ? 'linear_in' : 'linear_out'} but no ${p.in ? 'linear_out' : 'linear_in'}`, src.path);
      const rIn = p.in.src.shape[p.in.prefix.length]!;
      const rOut = p.out.src.shape[p.out.prefix.length + 1]!;
      if (rIn !== rOut) throw badInput(`${src.path}: layer ${p.layer} ${p.target}: rank mismatch: linear_in has ${rIn} rows but linear_out has ${rOut} columns`, src.path, p.in.src.name);
      if (rIn !== cfg.dim) throw badInput(`${src.path}: layer ${p.layer} ${p.target}: the adapter tensors have rank ${rIn} but ${rc} gives dim ${cfg.dim}`, src.path, p.in.src.name);
      modules.push({ layer: p.layer, target: p.target, linearIn: p.in, linearOut: p.out });
    }
    if (!modules.length) throw badInput(`${src.path}: no LoRA adapter tensors (…adapter.linear_in.weight / linear_out.weight)`, src.path);
    modules.sort((a, b) => a.layer - b.layer || MB_TARGETS.indexOf(a.target) - MB_TARGETS.indexOf(b.target));
    const numLayers = Math.max(...modules.map((m) => m.layer)) + 1;
    return { checkpoint: ck, config: cfg, runConfigPath: rc, modules, numLayers: stackedLayers ?? numLayers, skipped, close: () => src.close() };
  } catch (e) {
    await ck.source.close();
    throw e;
  }
}

/** A lazy target as a source (for code that reads factors as sources). */
export function asSource(t: TargetTensor): SourceTensor {
  return { name: t.name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, where: t.describe, read: (b, o) => produceBox(t, b, o) };
}

/**
 * The base weight a target adapts at `layer`, from the family table: its HF pieces (q/k/v,
 * gate/up, or one), its kind and its Megatron shape [rows, in].
 */
function baseParam(c: ModelConfig, layer: number, target: MbTarget, file: string): LayerParam {
  const fam = familyOf(c);
  const p = fam.layerParams(c, layer).find((x) => x.megatron === `${target}.weight`);
  if (!p) throw unsupported(`${file}: an adapter for layer ${layer} ${target}, which ${fam.description} does not have there (only dense linear adapters are supported)`, file);
  if (p.kind !== 'qkv' && p.kind !== 'gated' && p.kind !== 'copy') throw unsupported(`${file}: layer ${layer} ${target} is a ${typeof p.kind === 'object' ? p.kind.id : p.kind} parameter in ${fam.description}; its LoRA factors have no PEFT split shardshift knows`, file);
  return p;
}

/** The row segments of each HF piece of a fused `linear_out` [rows, dim] (at `prefix`), as the base weight splits. */
function splitRows(c: ModelConfig, p: LayerParam, f: LayerFactor): RowSegment[][] {
  if (p.kind === 'copy') return [[allRows(f.src, [...f.prefix])]];
  if (p.kind === 'gated') {
    const F = p.shape[0]! / 2;
    return [[rows(f.src, 0, F, [...f.prefix])], [rows(f.src, F, F, [...f.prefix])]];
  }
  const hn = c.kvChannels;
  const r = c.numAttentionHeads / c.numQueryGroups;
  const groups = Array.from({ length: c.numQueryGroups }, (_, g) => g * (r + 2) * hn);
  return [
    groups.map((b) => rows(f.src, b, r * hn, [...f.prefix])),
    groups.map((b) => rows(f.src, b + r * hn, hn, [...f.prefix])),
    groups.map((b) => rows(f.src, b + (r + 1) * hn, hn, [...f.prefix])),
  ];
}

/**
 * The adapter as PEFT LoRA modules on HF names (lazy views of the Megatron tensors): fused B split
 * by rows, A shared. Checks every factor's shape against the model config.
 */
export function mbToPeftModules(c: ModelConfig, a: MbAdapter): LoraModuleTensors[] {
  const out: LoraModuleTensors[] = [];
  const file = a.checkpoint.source.path;
  for (const m of a.modules) {
    if (m.layer >= c.numLayers) throw badInput(`${file}: adapter for layer ${m.layer} but the model has ${c.numLayers} layers`, file);
    const base = baseParam(c, m.layer, m.target, file);
    const [rowsOut, colsIn] = base.shape as [number, number];
    const inShape = m.linearIn.src.shape.slice(m.linearIn.prefix.length);
    const outShape = m.linearOut.src.shape.slice(m.linearOut.prefix.length);
    const dim = a.config.dim;
    if (inShape[0] !== dim || inShape[1] !== colsIn || outShape[0] !== rowsOut || outShape[1] !== dim) {
      throw badInput(
        `${file}: layer ${m.layer} ${m.target}: linear_in [${inShape.join(', ')}] / linear_out [${outShape.join(', ')}] do not fit the base model, which needs [${dim}, ${colsIn}] / [${rowsOut}, ${dim}] (an adapter for a different base?)`,
        file,
        m.linearIn.src.name,
      );
    }
    const inT = rowConcat(`${m.linearIn.src.name}[${m.layer}]`, m.linearIn.src.dtype, [colsIn], [allRows(m.linearIn.src, [...m.linearIn.prefix])], `${m.linearIn.src.name}${m.linearIn.prefix.length ? `[${m.layer}]` : ''}`);
    const pieces = splitRows(c, base, m.linearOut);
    base.hf.forEach((template, k) => {
      // The HF module: the base weight's name without `.weight`.
      const name = fill(template, m.layer).replace(/\.weight$/, '');
      const hf = name.slice(name.lastIndexOf('.') + 1);
      const segs = pieces[k]!;
      const b = rowConcat(`${name}.lora_B.weight`, m.linearOut.src.dtype, [dim], segs, `${m.linearOut.src.name}${m.linearOut.prefix.length ? `[${m.layer}]` : ''} rows for ${hf}`);
      out.push({ name, kind: 'linear', a: asSource({ ...inT, name: `${name}.lora_A.weight` }), b: asSource(b) });
    });
  }
  return out;
}
