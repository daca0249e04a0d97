/**
 * safetensors: single files and sharded directories (`model-00001-of-00004.safetensors` +
 * `model.safetensors.index.json`).
 *
 * Written by hand because the format is small and this is the security boundary: the header is
 * untrusted JSON, so every rule the reference Rust crate enforces (safetensors/src/tensor.rs) is
 * enforced here — header size cap, valid UTF-8 JSON starting with `{`, known dtypes, checked
 * arithmetic, data offsets that tile the data region exactly with no hole, overlap or overrun.
 * The writer reproduces the crate's layout byte for byte: tensors ordered by dtype (largest
 * first, in the crate's enum order) then name, header padded with spaces to 8 bytes.
 */
import { readdir, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { ReadOnlyFile, type ByteSource } from '../io/file.js';
import { badInput, unsupported, usage } from '../util/errors.js';
import { byteLength, fillsWholeBytes, isDType, numelOf, dtypeInfo, type DType } from '../tensor/dtype.js';
import { contiguousStrides, readBox, wholeBox, type Box, type Piece } from '../tensor/layout.js';
import { type CheckpointSource, type SourceObject, type WriteReport } from './types.js';
import { tensorSlot, type OutputFile, type Part, type SourceTensor, type TargetTensor } from '../lazy/types.js';
import { listSideFiles } from './side-files.js';
import { planShards, shardName, indexFile, DEFAULT_MAX_SHARD_SIZE, readWeightMap } from './shards.js';

/** The crate's cap on header size (`MAX_HEADER_SIZE`). */
export const MAX_HEADER_SIZE = 100_000_000;
export const INDEX_NAME = 'model.safetensors.index.json';

/** The crate's `Dtype` enum order; the writer sorts by it, descending. */
const DTYPE_ORDER: readonly DType[] = [
  'BOOL', 'F4', 'F6_E2M3', 'F6_E3M2', 'U8', 'I8', 'F8_E5M2', 'F8_E4M3', 'F8_E8M0', 'F8_E4M3FNUZ',
  'F8_E5M2FNUZ', 'I16', 'U16', 'F16', 'BF16', 'I32', 'U32', 'F32', 'C64', 'F64', 'I64', 'U64',
];
const RANK = new Map(DTYPE_ORDER.map((d, i) => [d, i]));

export interface HeaderEntry {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: number[];
  readonly begin: number;
  readonly end: number;
}

export interface ParsedHeader {
  readonly headerSize: number;
  readonly dataStart: number;
  readonly entries: HeaderEntry[];
  readonly metadata: Map<string, string>;
}

/** Parses and validates a header; `fileSize` bounds the data region. Pure: used by tests and fuzzing. */
export function parseHeader(file: string, prefix: Uint8Array, headerBytes: Uint8Array, fileSize: number): ParsedHeader {
  if (prefix.length < 8) throw badInput(`${file}: not a safetensors file (shorter than its 8-byte header length)`, file);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_SIZE)) throw badInput(`${file}: safetensors header claims ${n} bytes, over the ${MAX_HEADER_SIZE}-byte limit`, file);
  const headerSize = Number(n);
  if (8 + headerSize > fileSize) {
    throw badInput(`${file}: safetensors header claims ${headerSize} bytes but the file has only ${fileSize - 8} after the length (truncated?)`, file);
  }
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch {
    throw badInput(`${file}: safetensors header is not valid UTF-8`, file);
  }
  if (!text.startsWith('{')) throw badInput(`${file}: safetensors header does not start with '{'`, file);
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw badInput(`${file}: safetensors header is not valid JSON (${(e as Error).message})`, file);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw badInput(`${file}: safetensors header is not a JSON object`, file);
  const metadata = new Map<string, string>();
  const entries: HeaderEntry[] = [];
  for (const [name, v] of Object.entries(json as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof v !== 'object' || v === null || Array.isArray(v)) throw badInput(`${file}: __metadata__ is not an object`, file);
      for (const [k, s] of Object.entries(v as Record<string, unknown>)) {
        if (typeof s !== 'string') throw badInput(`${file}: __metadata__.${k} is not a string`, file);
        metadata.set(k, s);
      }
      continue;
    }
    entries.push(parseEntry(file, name, v));
  }
  const dataStart = 8 + headerSize;
  checkOffsets(file, entries, fileSize - dataStart);
  return { headerSize, dataStart, entries, metadata };
}

/** A header field as an error shows it: JSON, cut short; a field that is absent reads "missing". */
function shown(v: unknown): string {
  if (v === undefined) return 'missing';
  const j = JSON.stringify(v);
  return j.length > 120 ? `${j.slice(0, 120)}… (${j.length} chars)` : j;
}

function parseEntry(file: string, name: string, v: unknown): HeaderEntry {
  if (typeof v !== 'object' || v === null) throw badInput(`${file}: tensor ${name}: header entry is not an object`, file, name);
  const o = v as Record<string, unknown>;
  const dtype = o.dtype;
  if (dtype === undefined) throw badInput(`${file}: tensor ${JSON.stringify(name)}: header entry has no dtype${/^_+meta/i.test(name) ? ' (a misspelt "__metadata__"?)' : ''}`, file, name);
  if (typeof dtype !== 'string' || !isDType(dtype) || !dtypeInfo(dtype).safetensors) {
    throw badInput(`${file}: tensor ${name}: unknown dtype ${shown(dtype)}`, file, name);
  }
  const shape = o.shape;
  if (!Array.isArray(shape) || !shape.every((s) => Number.isSafeInteger(s) && s >= 0)) {
    throw badInput(`${file}: tensor ${name}: shape ${shown(shape)} is not a list of non-negative integers`, file, name);
  }
  const offs = o.data_offsets;
  if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((s) => Number.isSafeInteger(s) && s >= 0)) {
    throw badInput(`${file}: tensor ${name}: data_offsets ${shown(offs)} is not [begin, end]`, file, name);
  }
  const [begin, end] = offs as [number, number];
  let numel: number;
  try {
    numel = numelOf(shape as number[]);
  } catch {
    throw badInput(`${file}: tensor ${name}: shape ${shown(shape)} overflows`, file, name);
  }
  if (!fillsWholeBytes(dtype, numel)) {
    throw badInput(`${file}: tensor ${name}: ${numel} elements of ${dtype} do not fill whole bytes`, file, name);
  }
  const expected = byteLength(dtype, numel);
  if (end < begin || end - begin !== expected) {
    throw badInput(
      `${file}: tensor ${name}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes but ${dtype} of shape [${shape.join(', ')}] needs ${expected}`,
      file,
      name,
    );
  }
  return { name, dtype, shape: shape as number[], begin, end };
}

/** The tensors must tile [0, dataSize) exactly, as the crate requires. */
function checkOffsets(file: string, entries: HeaderEntry[], dataSize: number): void {
  const sorted = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let at = 0;
  for (const e of sorted) {
    if (e.begin > at) throw badInput(`${file}: tensor ${e.name} starts at data byte ${e.begin}, leaving a hole after byte ${at}`, file, e.name);
    if (e.begin < at) throw badInput(`${file}: tensor ${e.name} (data bytes ${e.begin}..${e.end}) overlaps the tensor before it (which ends at ${at})`, file, e.name);
    at = e.end;
  }
  if (at > dataSize) {
    const last = sorted[sorted.length - 1]!;
    throw badInput(`${file}: tensor ${last.name} ends at data byte ${at} but the file holds only ${dataSize} data bytes (truncated?)`, file, last.name);
  }
  if (at < dataSize) throw badInput(`${file}: ${dataSize - at} bytes after the last tensor are not described by the header`, file);
}

export async function readHeader(f: ByteSource): Promise<ParsedHeader> {
  if (f.size < 8) throw badInput(`${f.name}: not a safetensors file (${f.size} bytes, shorter than the 8-byte header length)`, f.name);
  const prefix = await f.read(0, 8);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  const len = n > BigInt(MAX_HEADER_SIZE) || Number(n) + 8 > f.size ? 0 : Number(n);
  const header = len ? await f.read(8, len) : new Uint8Array();
  return parseHeader(f.name, prefix, header, f.size);
}

class SafetensorsTensor implements SourceTensor {
  readonly pieces: Piece[];
  readonly byteLength: number;
  constructor(
    readonly name: string,
    readonly dtype: DType,
    readonly shape: number[],
    file: ByteSource,
    position: number,
    readonly where: string,
  ) {
    this.byteLength = byteLength(dtype, numelOf(shape));
    this.pieces = [{ box: wholeBox(shape), file, byteOffset: position, strides: contiguousStrides(shape) }];
  }
  read(box: Box, out: Uint8Array): Promise<void> {
    return readBox(this.name, this.dtype, this.shape, this.pieces, box, out);
  }
}

export async function isSafetensorsPath(path: string): Promise<boolean> {
  const st = await stat(path);
  if (st.isFile()) return path.endsWith('.safetensors');
  const names = await readdir(path);
  return names.some((n) => n.endsWith('.safetensors') || n.endsWith('.safetensors.index.json'));
}

export async function openSafetensors(path: string): Promise<CheckpointSource> {
  const st = await stat(path);
  const files: string[] = [];
  let weightMap: Map<string, string> | undefined;
  let dir: string;
  if (st.isFile()) {
    files.push(basename(path));
    dir = join(path, '..');
  } else {
    dir = path;
    const names = (await readdir(path)).sort();
    const indexes = names.filter((n) => n.endsWith('.safetensors.index.json'));
    if (indexes.length > 1) throw usage(`${path}: several safetensors indexes (${indexes.join(', ')}); name one file or keep one index`);
    if (indexes.length === 1) {
      weightMap = await readWeightMap(join(path, indexes[0]!), (v) => v.endsWith('.safetensors'), '.safetensors');
      for (const f of new Set(weightMap.values())) files.push(f);
    } else {
      const sts = names.filter((n) => n.endsWith('.safetensors'));
      if (sts.length !== 1) {
        throw usage(`${path}: ${sts.length} .safetensors files and no index.json; name the file to read (${sts.slice(0, 5).join(', ')})`);
      }
      files.push(sts[0]!);
    }
  }
  const opened: ReadOnlyFile[] = [];
  const shards: ShardBytes[] = [];
  try {
    for (const rel of files) {
      const full = join(dir, rel);
      let f: ReadOnlyFile;
      try {
        f = await ReadOnlyFile.open(full);
      } catch (e) {
        throw badInput(`${full}: cannot open shard named by the index (${(e as Error).message})`, full);
      }
      opened.push(f);
      shards.push({ rel, source: f, header: await readHeader(f) });
    }
    const sideFiles = st.isFile() ? [] : await listSideFiles(dir, (n) => n.endsWith('.safetensors') || n.endsWith('.safetensors.index.json'));
    return safetensorsSource(path, dir, shards, weightMap, sideFiles, async () => {
      await Promise.all(opened.map((f) => f.close()));
    });
  } catch (e) {
    await Promise.all(opened.map((f) => f.close()));
    throw e;
  }
}

/** One shard of a safetensors checkpoint: where its bytes are read from, and its parsed header. */
export interface ShardBytes {
  readonly rel: string;
  readonly source: ByteSource;
  readonly header: ParsedHeader;
}

/**
 * A checkpoint from shards whose headers are read (local files, or a hub repository's shards
 * read by range: hub streaming). `weightMap` is the index's, checked against the headers both
 * ways; `root` is where `rel` paths and side files are.
 */
export function safetensorsSource(
  path: string,
  root: string,
  shards: readonly ShardBytes[],
  weightMap: ReadonlyMap<string, string> | undefined,
  sideFiles: readonly string[],
  close: () => Promise<void>,
  settle?: () => Promise<void>,
): CheckpointSource {
  const tensors = new Map<string, SourceTensor>();
  const metadata = new Map<string, string>();
  const byFile = new Map<string, Map<string, SafetensorsTensor>>();
  for (const { rel, source, header: h } of shards) {
    for (const [k, v] of h.metadata) metadata.set(k, v);
    const inFile = new Map<string, SafetensorsTensor>();
    for (const e of h.entries) {
      inFile.set(e.name, new SafetensorsTensor(e.name, e.dtype, e.shape, source, h.dataStart + e.begin, `${rel} @${h.dataStart + e.begin}`));
    }
    byFile.set(rel, inFile);
  }
  if (weightMap) {
    for (const [name, rel] of weightMap) {
      const t = byFile.get(rel)?.get(name);
      if (!t) throw badInput(`${join(root, rel)}: index.json places tensor ${name} in this file but its header has no such tensor`, join(root, rel), name);
      tensors.set(name, t);
    }
    for (const [rel, m] of byFile) {
      for (const name of m.keys()) {
        if (weightMap.get(name) !== rel) {
          throw badInput(`${join(root, rel)}: holds tensor ${name} that index.json ${weightMap.has(name) ? `places in ${weightMap.get(name)}` : 'does not list'}`, join(root, rel), name);
        }
      }
    }
  } else {
    for (const m of byFile.values()) for (const [n, t] of m) tensors.set(n, t);
  }
  return {
    format: 'safetensors',
    path,
    root,
    tensors,
    objects: new Map<string, SourceObject>(),
    metadata,
    dataFiles: shards.map((s) => s.rel),
    sideFiles,
    close,
    ...(settle ? { settle } : {}),
  };
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface SafetensorsWriteOptions {
  /** Largest shard in bytes of tensor data (default DEFAULT_MAX_SHARD_SIZE, transformers 5's). */
  maxShardSize?: number;
  /** `model` → model.safetensors / model-0000i-of-0000n.safetensors + model.safetensors.index.json. */
  prefix?: string;
  /** `__metadata__`; defaults to {"format": "pt"} as transformers writes. */
  metadata?: ReadonlyMap<string, string>;
  /** Write exactly one file with this name (no sharding, no index). */
  singleFile?: string;
}

/** The crate's order: dtype (later in its enum first), then name. */
export function safetensorsOrder(a: { name: string; dtype: DType }, b: { name: string; dtype: DType }): number {
  const r = RANK.get(b.dtype)! - RANK.get(a.dtype)!;
  if (r !== 0) return r;
  return a.name < b.name ? -1 : a.name > b.name ? 1 : 0;
}

/** Header bytes (length prefix included) for tensors in the given order. */
export function encodeHeader(tensors: ReadonlyArray<{ name: string; dtype: DType; shape: readonly number[]; byteLength: number }>, metadata?: ReadonlyMap<string, string>): Uint8Array {
  const parts: string[] = [];
  if (metadata && metadata.size) {
    const m: Record<string, string> = {};
    for (const [k, v] of metadata) m[k] = v;
    parts.push(`"__metadata__":${JSON.stringify(m)}`);
  }
  let at = 0;
  for (const t of tensors) {
    parts.push(`${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":[${t.shape.join(',')}],"data_offsets":[${at},${at + t.byteLength}]}`);
    at += t.byteLength;
  }
  const json = Buffer.from(`{${parts.join(',')}}`, 'utf8');
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length);
  return out;
}

export function writeSafetensors(tensors: readonly TargetTensor[], opts: SafetensorsWriteOptions = {}): WriteReport {
  for (const t of tensors) {
    if (!dtypeInfo(t.dtype).safetensors) throw unsupported(`tensor ${t.name}: safetensors cannot store ${t.dtype}`, undefined, t.name);
  }
  const metadata = opts.metadata ?? new Map([['format', 'pt']]);
  const prefix = opts.prefix ?? 'model';
  const shards = opts.singleFile ? [[...tensors]] : planShards(tensors, opts.maxShardSize ?? DEFAULT_MAX_SHARD_SIZE);
  if (shards.length === 0) shards.push([]);
  const files: OutputFile[] = [];
  const weightMap: Array<[string, string]> = [];
  let total = 0;
  shards.forEach((shard, i) => {
    const rel = opts.singleFile ?? shardName(prefix, 'safetensors', i, shards.length);
    const ordered = [...shard].sort(safetensorsOrder);
    const header = encodeHeader(ordered, metadata);
    const parts: Part[] = [header, ...ordered.map((t) => tensorSlot(t))];
    const size = header.length + ordered.reduce((s, t) => s + t.byteLength, 0);
    files.push({ relPath: rel, size, parts });
    for (const t of shard) {
      weightMap.push([t.name, rel]);
      total += t.byteLength;
    }
  });
  if (files.length > 1) files.push(indexFile(`${prefix}.safetensors.index.json`, weightMap, total));
  return { files, dropped: [] };
}
