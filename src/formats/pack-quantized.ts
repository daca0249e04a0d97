/**
 * compressed-tensors checkpoints in the `pack-quantized` format (Kimi K2-Thinking / K2.5 / K2.6:
 * INT4 routed experts, symmetric, one scale per `group_size` inputs) read as the tensors the
 * package decompresses them to (the arithmetic: `tensor/int4-pack.ts`). Each quantized linear's
 * `X.weight_packed` (int32 [R, ⌈C/8⌉]), `X.weight_scale` [R, C/group] and `X.weight_shape` ([R, C])
 * become one lazy `X.weight` in the scale's dtype; a box reads only its rows' words and scales,
 * a slice of rows at a time. Any other compressed-tensors scheme is refused by name.
 */
import type { CheckpointSource } from './types.js';
import type { SourceTensor } from '../lazy/types.js';
import { badInput, unsupported } from '../util/errors.js';
import { byteLength } from '../tensor/dtype.js';
import type { Box } from '../tensor/layout.js';
import { castBytes } from '../tensor/cast.js';
import { dequantInt4Rows, type ScaleDtype } from '../tensor/int4-pack.js';

const SLICE_BYTES = 1 << 20;

/** The one scheme read: 4-bit symmetric integer weights with per-group scales. */
export interface PackQuantizedScheme {
  readonly groupSize: number;
}

/** The `quantization_config` of a config.json or of its `text_config` (multimodal wrappers keep it there). */
function quantizationConfig(cfg: Readonly<Record<string, unknown>>): Record<string, unknown> | undefined {
  const t = cfg.text_config as Record<string, unknown> | undefined;
  const q = (cfg.quantization_config ?? t?.quantization_config) as Record<string, unknown> | undefined;
  return q && typeof q === 'object' ? q : undefined;
}

/** The compressed-tensors quant method a config names, if any. */
export function compressedTensorsConfig(cfg: Readonly<Record<string, unknown>>): Record<string, unknown> | undefined {
  const q = quantizationConfig(cfg);
  return q?.quant_method === 'compressed-tensors' ? q : undefined;
}

/**
 * The pack-quantized scheme of a compressed-tensors config, or undefined when the config names
 * none. Everything but compressed, symmetric, static, per-group INT4 weights with unquantized
 * activations is refused, naming the field.
 */
export function packQuantizedSchemeOf(cfg: Readonly<Record<string, unknown>>, file: string): PackQuantizedScheme | undefined {
  const q = compressedTensorsConfig(cfg);
  if (!q) return undefined;
  const refuse = (what: string): never => {
    throw unsupported(`${file}: compressed-tensors ${what}; shardshift reads pack-quantized symmetric INT4 weights with per-group scales (Kimi K2-Thinking / K2.5)`, file);
  };
  if (q.format !== 'pack-quantized') refuse(q.format === undefined ? 'config without a format' : `format ${JSON.stringify(q.format)}`);
  if (q.quantization_status !== undefined && q.quantization_status !== 'compressed') refuse(`quantization_status ${JSON.stringify(q.quantization_status)}`);
  const groups = q.config_groups as Record<string, Record<string, unknown>> | undefined;
  if (!groups || typeof groups !== 'object' || Object.keys(groups).length === 0) refuse('config without config_groups');
  let size: number | undefined;
  for (const [name, g] of Object.entries(groups!)) {
    const w = g.weights as Record<string, unknown> | undefined;
    if (!w) refuse(`config group ${name} without weights`);
    if (g.input_activations !== null && g.input_activations !== undefined) refuse(`config group ${name} quantizes input activations`);
    // compressed-tensors' QuantizationArgs defaults: type int, symmetric, static (num_bits 8, strategy tensor).
    const given: Record<string, unknown> = { type: 'int', symmetric: true, dynamic: false, num_bits: 8, strategy: 'tensor', ...w };
    const want: Record<string, unknown> = { num_bits: 4, type: 'int', symmetric: true, strategy: 'group', dynamic: false };
    for (const [k, v] of Object.entries(want)) if (given[k] !== v) refuse(`config group ${name} weights.${k} ${k in w! ? JSON.stringify(w![k]) : `missing (default ${JSON.stringify(given[k])})`}`);
    if (w!.actorder !== null && w!.actorder !== undefined) refuse(`config group ${name} weights.actorder ${JSON.stringify(w!.actorder)} (g_idx reordering)`);
    const gs = w!.group_size;
    if (typeof gs !== 'number' || !Number.isInteger(gs) || gs <= 0) refuse(`config group ${name} weights.group_size ${JSON.stringify(gs)}`);
    if (size !== undefined && size !== gs) refuse(`config groups with different group sizes (${size}, ${String(gs)})`);
    size = gs as number;
  }
  return { groupSize: size! };
}

/** The lazy view `name` [R, C] of INT4 words [R, ⌈C/8⌉] and their per-group scales [R, C/group]. */
export class Int4PackedTensor implements SourceTensor {
  readonly dtype: ScaleDtype;
  readonly shape: readonly number[];
  readonly byteLength: number;
  readonly where: string;

  constructor(
    readonly name: string,
    private readonly packed: SourceTensor,
    private readonly scales: SourceTensor,
    shape: readonly [number, number],
    private readonly group: number,
    file?: string,
  ) {
    const [R, C] = shape;
    if (packed.dtype !== 'I32' || packed.shape.length !== 2 || packed.shape[0] !== R || packed.shape[1] !== Math.ceil(C / 8)) {
      throw badInput(`${packed.name}: ${packed.dtype} [${packed.shape.join(', ')}] is not the int32 [${R}, ${Math.ceil(C / 8)}] that packs a [${R}, ${C}] INT4 weight`, file, packed.name);
    }
    if (C % group !== 0) throw badInput(`${name}: ${C} input columns are not a whole number of ${group}-column groups`, file, name);
    if (scales.shape.length !== 2 || scales.shape[0] !== R || scales.shape[1] !== C / group) {
      throw badInput(`${scales.name}: shape [${scales.shape.join(', ')}] does not fit ${name} [${R}, ${C}] in groups of ${group}, which needs [${R}, ${C / group}]`, file, scales.name);
    }
    if (scales.dtype !== 'BF16' && scales.dtype !== 'F16' && scales.dtype !== 'F32') throw badInput(`${scales.name}: INT4 group scales must be BF16, F16 or F32, not ${scales.dtype}`, file, scales.name);
    this.dtype = scales.dtype;
    this.shape = [R, C];
    this.byteLength = byteLength(this.dtype, R * C);
    this.where = `INT4 ${packed.name} × ${scales.name}`;
  }

  async read(box: Box, out: Uint8Array): Promise<void> {
    const [r0, c0] = box.start as [number, number];
    const [rn, cn] = box.size as [number, number];
    if (rn === 0 || cn === 0) return;
    const w0 = Math.floor(c0 / 8);
    const words = Math.floor((c0 + cn - 1) / 8) - w0 + 1;
    const g0 = Math.floor(c0 / this.group);
    const sCols = Math.floor((c0 + cn - 1) / this.group) - g0 + 1;
    const item = this.dtype === 'F32' ? 4 : 2;
    const step = Math.max(1, Math.min(rn, Math.floor(SLICE_BYTES / (words * 4))));
    const pk = new Uint8Array(step * words * 4);
    const sc = new Uint8Array(step * sCols * item);
    const f32 = new Float32Array(step * cn);
    for (let ra = 0; ra < rn; ra += step) {
      const rk = Math.min(step, rn - ra);
      await this.packed.read({ start: [r0 + ra, w0], size: [rk, words] }, pk.subarray(0, rk * words * 4));
      const sRaw = sc.subarray(0, rk * sCols * item);
      await this.scales.read({ start: [r0 + ra, g0], size: [rk, sCols] }, sRaw);
      const sf = this.dtype === 'F32' ? sRaw.slice() : castBytes(sRaw, this.dtype, 'F32');
      const s = new Float32Array(sf.buffer, sf.byteOffset, rk * sCols);
      dequantInt4Rows(pk, rk, words, w0, s, sCols, g0, this.group, c0, cn, this.dtype, f32, out.subarray(ra * cn * item, (ra + rk) * cn * item));
    }
  }
}

/** The [R, C] a `weight_shape` tensor records (int32 or int64, two values). */
async function recordedShape(t: SourceTensor, file: string): Promise<[number, number]> {
  if ((t.dtype !== 'I32' && t.dtype !== 'I64') || t.shape.length !== 1 || t.shape[0] !== 2) throw badInput(`${t.name}: ${t.dtype} [${t.shape.join(', ')}] is not a weight shape (two int32 / int64 values)`, file, t.name);
  const b = new Uint8Array(t.byteLength);
  await t.read({ start: [0], size: [2] }, b);
  const dv = new DataView(b.buffer);
  const v = t.dtype === 'I32' ? [dv.getInt32(0, true), dv.getInt32(4, true)] : [Number(dv.getBigInt64(0, true)), Number(dv.getBigInt64(8, true))];
  if (!v.every((x) => Number.isSafeInteger(x) && x > 0)) throw badInput(`${t.name}: recorded weight shape [${v.join(', ')}] is not two positive sizes`, file, t.name);
  return v as [number, number];
}

/**
 * `src` with every `X.weight_packed` / `X.weight_scale` / `X.weight_shape` triplet replaced by the
 * decompressed `X.weight`; `src` itself when it holds none. A part missing from a triplet, a
 * zero point (asymmetric scheme) or packed weights without a scheme in the config are errors
 * naming the tensor.
 */
export async function withInt4Dequantized(src: CheckpointSource, scheme: PackQuantizedScheme | undefined): Promise<CheckpointSource> {
  const names = [...src.tensors.keys()];
  const packedNames = names.filter((n) => n.endsWith('.weight_packed'));
  if (!packedNames.length) return src;
  if (!scheme) throw badInput(`${packedNames[0]}: INT4-packed weights, but config.json has no compressed-tensors pack-quantized quantization_config`, src.path, packedNames[0]);
  const zp = names.find((n) => n.endsWith('.weight_zero_point'));
  if (zp) throw unsupported(`${zp}: zero points (an asymmetric scheme) are not read`, src.path, zp);
  const gi = names.find((n) => n.endsWith('.weight_g_idx'));
  if (gi) throw unsupported(`${gi}: g_idx (activation-order) reordering is not read`, src.path, gi);
  const views = new Map<string, SourceTensor>();
  const consumed = new Set<string>();
  for (const p of packedNames) {
    const base = p.slice(0, -'_packed'.length);
    const scale = src.tensors.get(`${base}_scale`);
    const shape = src.tensors.get(`${base}_shape`);
    if (!scale || !shape) throw badInput(`${p}: INT4-packed weight without ${!scale ? `${base}_scale` : `${base}_shape`}`, src.path, p);
    if (src.tensors.has(base)) throw badInput(`${base}: both a plain weight and its INT4-packed form ${p}`, src.path, base);
    views.set(base, new Int4PackedTensor(base, src.tensors.get(p)!, scale, await recordedShape(shape, src.path), scheme.groupSize, src.path));
    consumed.add(p).add(`${base}_scale`).add(`${base}_shape`);
  }
  const tensors = new Map<string, SourceTensor>();
  for (const [n, t] of src.tensors) {
    if (views.has(`${n}`)) continue;
    if (consumed.has(n)) {
      if (n.endsWith('_packed')) tensors.set(n.slice(0, -'_packed'.length), views.get(n.slice(0, -'_packed'.length))!);
      continue;
    }
    if (n.endsWith('.weight_scale') || n.endsWith('.weight_shape')) throw badInput(`${n}: INT4 ${n.endsWith('_scale') ? 'scales' : 'shape'} without ${n.replace(/_(scale|shape)$/, '_packed')}`, src.path, n);
    tensors.set(n, t);
  }
  return { ...src, tensors };
}
