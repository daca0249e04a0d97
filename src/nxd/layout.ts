/**
 * The NxD layout: what each HF tensor of a family becomes in NxD / NxD Training rank shards (its
 * role from the family table, `nxdRoles`), the rank targets for HF → NxD, and the reassembly of
 * the HF tensors from rank shards. The parameter layout of
 * NxD's `scripts/checkpoint_converter.py` (CheckpointConverterBase, which NxDT's
 * `checkpoint_converter.py` runs), read from its source (Release 2.29):
 *
 * - PP: layers `model.layers.<i>` keep their global numbers; `create_partitions(pp, layers)` gives
 *   each stage ⌊L/pp⌋ layers, the remainder going to the *last* stages; embed_tokens on pp 0,
 *   lm_head and model.norm on the last pp rank, any other tensor on every pp rank.
 * - TP: embed_tokens / lm_head rows; q/k/v rows; o_proj, down_proj columns; gate_proj and
 *   up_proj rows fused per rank as `mlp.gate_up_proj.weight = [gate_r; up_r]`; the rest replicated.
 * - `qkv_linear` (GQAQKVColumnParallelLinear): `self_attn.qkv_proj.weight_q/_k/_v`, with
 *   `fuse_qkv` one `qkv_proj.weight_qkv = [q_r; k_r; v_r]`. K and V are tiled `kv_size_multiplier`
 *   times (`repeat(kvm, 1)`) and then split in rows; reading takes the first replica and checks the
 *   others hold the same bytes. Q rows and o_proj columns go per rank in head groups: on trn2
 *   contiguously; on any other `hw_backend` (trn1) rank r = i·kv + j holds group j·(tp/kv) + i of
 *   the q/tp-head groups, which the converter computes correctly only when kv·kvm = tp.
 * - megatron style: `language_model.embedding.word_embeddings.weight`,
 *   `language_model.encoder.layers.<i>.{input_layernorm, self_attention.{query_key_value | query,
 *   key_value, dense}, post_attention_layernorm, mlp.{dense_h_to_4h, dense_4h_to_h}}.weight`,
 *   `language_model.encoder.final_layernorm.weight`, `language_model.output_layer.weight`;
 *   `query_key_value = [q_r; k_r; v_r]` (MHA), `query = q_r`, `key_value = [k_r; v_r]` (qkv_linear,
 *   no KV replication and no Q permutation).
 *
 * Every move is a row or column range of a source tensor: nothing is computed, so round trips are
 * bit-exact.
 */
import { join } from 'node:path';
import type { NxdRank, NxdShards, RankTensor } from './shards.js';
import { concatRows, sliceTarget, targetView } from '../lazy/view.js';
import type { SourceTensor, TargetTensor } from '../lazy/types.js';
import { badInput, unsupported, usage } from '../util/errors.js';
import { itemSize, numelOf, type DType } from '../tensor/dtype.js';
import type { Piece } from '../tensor/layout.js';
import { PieceTensor } from '../lazy/pieces.js';
import { fill } from '../bridge/map.js';
import { familyOf } from '../models/registry.js';
import type { ModelConfig } from '../models/config.js';
import { readTextFile } from '../io/file.js';

export type ModelStyle = 'hf' | 'megatron';

/** The converter's layout flags. */
export interface NxdLayout {
  readonly modelStyle: ModelStyle;
  readonly tp: number;
  readonly pp: number;
  readonly kvSizeMultiplier: number;
  readonly qkvLinear: boolean;
  readonly fuseQkv: boolean;
  /** `trn2` selects the contiguous Q order; anything else is the converter's trn1 path. */
  readonly hwBackend: string;
}

/** What the converter reads from config.json. */
export interface NxdHeads {
  readonly q: number;
  readonly kv: number;
  readonly headDim: number;
  readonly hidden: number;
  readonly layers: number;
  readonly file: string;
}

export async function readNxdConfig(file: string): Promise<{ heads: NxdHeads; json: Record<string, unknown> }> {
  let json: Record<string, unknown>;
  try {
    json = JSON.parse(await readTextFile(file)) as Record<string, unknown>;
  } catch (e) {
    throw badInput(`${file}: cannot read the model config (${(e as Error).message})`, file);
  }
  const n = (k: string, d?: number): number => {
    const v = json[k] ?? d;
    if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0) throw badInput(`${file}: ${k} is ${JSON.stringify(json[k])}, expected a positive integer`, file);
    return v;
  };
  const q = n('num_attention_heads');
  const hidden = n('hidden_size');
  const kv = n('num_key_value_heads', q);
  if (hidden % q !== 0) throw badInput(`${file}: hidden_size ${hidden} is not a multiple of num_attention_heads ${q}`, file);
  const headDim = hidden / q; // the converter's head_dim (it ignores config.head_dim)
  if (typeof json.head_dim === 'number' && json.head_dim !== headDim) {
    throw unsupported(`${file}: head_dim ${json.head_dim} differs from hidden_size/num_attention_heads (${headDim}); NxD's converter assumes they are equal`, file);
  }
  if (q % kv !== 0) throw badInput(`${file}: num_attention_heads ${q} is not a multiple of num_key_value_heads ${kv}`, file);
  return { heads: { q, kv, headDim, hidden, layers: n('num_hidden_layers'), file }, json };
}

/** Refuses the layouts the converter cannot produce or read back correctly, naming the flag. */
export function checkLayout(l: NxdLayout, h: NxdHeads): void {
  const { tp, kvSizeMultiplier: kvm } = l;
  if (tp < 1 || l.pp < 1 || kvm < 1) throw usage('--tp_size, --pp_size and --kv_size_multiplier must be at least 1');
  if (h.q % tp !== 0) throw usage(`--tp_size ${tp} does not divide num_attention_heads ${h.q} (${h.file})`);
  if (l.fuseQkv && !l.qkvLinear) throw usage('--fuse_qkv needs --qkv_linear (the converter ignores it otherwise)');
  if (l.modelStyle === 'megatron') {
    if (kvm !== 1) throw usage(`--kv_size_multiplier ${kvm}: the converter's megatron style does not replicate KV heads (its repeat would tile Q and o_proj too); use 1`);
    if (!l.qkvLinear && h.q !== h.kv) throw usage(`megatron style without --qkv_linear fuses q, k, v in equal thirds, which needs num_key_value_heads = num_attention_heads; pass --qkv_linear True for GQA (${h.file})`);
    if (h.kv % tp !== 0 && l.qkvLinear) throw usage(`--tp_size ${tp} does not divide num_key_value_heads ${h.kv} (${h.file})`);
  } else if (l.qkvLinear) {
    if (tp % kvm !== 0) throw usage(`--tp_size ${tp} is not a multiple of --kv_size_multiplier ${kvm}`);
    if ((h.kv * kvm) % tp !== 0) throw usage(`--tp_size ${tp} does not divide num_key_value_heads ${h.kv} × kv_size_multiplier ${kvm}`);
    if (l.hwBackend !== 'trn2' && h.kv * kvm !== tp) {
      throw usage(
        `--hw_backend ${l.hwBackend}: the converter's trn1 Q-head order assigns heads correctly only when num_key_value_heads × kv_size_multiplier = tp_size (here ${h.kv} × ${kvm} ≠ ${tp}); choose --kv_size_multiplier ${tp / h.kv >= 1 && tp % h.kv === 0 ? tp / h.kv : '…'} or --hw_backend trn2`,
      );
    }
  } else if (h.kv % tp !== 0) {
    // The converter row-chunks k_proj / v_proj over the ranks: fewer KV heads than ranks would cut heads in pieces.
    const fix = tp % h.kv === 0 ? `; to run TP ${tp} on ${h.kv} KV heads, replicate them as NxD's GQAQKVColumnParallelLinear does: --qkv_linear --kv_size_multiplier ${tp / h.kv} --hw_backend trn1|trn2 (your hardware)` : '';
    throw usage(`--tp_size ${tp} does not divide num_key_value_heads ${h.kv} (${h.file})${fix}`);
  }
}

/** Whether trn1 and trn2 give different Q/o_proj bytes for this layout (then --hw_backend must be given). */
function hwBackendMatters(l: Pick<NxdLayout, 'modelStyle' | 'qkvLinear' | 'tp'>, h: NxdHeads): boolean {
  return l.modelStyle === 'hf' && l.qkvLinear && h.kv > 1 && h.kv < l.tp;
}

export function requireHwBackend(given: string | undefined, l: Pick<NxdLayout, 'modelStyle' | 'qkvLinear' | 'tp'>, h: NxdHeads): void {
  if (given === undefined && hwBackendMatters(l, h)) {
    throw usage(`give --hw_backend trn1 or trn2: with qkv_linear, ${h.kv} KV heads and tp_size ${l.tp} the two order the Q heads (and o_proj columns) differently across ranks`);
  }
}

/** Q head group held by tp rank r (groups of q/tp heads). */
function qGroupOf(l: NxdLayout, h: NxdHeads, r: number): number {
  if (l.modelStyle === 'megatron' || !l.qkvLinear || l.hwBackend === 'trn2') return r;
  const per = l.tp / h.kv; // kv·kvm = tp: tp/kv ranks share a KV head
  return (r % h.kv) * per + Math.floor(r / h.kv);
}

/** PP rank of layer index `i` among the sorted layer indices (NxD's create_partitions + stage % pp). */
export function ppRankOfLayer(layers: readonly number[], pp: number, i: number): number {
  const L = layers.length;
  const base = Math.floor(L / pp);
  if (base < 1) throw usage(`--pp_size ${pp} is larger than the ${L} layers`);
  const per = Array.from({ length: pp }, () => base);
  for (let k = pp - (L % pp); k < pp && L % pp; k++) per[k]!++;
  const cuts: number[] = [];
  let at = 0;
  for (const c of per.slice(0, -1)) {
    at += c;
    cuts.push(layers[at - 1]!);
  }
  for (let s = 0; s < cuts.length; s++) if (i <= cuts[s]!) return s % pp;
  return cuts.length % pp;
}

export const LAYER = /^model\.layers\.(\d+)\.(.+)$/;

/** The names NxD's converter partitions over TP (it matches names, not the model's table). */
const PARTITIONED_BY_NAME = /(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|embed_tokens|lm_head|wte)\./;

/** What an HF tensor is to NxD's converter: how it is split over TP and renamed. */
export type NxdRole = 'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down' | 'vocab';

/** The HF name suffix NxD's converter recognises each role by (it matches names, not shapes). */
const ROLE_SUFFIX: Record<Exclude<NxdRole, 'vocab'>, string> = { q: 'self_attn.q_proj.weight', k: 'self_attn.k_proj.weight', v: 'self_attn.v_proj.weight', o: 'self_attn.o_proj.weight', gate: 'mlp.gate_proj.weight', up: 'mlp.up_proj.weight', down: 'mlp.down_proj.weight' };

/**
 * The NxD role of each of a family's HF tensors, from its parameter table (`Family.layerParams`,
 * `globalParams`): q/k/v are the pieces of `linear_qkv`, gate/up of a gated `linear_fc1`, o and
 * down the row-parallel `linear_proj` and `linear_fc2`, the vocabulary tensors split by rows;
 * everything else is replicated. What NxD's converter cannot lay out is refused by name: MoE
 * experts, attention biases, custom layout moves, and linears under names it does not recognise.
 */
export function nxdRoles(c: ModelConfig, file: string): Map<string, NxdRole> {
  const fam = familyOf(c);
  const roles = new Map<string, NxdRole>();
  const set = (name: string, role: NxdRole): void => {
    if (role !== 'vocab' && !name.endsWith(`.${ROLE_SUFFIX[role]}`)) throw unsupported(`${file}: ${fam.description}'s ${name} is NxD's ${role} projection, but NxD's converter only recognises it as …${ROLE_SUFFIX[role]}`, file, name);
    roles.set(name, role);
  };
  for (const g of fam.globalParams(c)) if (g.kind === 'vocab') set(g.hf, 'vocab');
  // A tied model's checkpoint may still hold lm_head: the converter splits it by rows like any.
  set('lm_head.weight', 'vocab');
  if (fam.blocks?.(c).length) throw unsupported(`${file}: ${fam.description} has layer stacks beyond the decoder (${fam.blocks(c).map((b) => b.prefix).join(', ')}); NxD's converter lays out decoder layers only`, file);
  for (let i = 0; i < c.numLayers; i++) {
    for (const p of fam.layerParams(c, i)) {
      const names = p.hf.map((h) => fill(h, i));
      if (p.experts !== undefined) throw unsupported(`${file}: ${fam.description} has MoE experts (${p.megatron}); NxD's converter handles dense models only`, file, names[0]);
      if (typeof p.kind === 'object') throw unsupported(`${file}: ${names[0]} is a ${p.kind.id} layout in ${fam.description}; NxD's converter has no such move`, file, names[0]);
      if (p.megatron === 'self_attention.linear_qkv.bias') throw unsupported(`${file}: ${names[0]}: attention biases are not handled by NxD's converter (${fam.description} has them)`, file, names[0]);
      if (p.megatron === 'self_attention.linear_qkv.weight') names.forEach((n, k) => set(n, (['q', 'k', 'v'] as const)[k]!));
      else if (p.megatron === 'self_attention.linear_proj.weight') set(names[0]!, 'o');
      else if (p.megatron === 'mlp.linear_fc1.weight') {
        if (p.kind !== 'gated') throw unsupported(`${file}: ${names[0]}: ${fam.description}'s MLP is not gated; NxD's converter fuses gate_proj and up_proj`, file, names[0]);
        set(names[0]!, 'gate');
        set(names[1]!, 'up');
      } else if (p.megatron === 'mlp.linear_fc2.weight') set(names[0]!, 'down');
    }
  }
  return roles;
}

// ---------------------------------------------------------------------------------------------
// HF → NxD

function megatronName(hfName: string): string {
  if (hfName === 'model.embed_tokens.weight') return 'language_model.embedding.word_embeddings.weight';
  if (hfName === 'model.norm.weight') return 'language_model.encoder.final_layernorm.weight';
  if (hfName === 'lm_head.weight') return 'language_model.output_layer.weight';
  const m = LAYER.exec(hfName);
  if (!m) return hfName.replace(/^model\./, 'language_model.encoder.');
  const rest = m[2]!
    .replace(/^self_attn\./, 'self_attention.')
    .replace(/^self_attention\.o_proj\.weight$/, 'self_attention.dense.weight')
    .replace(/^mlp\.gate_up_proj\.weight$/, 'mlp.dense_h_to_4h.weight')
    .replace(/^mlp\.down_proj\.weight$/, 'mlp.dense_4h_to_h.weight')
    .replace(/^self_attention\.qkv_proj\.weight_q$/, 'self_attention.query.weight')
    .replace(/^self_attention\.qkv_proj\.weight_kv$/, 'self_attention.key_value.weight')
    .replace(/^self_attention\.qkv_proj\.weight$/, 'self_attention.query_key_value.weight');
  return `language_model.encoder.layers.${m[1]}.${rest}`;
}

function split(t: TargetTensor, dim: number, tp: number, r: number, what: string): TargetTensor {
  const d = t.shape[dim]!;
  if (d % tp !== 0) throw usage(`--tp_size ${tp} does not divide dim ${dim} (${d}) of ${t.name}${what}`);
  const n = d / tp;
  return sliceTarget(t, dim, r * n, n);
}

/** One rank's tensors, named as NxD stores them. */
export function nxdRankTargets(src: ReadonlyMap<string, TargetTensor>, roles: ReadonlyMap<string, NxdRole>, l: NxdLayout, h: NxdHeads, tpRank: number, ppRank: number): TargetTensor[] {
  const layers = [...new Set([...src.keys()].map((k) => LAYER.exec(k)).filter((m) => m).map((m) => Number(m![1])))].sort((a, b) => a - b);
  const out = new Map<string, TargetTensor>();
  const put = (name: string, t: TargetTensor): void => void out.set(name, targetView(t, { name }));
  const { tp } = l;
  const qRows = (h.q / tp) * h.headDim;
  const kvRowsPerRank = (h.kv * h.headDim * l.kvSizeMultiplier) / tp;
  const kvRows = h.kv * h.headDim;
  for (const [name, t] of src) {
    const m = LAYER.exec(name);
    if (m) {
      if (ppRankOfLayer(layers, l.pp, Number(m[1])) !== ppRank) continue;
    } else if (name.includes('embed_tokens') || name.includes('wte')) {
      if (ppRank !== 0) continue;
    } else if (name.includes('lm_head') || name === 'model.norm.weight' || name === 'norm_f.weight') {
      if (ppRank !== l.pp - 1) continue;
    }
    const role = roles.get(name);
    const attn = role === 'q' || role === 'k' || role === 'v' || role === 'o' ? role : undefined;
    const prefix = m ? `model.layers.${m[1]}.self_attn.` : '';
    if (attn && attn !== 'o' && l.qkvLinear) {
      const which = attn;
      if (which === 'q') {
        if (t.shape[0] !== h.q * h.headDim) throw badInput(`${name}: ${t.shape[0]} rows, config says ${h.q} heads × ${h.headDim}`, undefined, name);
        put(`${prefix}qkv_proj.weight_q`, sliceTarget(t, 0, qGroupOf(l, h, tpRank) * qRows, qRows));
      } else {
        if (t.shape[0] !== kvRows) throw badInput(`${name}: ${t.shape[0]} rows, config says ${h.kv} KV heads × ${h.headDim}`, undefined, name);
        // Row r·R.. of the tiled tensor is row (r·R mod kv·hd) of the original (R divides kv·hd).
        put(`${prefix}qkv_proj.weight_${which}`, sliceTarget(t, 0, (tpRank * kvRowsPerRank) % kvRows, kvRowsPerRank));
      }
    } else if (attn === 'o') {
      const cols = t.shape[1]!;
      if (l.qkvLinear && cols !== h.q * h.headDim) throw badInput(`${name}: ${cols} columns, config says ${h.q} heads × ${h.headDim}`, undefined, name);
      put(name, l.qkvLinear ? sliceTarget(t, 1, qGroupOf(l, h, tpRank) * qRows, qRows) : split(t, 1, tp, tpRank, ''));
    } else if (attn) {
      put(name, split(t, 0, tp, tpRank, ''));
    } else if (role === 'vocab') {
      put(name, split(t, 0, tp, tpRank, ' (the vocabulary is not padded: it must divide evenly)'));
    } else if (role === 'down') {
      put(name, split(t, 1, tp, tpRank, ''));
    } else if (m && (role === 'gate' || role === 'up')) {
      const fused = `model.layers.${m[1]}.mlp.gate_up_proj.weight`;
      if (out.has(fused)) continue;
      const gate = src.get(`model.layers.${m[1]}.mlp.gate_proj.weight`);
      const up = src.get(`model.layers.${m[1]}.mlp.up_proj.weight`);
      if (!gate || !up) throw badInput(`${name}: layer ${m[1]} needs both gate_proj and up_proj`, undefined, name);
      out.set(fused, concatRows(fused, [split(gate, 0, tp, tpRank, ''), split(up, 0, tp, tpRank, '')]));
    } else if (PARTITIONED_BY_NAME.test(name)) {
      // The converter would try to partition it by its name, and the family table has no such weight.
      throw unsupported(`${name}: not a parameter of the model's family table that NxD's converter can lay out (attention biases and extra projections are not handled)`, undefined, name);
    } else {
      put(name, t); // replicated
    }
  }
  // Layer-wise regrouping: fused QKV (hf + fuse_qkv), megatron's query_key_value / key_value.
  const final = new Map<string, TargetTensor>();
  // The converter pops q/k/v and appends the regrouped tensors: they end each rank's dict.
  const regrouped = new Map<string, TargetTensor>();
  for (const [name, t] of out) {
    const m = /^(model\.layers\.\d+\.self_attn\.)(qkv_proj\.weight_[qkv]|[qkv]_proj\.weight)$/.exec(name);
    if (m && (l.fuseQkv || l.modelStyle === 'megatron')) {
      const p = m[1]!;
      if (l.qkvLinear && l.fuseQkv && l.modelStyle === 'hf') {
        if (!name.endsWith('weight_q')) continue;
        const n = `${p}qkv_proj.weight_qkv`;
        regrouped.set(n, concatRows(n, [out.get(`${p}qkv_proj.weight_q`)!, out.get(`${p}qkv_proj.weight_k`)!, out.get(`${p}qkv_proj.weight_v`)!]));
      } else if (l.qkvLinear) {
        if (name.endsWith('weight_q')) regrouped.set(megatronName(name), targetView(t, { name: megatronName(name) }));
        else if (name.endsWith('weight_k')) {
          const n = megatronName(`${p}qkv_proj.weight_kv`);
          regrouped.set(n, concatRows(n, [out.get(`${p}qkv_proj.weight_k`)!, out.get(`${p}qkv_proj.weight_v`)!]));
        }
      } else {
        if (!name.endsWith('q_proj.weight')) continue;
        const n = megatronName(`${p}qkv_proj.weight`);
        regrouped.set(n, concatRows(n, [out.get(`${p}q_proj.weight`)!, out.get(`${p}k_proj.weight`)!, out.get(`${p}v_proj.weight`)!]));
      }
      continue;
    }
    const n = l.modelStyle === 'megatron' ? megatronName(name) : name;
    final.set(n, n === name ? t : targetView(t, { name: n }));
  }
  return [...final.values(), ...regrouped.values()];
}

// ---------------------------------------------------------------------------------------------
// NxD → HF

/** A global tensor assembled from rank pieces; `replicas` are other copies checked against it. */
interface Acc {
  dtype: DType;
  shape: number[];
  pieces: Piece[];
  replicas: Map<number, Piece[]>;
  where: string[];
}

/** The sub-rows [start, start+count) of a rank tensor placed at `at` of the global tensor. */
function placed(t: RankTensor, at: readonly number[], start = 0, count = t.shape[0]!): Piece {
  const p = t.piece;
  const item = itemSize(t.dtype)!;
  return { file: p.file, strides: p.strides, byteOffset: p.byteOffset + start * (p.strides[0] ?? 0) * item, box: { start: [...at], size: [count, ...t.shape.slice(1)] } };
}

export interface AssembleResult {
  readonly tensors: Map<string, SourceTensor>;
  readonly layout: NxdLayout;
  readonly notes: string[];
}

/**
 * Reassembles the HF tensors from NxD rank shards. Each tensor's split comes from its role in the
 * model's family table (`roles`, see nxdRoles), and NxD's fused tensors (`qkv_proj.weight_*`,
 * `gate_up_proj`) are unfused into the family's HF names of those roles. Detects style, qkv_linear,
 * fuse_qkv and kv_size_multiplier from the names and shapes where the flags were not given.
 */
export function assembleHf(sh: NxdShards, h: NxdHeads, roles: ReadonlyMap<string, NxdRole>, given: Partial<NxdLayout> & { nLayers?: number }): AssembleResult {
  const all = sh.ranks.flatMap((r) => [...r.tensors.keys()]);
  const modelStyle: ModelStyle = given.modelStyle ?? (all.some((n) => n.startsWith('language_model.')) ? 'megatron' : 'hf');
  const qkvLinear = given.qkvLinear ?? all.some((n) => /\.(qkv_proj\.weight_(q|qkv)|self_attention\.query\.weight)$/.test(n));
  const fuseQkv = given.fuseQkv ?? all.some((n) => n.endsWith('qkv_proj.weight_qkv'));
  const notes: string[] = [];
  const tp = sh.tp;
  if (given.tp !== undefined && given.tp !== tp) throw badInput(`${sh.dir}: holds tp_size ${tp} shards, --tp_size says ${given.tp}`, sh.dir);
  if (given.pp !== undefined && given.pp !== sh.pp) throw badInput(`${sh.dir}: holds pp_size ${sh.pp} shards, --pp_size says ${given.pp}`, sh.dir);
  // kv_size_multiplier from the K rows of the first layer found.
  let kvm = given.kvSizeMultiplier;
  const kname = all.find((n) => /\.(qkv_proj\.weight_k|qkv_proj\.weight_qkv|self_attention\.key_value\.weight)$/.test(n));
  if (qkvLinear && kname) {
    const r0 = sh.ranks.find((r) => r.tensors.has(kname))!;
    const rows = r0.tensors.get(kname)!.shape[0]!;
    const qr = (h.q / tp) * h.headDim;
    const kRows = kname.endsWith('weight_qkv') ? (rows - qr) / 2 : kname.endsWith('key_value.weight') ? rows / 2 : rows;
    const found = (kRows * tp) / (h.kv * h.headDim);
    if (!Number.isInteger(found) || found < 1) throw badInput(`${sh.dir}: ${kname} has ${rows} rows per rank, which fits no kv_size_multiplier for ${h.kv} KV heads × ${h.headDim} at tp_size ${tp}`, join(sh.dir, r0.file), kname);
    if (kvm !== undefined && kvm !== found) throw badInput(`${sh.dir}: the KV heads are replicated ${found}× (${kname}: ${kRows} K rows per rank), --kv_size_multiplier says ${kvm}`, join(sh.dir, r0.file), kname);
    kvm = found;
  }
  const layout: NxdLayout = { modelStyle, tp, pp: sh.pp, kvSizeMultiplier: kvm ?? 1, qkvLinear, fuseQkv, hwBackend: given.hwBackend ?? 'trn1' };
  requireHwBackend(given.hwBackend, layout, h);
  checkLayout(layout, h);
  const acc = new Map<string, Acc>();
  const add = (name: string, rt: RankTensor, r: NxdRank, shape: number[], piece: Piece, replica = 0): void => {
    let a = acc.get(name);
    if (!a) acc.set(name, (a = { dtype: rt.dtype, shape, pieces: [], replicas: new Map(), where: [] }));
    if (a.dtype !== rt.dtype) throw badInput(`${name}: ${rt.dtype} in ${r.file} but ${a.dtype} in another rank`, join(sh.dir, r.file), name);
    if (a.shape.some((d, i) => d !== shape[i]) || a.shape.length !== shape.length) throw badInput(`${name}: rank shards of different shapes (${r.file}: ${rt.where})`, join(sh.dir, r.file), name);
    if (replica === 0) {
      a.pieces.push(piece);
      a.where.push(`${r.file}:${rt.name}`);
    } else a.replicas.set(replica, [...(a.replicas.get(replica) ?? []), piece]);
  };
  const qRows = (h.q / tp) * h.headDim;
  const kvAll = h.kv * h.headDim;
  const kvR = (kvAll * layout.kvSizeMultiplier) / tp;
  // The family's HF name of each layer's projection (the inverse of `roles`), for NxD's fused tensors.
  const byRole = new Map<string, string>();
  for (const [n, role] of roles) {
    const m = LAYER.exec(n);
    if (m) byRole.set(`${m[1]} ${role}`, n);
  }
  const hfOf = (layer: string, role: NxdRole, r: NxdRank, local: string): string => {
    const n = byRole.get(`${layer} ${role}`);
    if (!n) throw unsupported(`${local} in ${r.file} holds layer ${layer}'s ${role} projection, which ${h.file}'s model has no tensor for`, join(sh.dir, r.file), local);
    return n;
  };
  const layerIdx = new Set<number>();
  for (const r of sh.ranks) {
    for (const [local, rt] of r.tensors) {
      const name = modelStyle === 'megatron' ? hfNameOfMegatron(local) : local;
      const m = LAYER.exec(name);
      if (m) layerIdx.add(Number(m[1]));
      const cols = rt.shape[1];
      const rowsIn = (n: string, row0: number, start: number, count: number, total: number): void =>
        add(n, rt, r, [total, ...rt.shape.slice(1)], placed(rt, [row0, ...rt.shape.slice(1).map(() => 0)], start, count));
      // NxD's fused attention: qkv_linear's weight_q/_k/_v, fuse_qkv's weight_qkv, megatron style's
      // key_value, or MHA's coalesced qkv_proj.weight.
      const fused = m ? /^self_attn\.qkv_proj\.weight(?:_(q|k|v|qkv|kv))?$/.exec(m[2]!) : null;
      const role = roles.get(name);
      if (m && fused) {
        const kind = fused[1] ?? 'mha';
        const q = (at: number): void => rowsIn(hfOf(m[1]!, 'q', r, local), qGroupOf(layout, h, r.tp) * qRows, at, qRows, h.q * h.headDim);
        const kv = (which: 'k' | 'v', at: number): void => {
          const tiled = r.tp * kvR;
          const rep = Math.floor(tiled / kvAll);
          add(hfOf(m[1]!, which, r, local), rt, r, [kvAll, cols!], placed(rt, [tiled % kvAll, 0], at, kvR), rep);
        };
        if (kind === 'q') q(0);
        else if (kind === 'k' || kind === 'v') kv(kind, 0);
        else if (kind === 'kv') {
          kv('k', 0);
          kv('v', kvR);
        } else if (kind === 'qkv') {
          if (rt.shape[0] !== qRows + 2 * kvR) throw badInput(`${name}: ${rt.shape[0]} rows in ${r.file}, expected q ${qRows} + k ${kvR} + v ${kvR}`, join(sh.dir, r.file), local);
          q(0);
          kv('k', qRows);
          kv('v', qRows + kvR);
        } else {
          // MHA fused query_key_value / coalesced qkv_proj.weight: [q_r; k_r; v_r], hidden/tp rows each.
          const third = rt.shape[0]! / 3;
          if (!Number.isInteger(third)) throw badInput(`${name}: ${rt.shape[0]} rows in ${r.file} do not split into q, k, v thirds`, join(sh.dir, r.file), local);
          (['q', 'k', 'v'] as const).forEach((w, i) => rowsIn(hfOf(m[1]!, w, r, local), r.tp * third, i * third, third, third * tp));
        }
      } else if (m && m[2] === 'mlp.gate_up_proj.weight') {
        const half = rt.shape[0]! / 2;
        rowsIn(hfOf(m[1]!, 'gate', r, local), r.tp * half, 0, half, half * tp);
        rowsIn(hfOf(m[1]!, 'up', r, local), r.tp * half, half, half, half * tp);
      } else if (role === 'o') {
        add(name, rt, r, [rt.shape[0]!, cols! * tp], placed(rt, [0, qGroupOf(layout, h, r.tp) * cols!]));
      } else if (role === 'q' || role === 'k' || role === 'v' || role === 'vocab') {
        rowsIn(name, r.tp * rt.shape[0]!, 0, rt.shape[0]!, rt.shape[0]! * tp);
      } else if (role === 'down') {
        add(name, rt, r, [rt.shape[0]!, cols! * tp], placed(rt, [0, r.tp * cols!]));
      } else if (role !== undefined) {
        throw unsupported(`${local} in ${r.file}: a ${role} projection outside NxD's fused gate_up_proj`, join(sh.dir, r.file), local);
      } else if (PARTITIONED_BY_NAME.test(name)) {
        // The converter partitions by name: a tensor it split that the family table does not know
        // (a bias, an extra projection) cannot be put back together from one rank's copy.
        throw unsupported(`${local} in ${r.file}: not a parameter of ${h.file}'s model that NxD's converter lays out (attention biases and extra projections are not handled)`, join(sh.dir, r.file), local);
      } else {
        // Replicated: the first copy (tp 0 of the first pp rank holding it), as the converter keeps.
        if (!acc.has(name)) add(name, rt, r, [...rt.shape], placed(rt, rt.shape.map(() => 0)));
      }
    }
  }
  const layers = [...layerIdx].sort((a, b) => a - b);
  const want = given.nLayers || h.layers;
  if (layers.length !== h.layers || layers.some((x, i) => x !== i)) {
    throw badInput(`${sh.dir}: the shards hold ${layers.length} layers (${layers.length ? `${layers[0]}..${layers[layers.length - 1]}` : 'none'}), ${h.file} says num_hidden_layers ${h.layers}`, sh.dir);
  }
  if (want !== h.layers) throw usage(`--n_layers ${want} disagrees with num_hidden_layers ${h.layers} in ${h.file}`);
  const tensors = new Map<string, SourceTensor>();
  for (const [name, a] of acc) {
    const covered = a.pieces.reduce((s, p) => s + numelOf(p.box.size), 0);
    if (covered !== numelOf(a.shape)) throw badInput(`${sh.dir}: ${name} is not covered by its rank shards (${covered} of ${numelOf(a.shape)} elements: ${a.where.join(', ')})`, sh.dir, name);
    const reps = [...a.replicas.entries()].sort((x, y) => x[0] - y[0]).map(([k, ps]) => ({ pieces: ps, where: `replica ${k}` }));
    const replicas = reps.length ? { what: 'KV replica', why: 'the shards do not hold kv_size_multiplier identical copies of the KV heads', copies: reps } : undefined;
    tensors.set(name, new PieceTensor(name, a.dtype, a.shape, a.pieces, a.where.join(','), replicas));
  }
  if (layout.kvSizeMultiplier > 1) notes.push(`kv_size_multiplier ${layout.kvSizeMultiplier}: K/V from the first replica, the other ${layout.kvSizeMultiplier - 1} checked byte for byte while reading`);
  notes.push(`NxD ${modelStyle} style, tp_size ${tp}, pp_size ${sh.pp}${qkvLinear ? `, qkv_linear${fuseQkv ? ' + fuse_qkv' : ''}, hw_backend ${layout.hwBackend}` : ''}${sh.xser ? ', xser' : ''}`);
  return { tensors, layout, notes };
}

function hfNameOfMegatron(n: string): string {
  if (n === 'language_model.embedding.word_embeddings.weight') return 'model.embed_tokens.weight';
  if (n === 'language_model.encoder.final_layernorm.weight') return 'model.norm.weight';
  if (n === 'language_model.output_layer.weight') return 'lm_head.weight';
  const m = /^language_model\.encoder\.layers\.(\d+)\.(.+)$/.exec(n);
  if (!m) return n.replace(/^language_model\.encoder\./, 'model.');
  const rest = m[2]!
    .replace(/^self_attention\.dense\.weight$/, 'self_attn.o_proj.weight')
    .replace(/^self_attention\.query_key_value\.weight$/, 'self_attn.qkv_proj.weight')
    .replace(/^self_attention\.query\.weight$/, 'self_attn.qkv_proj.weight_q')
    .replace(/^self_attention\.key_value\.weight$/, 'self_attn.qkv_proj.weight_kv')
    .replace(/^self_attention\./, 'self_attn.')
    .replace(/^mlp\.dense_h_to_4h\.weight$/, 'mlp.gate_up_proj.weight')
    .replace(/^mlp\.dense_4h_to_h\.weight$/, 'mlp.down_proj.weight');
  return `model.layers.${m[1]}.${rest}`;
}

/** HF order: embed, layers by index (attention, mlp, norms as HF lists them), norm, lm_head. */
export function hfOrder(a: string, b: string): number {
  const key = (n: string): [number, number, string] => {
    const m = LAYER.exec(n);
    if (n.includes('embed_tokens')) return [0, 0, n];
    if (m) return [1, Number(m[1]), m[2]!];
    if (n === 'lm_head.weight') return [3, 0, n];
    return [2, 0, n];
  };
  const x = key(a);
  const y = key(b);
  return x[0] - y[0] || x[1] - y[1] || (x[2] < y[2] ? -1 : x[2] > y[2] ? 1 : 0);
}

