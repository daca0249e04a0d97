/**
 * Builds the lazy target tensors of an HF → Megatron (torch_dist) or Megatron → HF conversion
 * from a family's parameter map, checking completeness both ways: every source tensor is used
 * or skipped by a named rule, every target tensor is produced, and every shape matches the config.
 */
import type { CheckpointSource, SourceTensor, TargetTensor } from '../formats/types.js';
import type { DcpTensorEntry } from '../formats/dcp.js';
import type { DType } from '../tensor/dtype.js';
import { badInput } from '../errors.js';
import { allRows, castTo, rowConcat, rows, zeroRows, type RowSegment } from '../plan/targets.js';
import { paddedVocab, type ModelConfig } from './config.js';
import { DENSE_GLOBAL_PARAMS, DENSE_LAYER_PARAMS, HF_IGNORED, MEGATRON_IGNORED, type LayerParam } from './dense.js';
import { targetView } from '../plan/view.js';

export interface Skipped {
  readonly name: string;
  readonly reason: string;
}

/** Expected per-layer shape of an HF piece. */
function hfPieceShape(c: ModelConfig, hfName: string): number[] {
  const H = c.hiddenSize;
  const q = c.numAttentionHeads * c.kvChannels;
  const kv = c.numQueryGroups * c.kvChannels;
  const table: Record<string, number[]> = {
    'input_layernorm.weight': [H],
    'post_attention_layernorm.weight': [H],
    'self_attn.q_proj.weight': [q, H],
    'self_attn.k_proj.weight': [kv, H],
    'self_attn.v_proj.weight': [kv, H],
    'self_attn.q_proj.bias': [q],
    'self_attn.k_proj.bias': [kv],
    'self_attn.v_proj.bias': [kv],
    'self_attn.q_norm.weight': [c.kvChannels],
    'self_attn.k_norm.weight': [c.kvChannels],
    'self_attn.o_proj.weight': [H, q],
    'mlp.gate_proj.weight': [c.ffnHiddenSize, H],
    'mlp.up_proj.weight': [c.ffnHiddenSize, H],
    'mlp.down_proj.weight': [H, c.ffnHiddenSize],
  };
  const s = table[hfName];
  if (!s) throw new Error(`internal: no shape rule for ${hfName}`);
  return s;
}

/** Per-layer Megatron shape of a layer parameter. */
function megatronLayerShape(c: ModelConfig, p: LayerParam): number[] {
  const pieces = p.hf.map((h) => hfPieceShape(c, h));
  if (p.kind === 'copy') return pieces[0]!;
  const rowsTotal = pieces.reduce((s, x) => s + x[0]!, 0);
  return [rowsTotal, ...pieces[0]!.slice(1)];
}

function checkShape(t: SourceTensor, want: readonly number[], file: string): void {
  if (t.shape.length !== want.length || t.shape.some((d, i) => d !== want[i])) {
    throw badInput(`${t.name}: shape [${t.shape.join(', ')}] does not match the config, which needs [${want.join(', ')}]`, file, t.name);
  }
}

/** The QKV interleave: per query group, its r query heads, its key head, its value head. */
function qkvSegments(c: ModelConfig, q: SourceTensor, k: SourceTensor, v: SourceTensor): RowSegment[] {
  const hn = c.kvChannels;
  const r = c.numAttentionHeads / c.numQueryGroups;
  const segs: RowSegment[] = [];
  for (let g = 0; g < c.numQueryGroups; g++) {
    segs.push(rows(q, g * r * hn, r * hn), rows(k, g * hn, hn), rows(v, g * hn, hn));
  }
  return segs;
}

export interface ImportOptions {
  /** Skip source tensors the map has no place for (listed as skipped) instead of failing. */
  readonly allowUnmapped?: boolean;
  readonly tp: number;
  readonly makeVocabSizeDivisibleBy: number;
  readonly dtype: DType;
}

/** HF → Megatron torch_dist: global tensors, stacked layers with one chunk per layer. */
export function buildImport(c: ModelConfig, hf: CheckpointSource, opts: ImportOptions): { entries: DcpTensorEntry[]; skipped: Skipped[] } {
  const file = hf.path;
  const used = new Set<string>();
  const missing: string[] = [];
  const get = (name: string, shape: readonly number[]): SourceTensor | undefined => {
    const t = hf.tensors.get(name);
    if (!t) {
      missing.push(name);
      return undefined;
    }
    checkShape(t, shape, file);
    used.add(name);
    return t;
  };
  const entries: DcpTensorEntry[] = [];
  const Vp = paddedVocab(c.vocabSize, opts.makeVocabSizeDivisibleBy, opts.tp);
  for (const g of DENSE_GLOBAL_PARAMS) {
    if (g.when && !g.when(c)) continue;
    const rest = g.kind === 'vocab' ? [c.hiddenSize] : [];
    const want = g.kind === 'vocab' ? [c.vocabSize, c.hiddenSize] : [c.hiddenSize];
    const src = get(g.hf, want);
    if (!src) continue;
    const segs = g.kind === 'vocab' ? [allRows(src), ...(Vp > c.vocabSize ? [zeroRows(Vp - c.vocabSize)] : [])] : [allRows(src)];
    const t = castTo(rowConcat(g.megatron, src.dtype, rest, segs, `${g.hf}${g.kind === 'vocab' && Vp > c.vocabSize ? ` + ${Vp - c.vocabSize} zero rows` : ''}`), opts.dtype);
    entries.push({ name: g.megatron, dtype: opts.dtype, shape: t.shape, chunks: [{ offsets: t.shape.map(() => 0), tensor: t }] });
  }
  for (const p of DENSE_LAYER_PARAMS) {
    if (p.when && !p.when(c)) continue;
    const perLayer = megatronLayerShape(c, p);
    const chunks: Array<{ offsets: number[]; tensor: TargetTensor }> = [];
    for (let i = 0; i < c.numLayers; i++) {
      const srcs = p.hf.map((h) => get(`model.layers.${i}.${h}`, hfPieceShape(c, h)));
      if (srcs.some((s) => !s)) continue;
      const s = srcs as SourceTensor[];
      const segs = p.kind === 'qkv' ? qkvSegments(c, s[0]!, s[1]!, s[2]!) : s.map((x) => allRows(x));
      const dtype = s[0]!.dtype;
      const mixed = s.find((x) => x.dtype !== dtype);
      if (mixed) throw badInput(`${mixed.name}: dtype ${mixed.dtype} differs from ${s[0]!.name} (${dtype})`, file, mixed.name);
      const name = `decoder.layers.${p.megatron}`;
      const layer = rowConcat(name, dtype, perLayer.slice(1), segs, `${p.kind}(${p.hf.map((h) => `model.layers.${i}.${h}`).join(', ')})`);
      chunks.push({ offsets: [i, ...perLayer.map(() => 0)], tensor: withLeadingOne(castTo(layer, opts.dtype)) });
    }
    entries.push({ name: `decoder.layers.${p.megatron}`, dtype: opts.dtype, shape: [c.numLayers, ...perLayer], chunks });
  }
  if (missing.length) {
    throw badInput(`${file}: ${missing.length} tensor(s) the config needs are missing: ${missing.slice(0, 8).join(', ')}${missing.length > 8 ? ', …' : ''}`, file, missing[0]);
  }
  const skipped: Skipped[] = [];
  const unmapped: string[] = [];
  for (const name of hf.tensors.keys()) {
    if (used.has(name)) continue;
    const rule = HF_IGNORED.find((r) => r.pattern.test(name));
    if (rule) skipped.push({ name, reason: rule.reason });
    else if (c.tieEmbeddings && name === 'lm_head.weight') skipped.push({ name, reason: 'tied to model.embed_tokens.weight' });
    else unmapped.push(name);
  }
  if (unmapped.length && opts.allowUnmapped) for (const name of unmapped) skipped.push({ name, reason: 'not mapped (--allow-unmapped)' });
  else if (unmapped.length) {
    throw badInput(`${file}: ${unmapped.length} tensor(s) have no place in a ${c.family} Megatron model: ${unmapped.slice(0, 8).join(', ')}${unmapped.length > 8 ? ', …' : ''} (--allow-unmapped skips them)`, file, unmapped[0]);
  }
  return { entries, skipped };
}

/** A target viewed with a leading dim of 1 (a layer's chunk of a stacked `[L, …]` tensor). */
function withLeadingOne(t: TargetTensor): TargetTensor {
  return targetView(t, { shape: [1, ...t.shape], produce: (box, out) => t.produce({ start: box.start.slice(1), size: box.size.slice(1) }, out) });
}

/** Finds a Megatron layer parameter: stacked `decoder.layers.<p>` [L, …] or per-layer `decoder.layers.<i>.<p>`. */
function layerSource(meg: CheckpointSource, p: LayerParam, i: number, used: Set<string>): { src: SourceTensor; prefix: number[] } | undefined {
  for (const name of [p.megatron, ...(p.aliases ?? [])]) {
    const stacked = meg.tensors.get(`decoder.layers.${name}`);
    if (stacked) {
      used.add(stacked.name);
      return { src: stacked, prefix: [i] };
    }
    const single = meg.tensors.get(`decoder.layers.${i}.${name}`);
    if (single) {
      used.add(single.name);
      return { src: single, prefix: [] };
    }
  }
  return undefined;
}

export interface ExportOptions {
  readonly allowUnmapped?: boolean;
  readonly dtype: DType;
}

/** Megatron → HF: per-layer HF tensors gathered from the (stacked) Megatron tensors. */
export function buildExport(c: ModelConfig, meg: CheckpointSource, opts: ExportOptions): { tensors: TargetTensor[]; skipped: Skipped[] } {
  const file = meg.path;
  const used = new Set<string>();
  const missing: string[] = [];
  const out: TargetTensor[] = [];
  const expect = (t: SourceTensor, prefix: number[], want: readonly number[]): void => {
    const have = t.shape.slice(prefix.length);
    if (have.length !== want.length || have.some((d, k) => d !== want[k])) {
      throw badInput(`${t.name}: shape [${t.shape.join(', ')}] does not match the config, which needs [${prefix.length ? `${c.numLayers}, ` : ''}${want.join(', ')}]`, file, t.name);
    }
    if (prefix.length && t.shape[0] !== c.numLayers) {
      throw badInput(`${t.name}: holds ${t.shape[0]} layers but the config has ${c.numLayers}`, file, t.name);
    }
  };
  for (const g of DENSE_GLOBAL_PARAMS) {
    if (g.when && !g.when(c)) continue;
    const src = meg.tensors.get(g.megatron);
    if (!src) {
      missing.push(g.megatron);
      continue;
    }
    used.add(src.name);
    if (g.kind === 'vocab') {
      if (src.shape.length !== 2 || src.shape[1] !== c.hiddenSize || src.shape[0]! < c.vocabSize) {
        throw badInput(`${src.name}: shape [${src.shape.join(', ')}] cannot hold the ${c.vocabSize}-token vocabulary with hidden size ${c.hiddenSize}`, file, src.name);
      }
      // Megatron pads the vocabulary; HF has exactly vocab_size rows.
      out.push(castTo(rowConcat(g.hf, src.dtype, [c.hiddenSize], [rows(src, 0, c.vocabSize)], `${src.name}[:${c.vocabSize}]`), opts.dtype));
    } else {
      expect(src, [], [c.hiddenSize]);
      out.push(castTo(rowConcat(g.hf, src.dtype, [], [allRows(src)], src.name), opts.dtype));
    }
  }
  for (const p of DENSE_LAYER_PARAMS) {
    if (p.when && !p.when(c)) continue;
    const perLayer = megatronLayerShape(c, p);
    for (let i = 0; i < c.numLayers; i++) {
      const found = layerSource(meg, p, i, used);
      if (!found) {
        missing.push(`decoder.layers.${i}.${p.megatron}`);
        continue;
      }
      const { src, prefix } = found;
      expect(src, prefix, perLayer);
      const hfNames = p.hf.map((h) => `model.layers.${i}.${h}`);
      const rest = perLayer.slice(1);
      if (p.kind === 'copy') {
        out.push(castTo(rowConcat(hfNames[0]!, src.dtype, rest, [allRows(src, prefix)], `${src.name}[${i}]`), opts.dtype));
      } else if (p.kind === 'gated') {
        const F = c.ffnHiddenSize;
        out.push(castTo(rowConcat(hfNames[0]!, src.dtype, rest, [rows(src, 0, F, prefix)], `${src.name}[${i}] gate half`), opts.dtype));
        out.push(castTo(rowConcat(hfNames[1]!, src.dtype, rest, [rows(src, F, F, prefix)], `${src.name}[${i}] up half`), opts.dtype));
      } else {
        const hn = c.kvChannels;
        const r = c.numAttentionHeads / c.numQueryGroups;
        const groups = Array.from({ length: c.numQueryGroups }, (_, g) => g * (r + 2) * hn);
        const q = groups.map((base) => rows(src, base, r * hn, prefix));
        const k = groups.map((base) => rows(src, base + r * hn, hn, prefix));
        const v = groups.map((base) => rows(src, base + (r + 1) * hn, hn, prefix));
        out.push(castTo(rowConcat(hfNames[0]!, src.dtype, rest, q, `${src.name}[${i}] query heads`), opts.dtype));
        out.push(castTo(rowConcat(hfNames[1]!, src.dtype, rest, k, `${src.name}[${i}] key heads`), opts.dtype));
        out.push(castTo(rowConcat(hfNames[2]!, src.dtype, rest, v, `${src.name}[${i}] value heads`), opts.dtype));
      }
    }
  }
  if (missing.length) {
    throw badInput(`${file}: ${missing.length} tensor(s) the config needs are missing: ${missing.slice(0, 8).join(', ')}${missing.length > 8 ? ', …' : ''}`, file, missing[0]);
  }
  const skipped: Skipped[] = [];
  const unmapped: string[] = [];
  for (const name of meg.tensors.keys()) {
    if (used.has(name)) continue;
    const rule = MEGATRON_IGNORED.find((r) => r.pattern.test(name));
    if (rule) skipped.push({ name, reason: rule.reason });
    else unmapped.push(name);
  }
  for (const name of meg.objects.keys()) {
    const rule = MEGATRON_IGNORED.find((r) => r.pattern.test(name));
    skipped.push({ name, reason: rule?.reason ?? 'non-tensor entry' });
  }
  if (unmapped.length && opts.allowUnmapped) for (const name of unmapped) skipped.push({ name, reason: 'not mapped (--allow-unmapped)' });
  else if (unmapped.length) {
    throw badInput(`${file}: ${unmapped.length} tensor(s) have no place in a ${c.family} HF model: ${unmapped.slice(0, 8).join(', ')}${unmapped.length > 8 ? ', …' : ''} (--allow-unmapped skips them)`, file, unmapped[0]);
  }
  return { tensors: out, skipped };
}
