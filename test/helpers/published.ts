/**
 * The published-checkpoint harness (test/published/README.md): published configs and the exact
 * tensor lists transformers 5.24 derives from them (committed as gzipped JSON, regenerated and
 * checked by test/interop/published.test.ts), written as sparse safetensors checkpoints — the
 * headers exactly as a hub repo has them, the data left as holes (no disk) or, for round trips,
 * with deterministic pseudo-random values in a few windows of every tensor.
 *
 * Written by hand (header JSON + ftruncate + pwrite) so that the harness never depends on the
 * writers it tests.
 */
import { mkdir, open, readFile, writeFile, readdir } from 'node:fs/promises';
import { gunzipSync } from 'node:zlib';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from './oracle.js';
import { cli } from './cli.js';
import { configJson, JsonFloat, parseConfigJson } from '../../src/formats/config-json.js';

export const publishedDir = join(repoRoot, 'test', 'published');

export interface HubFacts {
  /** Multi-token-prediction layers the hub repo carries (`mtp.*`). */
  readonly mtp?: number;
  /** The main decoder's experts stored fused (`experts.gate_up_proj`), as loaded-from-hub models re-save them. */
  readonly fusedExperts?: boolean;
  /** GPT-OSS experts as MXFP4 `_blocks` / `_scales`. */
  readonly mxfp4?: boolean;
  /** Regexes of tensors the hub stores as F32. */
  readonly f32?: readonly string[];
  /** Regexes of tensors the hub stores as BF16 though transformers keeps them float32. */
  readonly bf16?: readonly string[];
  /** DeepSeek-V3's MTP layers (`model.layers.<L + k>`, with embedding and head copies). */
  readonly deepseekMtp?: number;
  /** `false`: those MTP layers carry no embedding / head copies (GLM-4.6, 4.7). */
  readonly mtpCopies?: false;
  /** DeepSeek-V3's FP8 weights (F8_E4M3 + `_scale_inv` F32 over [rows, cols] blocks). */
  readonly fp8Block?: readonly [number, number];
  /** The regex of the FP8 weights where DeepSeek-V3's list does not apply (MiniMax-M2). */
  readonly fp8Tensors?: string;
  /** Renames [regex, replacement] for hub names transformers 5 saves differently (Gemma 3's vision_tower.vision_model.*). */
  readonly rename?: ReadonlyArray<readonly [string, string]>;
  /** Fused experts stored input-major ([E, H, 2F] / [E, F, H]: Qwen3-VL-MoE's hub files). */
  readonly expertsInputMajor?: boolean;
  /** The transformers model_type the config is read as (Kimi K2's `kimi_k2` is DeepseekV3). */
  readonly modelType?: string;
}

export interface PublishedModel {
  readonly id: string;
  readonly repo: string;
  readonly config: string;
  readonly hub: HubFacts;
  /** Extra CLI arguments of each full-size dry run (`convert --to megatron … --dry-run`). */
  readonly dryRuns: ReadonlyArray<readonly string[]>;
  /**
   * The default (CI) tier: `legacy` — the torch rank-file layouts round-trip too; `roundTrip:
   * false` — only the full-size dry runs (a larger sibling of a family whose every tensor shape
   * kind another model round-trips; the full tier runs it).
   */
  readonly ci?: { readonly legacy?: boolean; readonly roundTrip?: boolean };
  /**
   * `--dtype` of the round trip's HF → Megatron leg, for a model published in float32 (gemma-2-9b):
   * Megatron's default bf16 would round every weight, and the test wants its bytes back.
   */
  readonly roundTripDtype?: string;
}

/** [name, dtype, shape] in save order. */
export type TensorSpec = readonly [string, string, readonly number[]];

export async function publishedModels(): Promise<PublishedModel[]> {
  const j = JSON.parse(await readFile(join(publishedDir, 'models.json'), 'utf8')) as { models: PublishedModel[] };
  return j.models;
}

/** The published config, float fields kept as floats (`JsonFloat`) so it is written back as transformers needs it. */
export async function publishedConfig(m: PublishedModel): Promise<Record<string, unknown>> {
  return parseConfigJson(await readFile(join(publishedDir, 'configs', m.config), 'utf8')) as Record<string, unknown>;
}

/** A deep copy that keeps `JsonFloat`s (structuredClone would turn them into plain objects). */
function cloneJson(v: unknown): unknown {
  if (v instanceof JsonFloat || v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) return v.map(cloneJson);
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, cloneJson(x)]));
}

export function tensorListPath(m: PublishedModel): string {
  return join(publishedDir, 'tensors', `${m.id}.json.gz`);
}

export async function publishedTensors(m: PublishedModel): Promise<TensorSpec[]> {
  const j = JSON.parse(gunzipSync(await readFile(tensorListPath(m))).toString('utf8')) as { tensors: TensorSpec[] };
  return j.tensors;
}

const ITEM: Record<string, number> = { F64: 8, F32: 4, BF16: 2, F16: 2, F8_E4M3: 1, U8: 1, I8: 1, I64: 8, I32: 4, BOOL: 1 };

export function tensorBytes(t: TensorSpec): number {
  const size = ITEM[t[1]];
  if (size === undefined) throw new Error(`harness: no item size for ${t[1]}`);
  return t[2].reduce((a, b) => a * b, 1) * size;
}

// ---------------------------------------------------------------------------------------------
// Layer truncation: the same names, shapes and dtypes per layer kind, fewer layers.

/** The config object that holds the decoder's fields (`text_config` of VL wrappers). */
function textOf(cfg: Record<string, unknown>): Record<string, unknown> {
  return (cfg.text_config as Record<string, unknown> | undefined) ?? cfg;
}

/** The kind of each decoder layer (attention type × MLP type), as far as the config distinguishes them. */
function layerKinds(cfg: Record<string, unknown>): string[] {
  const t = textOf(cfg);
  const L = t.num_hidden_layers as number;
  const kinds = Array.from({ length: L }, () => '');
  if (typeof t.hybrid_override_pattern === 'string') [...t.hybrid_override_pattern].forEach((c, i) => (kinds[i] += c));
  if (Array.isArray(t.layer_types)) (t.layer_types as string[]).forEach((k, i) => (kinds[i] += `|${k}`));
  else if (typeof t.full_attention_interval === 'number') for (let i = 0; i < L; i++) kinds[i] += (i + 1) % t.full_attention_interval === 0 ? '|full' : '|linear';
  if (Array.isArray(t.mlp_only_layers)) for (const i of t.mlp_only_layers as number[]) kinds[i] += '|dense';
  if (typeof t.decoder_sparse_step === 'number' && t.decoder_sparse_step > 1) for (let i = 0; i < L; i++) if ((i + 1) % t.decoder_sparse_step !== 0) kinds[i] += '|dense';
  // DeepSeek-V3: the first first_k_dense_replace layers have dense MLPs.
  if (typeof t.first_k_dense_replace === 'number') for (let i = 0; i < Math.min(L, t.first_k_dense_replace); i++) kinds[i] += '|dense';
  return kinds;
}

/** The shortest layer prefix holding every layer kind the model has (at least `min` layers). */
export function truncatedLayers(cfg: Record<string, unknown>, min = 2): number {
  const kinds = layerKinds(cfg);
  const all = new Set(kinds);
  const seen = new Set<string>();
  for (let k = 0; k < kinds.length; k++) {
    seen.add(kinds[k]!);
    if (seen.size === all.size && k + 1 >= min) return k + 1;
  }
  return kinds.length;
}

export function truncateConfig(cfg: Record<string, unknown>, layers: number): Record<string, unknown> {
  const out = cloneJson(cfg) as Record<string, unknown>;
  const t = textOf(out);
  t.num_hidden_layers = layers;
  if (typeof t.hybrid_override_pattern === 'string') t.hybrid_override_pattern = t.hybrid_override_pattern.slice(0, layers);
  if (Array.isArray(t.layer_types)) t.layer_types = t.layer_types.slice(0, layers);
  if (Array.isArray(t.mlp_only_layers)) t.mlp_only_layers = (t.mlp_only_layers as number[]).filter((i) => i < layers);
  return out;
}

/** The routed-expert count of a MoE config (text part), or undefined for a dense model. */
export function expertCount(cfg: Record<string, unknown>): number | undefined {
  const t = textOf(cfg);
  const e = t.num_experts ?? t.num_local_experts ?? t.n_routed_experts;
  return typeof e === 'number' ? e : undefined;
}

/**
 * The expert count a round trip keeps: fewer experts, at least top-k, a multiple of 8 so that
 * every `--ep 8` layout still divides them. Each expert keeps its exact names, shapes and dtypes.
 */
export function truncatedExperts(cfg: Record<string, unknown>): number | undefined {
  const e = expertCount(cfg);
  if (e === undefined) return undefined;
  const t = textOf(cfg);
  const k = Number(t.num_experts_per_tok ?? t.experts_per_token ?? 8);
  return Math.min(e, 8 * Math.ceil(Math.max(8, k) / 8));
}

const EXPERT_KEYS = ['num_experts', 'num_local_experts', 'n_routed_experts'];

export function truncateConfigExperts(cfg: Record<string, unknown>, experts: number): Record<string, unknown> {
  const out = cloneJson(cfg) as Record<string, unknown>;
  const t = textOf(out);
  for (const k of EXPERT_KEYS) if (typeof t[k] === 'number') t[k] = experts;
  return out;
}

/** Per-expert tensors of the experts kept; stacked expert, router and score-bias tensors cut to `experts` rows. */
export function truncateTensorExperts(tensors: readonly TensorSpec[], from: number, experts: number): TensorSpec[] {
  const STACKED = /\.(?:experts\.[a-z_]+|gate\.weight|router\.weight|router\.bias|e_score_correction_bias)$/;
  const out: TensorSpec[] = [];
  for (const t of tensors) {
    const m = /\.experts\.(\d+)\./.exec(t[0]);
    if (m) {
      if (Number(m[1]) < experts) out.push(t);
    } else if (STACKED.test(t[0]) && t[2][0] === from) out.push([t[0], t[1], [experts, ...t[2].slice(1)]]);
    else out.push(t);
  }
  return out;
}

const DECODER_LAYER = /^(?:model\.language_model|language_model\.model|model|backbone)\.layers\.(\d+)\./;

/**
 * The tensor list of the truncated model: decoder layers below `layers`, everything else kept.
 * Layers numbered after the decoder's `fullLayers` (DeepSeek-V3's MTP layers at
 * `model.layers.<L + k>`) are kept and renumbered to follow the truncated decoder.
 */
export function truncateTensors(tensors: readonly TensorSpec[], layers: number, fullLayers = Infinity): TensorSpec[] {
  const out: TensorSpec[] = [];
  for (const t of tensors) {
    const m = DECODER_LAYER.exec(t[0]);
    if (!m || Number(m[1]) < layers) out.push(t);
    else if (Number(m[1]) >= fullLayers) out.push([t[0].replace(`.layers.${m[1]}.`, `.layers.${layers + Number(m[1]) - fullLayers}.`), t[1], t[2]]);
  }
  return out;
}

/** The decoder's layer count of a config (text part). */
export function layerCount(cfg: Record<string, unknown>): number {
  return textOf(cfg).num_hidden_layers as number;
}

// ---------------------------------------------------------------------------------------------
// Sparse checkpoints.

export interface SparseOptions {
  /** `holes`: no data at all (reads as zeros); `windows`: pseudo-random values in three windows of every tensor. */
  readonly data: 'holes' | 'windows';
  /** Shard size of the repo (published repos use about 5 GB). */
  readonly shardBytes?: number;
  readonly seed?: number;
  /** Tensors left as holes even in `windows` mode. */
  readonly skipData?: RegExp;
  /** Tensors given data over their whole length (benchmarks of a real per-byte cost). */
  readonly denseData?: RegExp;
  /** Tensors that hold another's data (DeepSeek-V3's MTP embedding and head copies): their name → the original's. */
  readonly copyOf?: (name: string) => string | undefined;
}

/** DeepSeek-V3's MTP layers hold copies of the main embedding and head (`model.layers.<n>.embed_tokens`, `.shared_head.head`). */
export function deepseekCopies(name: string): string | undefined {
  if (/^model\.layers\.\d+\.embed_tokens\.weight$/.test(name)) return 'model.embed_tokens.weight';
  if (/^model\.layers\.\d+\.shared_head\.head\.weight$/.test(name)) return 'lm_head.weight';
  return undefined;
}

const WINDOW = 4096;

/** Byte ranges of a tensor that hold data in `windows` mode (start, middle, end; whole elements). */
export function dataWindows(bytes: number, item: number): Array<[number, number]> {
  if (bytes <= 3 * WINDOW) return [[0, bytes]];
  const mid = Math.floor(bytes / 2 / item) * item;
  return [
    [0, WINDOW],
    [mid, mid + WINDOW],
    [bytes - WINDOW, bytes],
  ];
}

/**
 * Values for a window: finite and of moderate magnitude (a random sign and mantissa with a small
 * exponent range), 1-D tensors (norms, biases) in [0.5, 2) so that offset mappings (zero-centred
 * norms) round-trip exactly, MXFP4 scales near 2^0.
 */
function fill(buf: Buffer, dtype: string, name: string, oneD: boolean, rnd: () => number): void {
  if (dtype === 'BF16' || dtype === 'F16' || dtype === 'F32') {
    const bits = dtype === 'F32' ? 32 : 16;
    const man = dtype === 'F16' ? 10 : dtype === 'BF16' ? 7 : 23;
    const bias = dtype === 'F16' ? 15 : 127;
    for (let o = 0; o + bits / 8 <= buf.length; o += bits / 8) {
      const r = rnd();
      const exp = oneD ? bias - 1 + (r & 1) : bias - 6 + ((r >>> 1) % 8);
      const sign = oneD ? 0 : (r >>> 4) & 1;
      const m = (r >>> 5) & ((1 << man) - 1);
      const v = (sign << (bits - 1)) | (exp << man) | m;
      if (bits === 32) buf.writeUInt32LE(v >>> 0, o);
      else buf.writeUInt16LE(v & 0xffff, o);
    }
  } else if (dtype === 'U8' && name.endsWith('_scales')) for (let o = 0; o < buf.length; o++) buf[o] = 120 + (rnd() % 12);
  else for (let o = 0; o < buf.length; o++) buf[o] = rnd() & 0xff;
}

function xorshift(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

/** FNV-1a of a string: a per-tensor seed independent of the order tensors are written in. */
function hashName(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/**
 * Writes `tensors` as a sharded safetensors checkpoint with `config` (and `model.safetensors.index.json`),
 * in the given order, shards cut as huggingface_hub cuts them (greedily at `shardBytes`).
 */
export async function writeSparseCheckpoint(dir: string, config: Record<string, unknown>, tensors: readonly TensorSpec[], opts: SparseOptions): Promise<{ bytes: number; files: number }> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'config.json'), configJson(config));
  const limit = opts.shardBytes ?? 5e9;
  const shards: TensorSpec[][] = [[]];
  let size = 0;
  for (const t of tensors) {
    const b = tensorBytes(t);
    if (size > 0 && size + b > limit) {
      shards.push([]);
      size = 0;
    }
    shards.at(-1)!.push(t);
    size += b;
  }
  const names = shards.map((_, i) => (shards.length === 1 ? 'model.safetensors' : `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`));
  const weightMap: Record<string, string> = {};
  let total = 0;
  for (let s = 0; s < shards.length; s++) {
    const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
    let off = 0;
    const at: number[] = [];
    for (const t of shards[s]!) {
      const b = tensorBytes(t);
      header[t[0]] = { dtype: t[1], shape: t[2], data_offsets: [off, off + b] };
      at.push(off);
      off += b;
      weightMap[t[0]] = names[s]!;
    }
    total += off;
    let json = JSON.stringify(header);
    json += ' '.repeat((8 - (json.length % 8)) % 8);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    const f = await open(join(dir, names[s]!), 'wx');
    try {
      await f.write(Buffer.concat([len, Buffer.from(json)]), 0, 8 + json.length, 0);
      const base = 8 + json.length;
      await f.truncate(base + off);
      for (let k = 0; k < shards[s]!.length; k++) {
        const t = shards[s]![k]!;
        if (!opts.denseData?.test(t[0])) continue;
        const rnd = xorshift(hashName(t[0]) ^ (opts.seed ?? 1));
        const n = tensorBytes(t);
        const piece = 4 << 20;
        for (let a = 0; a < n; a += piece) {
          const buf = Buffer.alloc(Math.min(piece, n - a));
          fill(buf, t[1], t[0], t[2].length === 1, rnd);
          await f.write(buf, 0, buf.length, base + at[k]! + a);
        }
      }
      if (opts.data === 'windows') {
        for (let k = 0; k < shards[s]!.length; k++) {
          const t = shards[s]![k]!;
          if (opts.skipData?.test(t[0]) || opts.denseData?.test(t[0])) continue;
          const item = ITEM[t[1]]!;
          const rnd = xorshift(hashName(opts.copyOf?.(t[0]) ?? t[0]) ^ (opts.seed ?? 1));
          for (const [a, b] of dataWindows(tensorBytes(t), item)) {
            const buf = Buffer.alloc(b - a);
            fill(buf, t[1], t[0], t[2].length === 1, rnd);
            await f.write(buf, 0, buf.length, base + at[k]! + a);
          }
        }
      }
    } finally {
      await f.close();
    }
  }
  if (shards.length > 1) await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2) + '\n');
  return { bytes: total, files: shards.length };
}

// ---------------------------------------------------------------------------------------------
// Reading back, independently of shardshift's readers.

interface HeaderEntry {
  readonly dtype: string;
  readonly shape: number[];
  readonly file: string;
  readonly start: number;
  readonly end: number;
}

/** Every tensor of a safetensors directory: dtype, shape, file and absolute byte range. */
export async function readHeaders(dir: string): Promise<Map<string, HeaderEntry>> {
  const out = new Map<string, HeaderEntry>();
  for (const name of (await readdir(dir)).filter((n) => n.endsWith('.safetensors')).sort()) {
    const f = await open(join(dir, name), 'r');
    try {
      const len = Buffer.alloc(8);
      await f.read(len, 0, 8, 0);
      const n = Number(len.readBigUInt64LE());
      const h = Buffer.alloc(n);
      await f.read(h, 0, n, 8);
      const header = JSON.parse(h.toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
      for (const [k, v] of Object.entries(header)) {
        if (k === '__metadata__') continue;
        out.set(k, { dtype: v.dtype, shape: v.shape, file: name, start: 8 + n + v.data_offsets[0], end: 8 + n + v.data_offsets[1] });
      }
    } finally {
      await f.close();
    }
  }
  return out;
}

export interface TensorDiff {
  readonly missing: string[];
  readonly extra: string[];
  /** name: what differs (dtype, shape, or the first differing byte). */
  readonly differing: string[];
  readonly compared: number;
  readonly bytes: number;
}

/** Compares two safetensors directories tensor by tensor: names, dtypes, shapes and every byte. */
export async function compareSafetensorsDirs(a: string, b: string, opts: { bytes?: boolean } = {}): Promise<TensorDiff> {
  const ha = await readHeaders(a);
  const hb = await readHeaders(b);
  const missing = [...ha.keys()].filter((k) => !hb.has(k));
  const extra = [...hb.keys()].filter((k) => !ha.has(k));
  const differing: string[] = [];
  const files = new Map<string, Awaited<ReturnType<typeof open>>>();
  const fh = async (dir: string, file: string): Promise<Awaited<ReturnType<typeof open>>> => {
    const p = join(dir, file);
    let f = files.get(p);
    if (!f) files.set(p, (f = await open(p, 'r')));
    return f;
  };
  const CH = 16 << 20;
  const ba = Buffer.alloc(CH);
  const bb = Buffer.alloc(CH);
  let compared = 0;
  let bytes = 0;
  try {
    for (const [k, x] of ha) {
      const y = hb.get(k);
      if (!y) continue;
      if (x.dtype !== y.dtype || x.shape.join() !== y.shape.join()) {
        differing.push(`${k}: ${x.dtype} [${x.shape.join(', ')}] vs ${y.dtype} [${y.shape.join(', ')}]`);
        continue;
      }
      const fa = await fh(a, x.file);
      const fb = await fh(b, y.file);
      const n = x.end - x.start;
      for (let o = 0; opts.bytes !== false && o < n; o += CH) {
        const len = Math.min(CH, n - o);
        await Promise.all([fa.read(ba, 0, len, x.start + o), fb.read(bb, 0, len, y.start + o)]);
        if (ba.compare(bb, 0, len, 0, len) !== 0) {
          let i = 0;
          while (ba[i] === bb[i]) i++;
          differing.push(`${k}: byte ${o + i} differs`);
          break;
        }
      }
      compared++;
      bytes += n;
    }
  } finally {
    await Promise.all([...files.values()].map((f) => f.close()));
  }
  return { missing, extra, differing, compared, bytes };
}

// ---------------------------------------------------------------------------------------------
// Running the CLI with its peak RSS.

export interface CliRun {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
  readonly seconds: number;
  /** Peak resident set size of the process in bytes (from /usr/bin/time), when measurable. */
  readonly rss?: number;
}

const TIME = '/usr/bin/time';

export function runCli(args: readonly string[], opts: { timeoutMs?: number } = {}): Promise<CliRun> {
  const t0 = performance.now();
  const timed = existsSync(TIME);
  const [cmd, argv] = timed ? [TIME, ['-f', '%M', process.execPath, cli, ...args]] : [process.execPath, [cli, ...args]];
  return new Promise((res) => {
    execFile(cmd, argv, { maxBuffer: 256 << 20, timeout: opts.timeoutMs ?? 1_800_000 }, (err, stdout, stderr) => {
      let rss: number | undefined;
      let text = stderr;
      if (timed) {
        const lines = stderr.trimEnd().split('\n');
        const last = lines.at(-1) ?? '';
        if (/^\d+$/.test(last)) {
          rss = Number(last) * 1024;
          // GNU time also reports a non-zero exit on its own line.
          const rest = lines.slice(0, -1).filter((l) => !/^Command (exited with non-zero status|terminated by signal) \d+$/.test(l));
          text = rest.join('\n') + (rest.length ? '\n' : '');
        }
      }
      const code = err ? ((err as { code?: number }).code ?? 1) : 0;
      res({ code: typeof code === 'number' ? code : 1, stdout, stderr: text, seconds: (performance.now() - t0) / 1000, rss });
    });
  });
}

/**
 * A published model as the unit tests write it: its config and tensor list cut to the shortest
 * layer prefix holding every layer kind and, for MoE models, to `truncatedExperts` experts.
 */
export async function truncatedPublished(id: string): Promise<{ config: Record<string, unknown>; tensors: TensorSpec[]; layers: number }> {
  const m = (await publishedModels()).find((x) => x.id === id);
  if (!m) throw new Error(`no published model ${id} in models.json`);
  const published = await publishedConfig(m);
  const layers = truncatedLayers(published);
  let config = truncateConfig(published, layers);
  let tensors = truncateTensors(await publishedTensors(m), layers, layerCount(published));
  const E = expertCount(published);
  const keep = truncatedExperts(published);
  if (E !== undefined && keep !== undefined && keep < E) {
    config = truncateConfigExperts(config, keep);
    tensors = truncateTensorExperts(tensors, E, keep);
  }
  return { config, tensors, layers };
}
