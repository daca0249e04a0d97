/**
 * PyTorch Distributed Checkpoint (torch.distributed.checkpoint, FileSystemWriter layout):
 * a directory with `.metadata` (a pickled `Metadata` dataclass) and `__<rank>_<n>.distcp` files.
 *
 * Each stored item is a byte range of a `.distcp` file: tensor chunks are small torch.save
 * archives (torch 2.13 `_write_item` with SerializationFormat.TORCH_SAVE) or raw bytes (the
 * SAFETENSORS serialization format); non-tensor entries are the `torch.save` bytes of the object.
 * A global tensor is the union of its chunks, assembled lazily box by box. Written by hand
 * because no library outside torch reads this format.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ByteWindow, MemorySource, ReadOnlyFile, type ByteSource, readWholeFile } from '../io/file.js';
import { badInput, unsupported, ShardshiftError } from '../util/errors.js';
import { pickle, type AllowList } from '../pickle/index.js';
import {
  PyDict,
  PyGlobal,
  PyObject,
  PyTuple,
  TensorRef,
  TorchSize,
  describe,
  type PyValue,
} from '../pickle/values.js';
import { byteLength, dtypeFromTorch, dtypeInfo, numelOf, type DType } from '../tensor/dtype.js';
import { checkTiling, contiguousStrides, intersect, readBox, type Box, type Piece } from '../tensor/layout.js';
import { type CheckpointSource, type SourceObject, type WriteReport } from './types.js';
import { type OutputFile, type Part, type SourceTensor, type TargetTensor } from '../lazy/types.js';
import { openTorchArchive, tensorPiece, torchArchiveParts, tensorArchiveParts, contiguousTensorRef, unpickleChecked } from './torch-archive.js';
import { listSideFiles } from './side-files.js';

const DCP_MODULE = 'torch.distributed.checkpoint.metadata';
const FS_MODULE = 'torch.distributed.checkpoint.filesystem';

export async function isDcpPath(path: string): Promise<boolean> {
  const st = await stat(path);
  if (!st.isDirectory()) return false;
  return stat(join(path, '.metadata')).then(
    (s) => s.isFile(),
    () => false,
  );
}

interface ChunkInfo {
  readonly box: Box;
  readonly file: string;
  readonly offset: number;
  readonly length: number;
}

function obj(v: PyValue | undefined, cls: string, what: string, file: string): PyObject {
  if (!(v instanceof PyObject) || v.name !== cls) throw badInput(`${file}: ${what} is ${describe(v)}, expected ${cls}`, file);
  return v;
}

function ints(v: PyValue | undefined, what: string, file: string): number[] {
  const items = v instanceof PyTuple ? v.items : Array.isArray(v) ? v : undefined;
  if (!items || !items.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0)) {
    throw badInput(`${file}: ${what} is ${describe(v)}, expected a list of non-negative integers`, file);
  }
  return items as number[];
}

function propsDtype(props: PyObject, fqn: string, file: string): DType {
  // TensorProperties pickles a tuple (dtype, layout, requires_grad, memory_format, pin_memory);
  // older torch pickled the attribute dict.
  const s = props.state;
  const d = s instanceof PyTuple ? s.items[0] : props.attr('dtype');
  if (!(d instanceof PyGlobal) || d.module !== 'torch') throw badInput(`${file}: tensor ${fqn} has no torch dtype in its properties`, file, fqn);
  const dtype = dtypeFromTorch(d.name);
  if (!dtype) throw unsupported(`${file}: tensor ${fqn} has dtype torch.${d.name}, which shardshift does not support`, file, fqn);
  return dtype;
}

class DcpTensor implements SourceTensor {
  readonly byteLength: number;
  /** Each chunk's piece, resolved (its archive opened) on the first read that needs it. */
  private readonly pieces: Array<Promise<Piece> | undefined>;
  constructor(
    readonly name: string,
    readonly dtype: DType,
    readonly shape: readonly number[],
    private readonly chunks: readonly ChunkInfo[],
    private readonly files: ReadonlyMap<string, ReadOnlyFile>,
  ) {
    this.byteLength = byteLength(dtype, numelOf(shape));
    this.pieces = new Array<Promise<Piece> | undefined>(chunks.length);
  }

  get where(): string {
    const files = [...new Set(this.chunks.map((c) => c.file))];
    return `${files.join(',')} (${this.chunks.length} chunk${this.chunks.length === 1 ? '' : 's'})`;
  }

  async read(box: Box, out: Uint8Array): Promise<void> {
    // Only the chunks the box meets: a box of expert e of a stacked [E, …] tensor opens one archive, not E.
    const need: Array<Promise<Piece>> = [];
    this.chunks.forEach((c, i) => {
      if (intersect(c.box, box)) need.push((this.pieces[i] ??= this.resolve(c)));
    });
    return readBox(this.name, this.dtype, this.shape, await Promise.all(need), box, out);
  }

  /** A chunk's bytes: an embedded torch.save archive of the chunk tensor, or its raw bytes. */
  private async resolve(c: ChunkInfo): Promise<Piece> {
    const f = this.files.get(c.file)!;
    const win = new ByteWindow(f, c.offset, c.length, `${f.name}[${c.offset}..${c.offset + c.length}] (${this.name})`);
    const numel = numelOf(c.box.size);
    const head = c.length >= 4 ? await win.read(0, 4) : new Uint8Array();
    if (head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04) {
      const arc = await openTorchArchive(win);
      const t = arc.root;
      if (!(t instanceof TensorRef)) throw badInput(`${win.name}: chunk of ${this.name} does not hold a tensor`, f.name, this.name);
      if (t.dtype !== this.dtype || t.shape.length !== c.box.size.length || t.shape.some((s, i) => s !== c.box.size[i])) {
        throw badInput(
          `${win.name}: chunk of ${this.name} holds ${t.dtype} [${t.shape.join(', ')}] but .metadata says ${this.dtype} [${c.box.size.join(', ')}]`,
          f.name,
          this.name,
        );
      }
      const p = tensorPiece(arc, t, this.name);
      return { ...p, box: c.box };
    }
    if (c.length === byteLength(this.dtype, numel)) {
      return { box: c.box, file: f, byteOffset: c.offset, strides: contiguousStrides(c.box.size) };
    }
    throw badInput(`${win.name}: chunk of ${this.name} is neither a torch.save archive nor ${byteLength(this.dtype, numel)} raw bytes`, f.name, this.name);
  }
}

export async function openDcp(path: string, opts: { extraGlobals?: AllowList } = {}): Promise<CheckpointSource> {
  const metaPath = join(path, '.metadata');
  const meta = unpickleChecked(await readWholeFile(metaPath), metaPath, '.metadata', { extraGlobals: opts.extraGlobals });
  const m = obj(meta, 'Metadata', '.metadata', metaPath);
  const sdm = m.attr('state_dict_metadata');
  const sd = m.attr('storage_data');
  if (!(sdm instanceof PyDict)) throw badInput(`${metaPath}: state_dict_metadata is ${describe(sdm)}`, metaPath);
  if (!(sd instanceof PyDict)) throw badInput(`${metaPath}: storage_data is ${describe(sd)}`, metaPath);

  // MetadataIndex(fqn, offset) → _StorageInfo(relative_path, offset, length)
  const storage = new Map<string, { file: string; offset: number; length: number }>();
  for (const [k, v] of sd.entries) {
    const idx = obj(k, 'MetadataIndex', 'a storage_data key', metaPath);
    const info = obj(v, '_StorageInfo', 'a storage_data value', metaPath);
    const fqn = idx.attr('fqn');
    if (typeof fqn !== 'string') throw badInput(`${metaPath}: storage_data key without fqn`, metaPath);
    const off = idx.attr('offset');
    const key = `${fqn}|${off === null || off === undefined ? '' : ints(off, `offset of ${fqn}`, metaPath).join(',')}`;
    const rel = info.attr('relative_path');
    const offset = info.attr('offset');
    const length = info.attr('length');
    const td = info.attr('transform_descriptors');
    if (typeof rel !== 'string') throw badInput(`${metaPath}: ${fqn} names no storage file (${describe(rel)})`, metaPath, fqn);
    if (rel === '' || rel.includes('/') || rel.startsWith('.')) throw badInput(`${metaPath}: ${fqn} is stored in ${describe(rel)}, not a file of this directory`, metaPath, fqn);
    if (typeof offset !== 'number' || typeof length !== 'number' || offset < 0 || length < 0) throw badInput(`${metaPath}: ${fqn} has a bad storage range`, metaPath, fqn);
    if (td !== undefined && td !== null && !(Array.isArray(td) && td.length === 0)) {
      throw unsupported(`${metaPath}: ${fqn} is stored with transforms ${describe(td)} (compressed or encrypted DCP); shardshift reads plain DCP only`, metaPath, fqn);
    }
    storage.set(key, { file: rel, offset, length });
  }

  const files = new Map<string, ReadOnlyFile>();
  const objects = new Map<string, SourceObject>();
  const tensors = new Map<string, SourceTensor>();
  const openFile = async (rel: string, fqn: string): Promise<ReadOnlyFile> => {
    let f = files.get(rel);
    if (!f) {
      try {
        f = await ReadOnlyFile.open(join(path, rel));
      } catch {
        throw badInput(`${join(path, rel)}: missing, but .metadata stores ${fqn} in it`, join(path, rel), fqn);
      }
      files.set(rel, f);
    }
    return f;
  };
  const checkRange = (f: ReadOnlyFile, s: { offset: number; length: number }, fqn: string): void => {
    if (s.offset + s.length > f.size) {
      throw badInput(`${f.name}: .metadata places ${fqn} at bytes ${s.offset}..${s.offset + s.length} but the file has ${f.size} bytes (truncated?)`, f.name, fqn);
    }
  };
  try {
    for (const [k, v] of sdm.entries) {
      if (typeof k !== 'string') throw badInput(`${metaPath}: state_dict_metadata key ${describe(k)} is not a name`, metaPath);
      if (!(v instanceof PyObject)) throw badInput(`${metaPath}: ${k} has metadata ${describe(v)}`, metaPath, k);
      if (v.name === 'BytesStorageMetadata') {
        const s = storage.get(`${k}|`);
        if (!s) throw badInput(`${metaPath}: no storage recorded for ${k}`, metaPath, k);
        const f = await openFile(s.file, k);
        checkRange(f, s, k);
        const win = new ByteWindow(f, s.offset, s.length, `${f.name}[${s.offset}..] (${k})`);
        try {
          objects.set(k, { name: k, value: await readBytesItem(win, opts.extraGlobals), where: s.file });
        } catch (e) {
          // An entry we cannot decode safely is kept as bytes and never carried (and never run).
          if (!(e instanceof ShardshiftError)) throw e;
          objects.set(k, { name: k, value: await win.read(0, win.size), where: s.file, opaque: e.message });
        }
        continue;
      }
      if (v.name !== 'TensorStorageMetadata') throw unsupported(`${metaPath}: ${k} has metadata of type ${v.qualname}`, metaPath, k);
      const props = obj(v.attr('properties'), 'TensorProperties', `properties of ${k}`, metaPath);
      const dtype = propsDtype(props, k, metaPath);
      const shape = ints(v.attr('size'), `size of ${k}`, metaPath);
      const chunksV = v.attr('chunks');
      if (!Array.isArray(chunksV)) throw badInput(`${metaPath}: ${k} has no chunk list`, metaPath, k);
      const chunks: ChunkInfo[] = [];
      for (const c of chunksV) {
        const co = obj(c, 'ChunkStorageMetadata', `a chunk of ${k}`, metaPath);
        const offsets = ints(co.attr('offsets'), `chunk offsets of ${k}`, metaPath);
        const sizes = ints(co.attr('sizes'), `chunk sizes of ${k}`, metaPath);
        const s = storage.get(`${k}|${offsets.join(',')}`);
        if (!s) throw badInput(`${metaPath}: no storage recorded for the chunk of ${k} at [${offsets.join(', ')}]`, metaPath, k);
        const f = await openFile(s.file, k);
        checkRange(f, s, k);
        chunks.push({ box: { start: offsets, size: sizes }, file: s.file, offset: s.offset, length: s.length });
      }
      checkTiling(k, shape, chunks.map((c) => c.box), metaPath);
      tensors.set(k, new DcpTensor(k, dtype, shape, chunks, files));
    }
  } catch (e) {
    await Promise.all([...files.values()].map((f) => f.close()));
    throw e;
  }
  const metadata = new Map<string, string>();
  const version = m.attr('version');
  if (typeof version === 'string') metadata.set('dcp_version', version);
  return {
    format: 'dcp',
    path,
    root: path,
    tensors,
    objects,
    tree: treeFromPlannerData(m.attr('planner_data'), tensors, objects),
    metadata,
    dataFiles: [...files.keys()].sort(),
    sideFiles: await listSideFiles(path, (n) => n.endsWith('.distcp') || n === '.metadata'),
    close: async () => {
      await Promise.all([...files.values()].map((f) => f.close()));
    },
  };
}

/** A non-tensor entry: the torch.save bytes of the object (or raw bytes a user stored). */
async function readBytesItem(win: ByteSource, extraGlobals?: AllowList): Promise<PyValue> {
  const bytes = await win.read(0, win.size);
  if (bytes.length >= 4 && bytes[0] === 0x50 && bytes[1] === 0x4b && bytes[2] === 0x03 && bytes[3] === 0x04) {
    const arc = await openTorchArchive(new MemorySource(bytes, win.name), { extraGlobals });
    return arc.root;
  }
  return bytes;
}

/**
 * DCP flattens nested state dicts and records each name's original path in `planner_data`
 * (`{'n.b': ('n', 'b')}`); rebuilding it lets DCP → torch restore the nesting.
 */
function treeFromPlannerData(pd: PyValue | undefined, tensors: ReadonlyMap<string, SourceTensor>, objects: ReadonlyMap<string, SourceObject>): PyValue | undefined {
  if (!(pd instanceof PyDict) || pd.size === 0) return undefined;
  const root = new PyDict();
  for (const [k, v] of pd.entries) {
    if (typeof k !== 'string' || !(v instanceof PyTuple) || v.items.length === 0) return undefined;
    if (!v.items.every((p) => typeof p === 'string')) return undefined; // list positions: keep flat
    if (v.items.join('.') !== k) return undefined;
    let d = root;
    for (const p of v.items.slice(0, -1) as string[]) {
      let next = d.get(p);
      if (next === undefined) {
        next = new PyDict();
        d.set(p, next);
      }
      if (!(next instanceof PyDict)) return undefined;
      d = next;
    }
    const last = v.items[v.items.length - 1] as string;
    const o = objects.get(k);
    if (o?.opaque) continue; // never carried
    // Tensor leaves hold null: writers fill them by name.
    d.set(last, tensors.has(k) ? null : (o?.value ?? null));
  }
  const covered = [...tensors.keys(), ...[...objects.values()].filter((o) => !o.opaque).map((o) => o.name)].every((n) => pd.has(n));
  return covered ? root : undefined;
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface DcpWriteOptions {
  /** Number of `.distcp` files to spread items over (default: one per 5 GB of data). */
  files?: number;
  /** Non-tensor entries (name → value), stored as torch.save bytes items. */
  objects?: ReadonlyMap<string, PyValue>;
  /** Original nesting per name (planner_data); defaults to `(name,)`. Megatron writes none. */
  paths?: ReadonlyMap<string, ReadonlyArray<string | number>>;
  /** Leave planner_data empty (Megatron's planner does not flatten). */
  noPlannerData?: boolean;
}

/** A global tensor written as chunks (each its own item), as sharded savers write them. */
export interface DcpTensorEntry {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** Each chunk's offset in the global tensor and a target of the chunk's own shape. */
  readonly chunks: ReadonlyArray<{ readonly offsets: readonly number[]; readonly tensor: TargetTensor }>;
}

const DEFAULT_FILE_BYTES = 5_000_000_000;

interface Item {
  readonly fqn: string;
  readonly size: number;
  readonly parts: Part[];
  /** For tensor chunks: the chunk's offsets. */
  readonly offsets?: readonly number[];
}

/** One whole-tensor chunk per target: what `dcp.save` writes for plain tensors in one process. */
export function writeDcp(tensors: readonly TargetTensor[], opts: DcpWriteOptions = {}): WriteReport {
  return writeDcpChunked(
    tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, chunks: [{ offsets: t.shape.map(() => 0), tensor: t }] })),
    opts,
  );
}

export function writeDcpChunked(entries: readonly DcpTensorEntry[], opts: DcpWriteOptions = {}): WriteReport {
  const items: Item[] = [];
  // Objects without tensors are literal archives; equal pickles (Megatron's thousands of empty
  // `_extra_state` entries) share one.
  const objectArchives = new Map<string, { parts: Part[]; size: number }>();
  for (const [fqn, value] of opts.objects ?? []) {
    const pkl = pickle(value);
    const key = Buffer.from(pkl).toString('latin1');
    let a = objectArchives.get(key);
    if (!a) objectArchives.set(key, (a = torchArchiveParts('archive', value, [], pkl)));
    items.push({ fqn, size: a.size, parts: a.parts });
  }
  // A chunk archive's pickle depends only on the chunk's dtype and shape: pickled once per kind
  // (MoE checkpoints have tens of thousands of same-shaped expert chunks).
  const pickles = new Map<string, Uint8Array>();
  for (const e of entries) {
    if (!dtypeInfo(e.dtype).torchDtype) throw unsupported(`tensor ${e.name}: torch has no dtype for ${e.dtype}`, undefined, e.name);
    checkTiling(e.name, e.shape, e.chunks.map((c) => ({ start: c.offsets, size: c.tensor.shape })), '(output)');
    for (const c of e.chunks) {
      if (c.tensor.dtype !== e.dtype) throw new Error(`internal: chunk of ${e.name} is ${c.tensor.dtype}, tensor is ${e.dtype}`);
      const ref = contiguousTensorRef('0', c.tensor);
      const kind = `${c.tensor.dtype}:${c.tensor.shape.join(',')}`;
      let pkl = pickles.get(kind);
      if (!pkl) pickles.set(kind, (pkl = pickle(ref)));
      const a = tensorArchiveParts('archive', c.tensor, pkl);
      items.push({ fqn: e.name, size: a.size, parts: a.parts, offsets: c.offsets });
    }
  }
  const total = items.reduce((s, i) => s + i.size, 0);
  const nFiles = Math.max(1, Math.min(items.length, opts.files ?? Math.ceil(total / DEFAULT_FILE_BYTES)));
  // Balance bytes across files (largest first into the lightest file), then keep the original
  // order inside each file with bytes items first, as torch writes them.
  const load = new Array<number>(nFiles).fill(0);
  const fileOf = new Map<Item, number>();
  for (const it of [...items].sort((a, b) => b.size - a.size)) {
    let best = 0;
    for (let i = 1; i < nFiles; i++) if (load[i]! < load[best]!) best = i;
    fileOf.set(it, best);
    load[best]! += it.size;
  }
  const files: OutputFile[] = [];
  const storageData = new PyDict();
  const itemsOf: Item[][] = Array.from({ length: nFiles }, () => []);
  for (const it of items) itemsOf[fileOf.get(it)!]!.push(it);
  for (let i = 0; i < nFiles; i++) {
    const rel = `__0_${i}.distcp`;
    const parts: Part[] = [];
    let at = 0;
    for (const it of itemsOf[i]!) {
      // torch leaves None fields out of MetadataIndex and _StorageInfo states.
      const index = new PyObject(DCP_MODULE, 'MetadataIndex', PyDict.from(it.offsets ? { fqn: it.fqn, offset: new TorchSize([...it.offsets]), index: 0 } : { fqn: it.fqn, index: null }));
      const info = new PyObject(FS_MODULE, '_StorageInfo', PyDict.from({ relative_path: rel, offset: at, length: it.size }));
      storageData.set(index, info);
      parts.push(...it.parts);
      at += it.size;
    }
    files.push({ relPath: rel, size: at, parts });
  }
  const sdm = new PyDict();
  const planner = new PyDict();
  const pathOf = (n: string): PyTuple => new PyTuple([...(opts.paths?.get(n) ?? [n])]);
  for (const [fqn] of opts.objects ?? []) {
    sdm.set(fqn, new PyObject(DCP_MODULE, 'BytesStorageMetadata', new PyDict()));
    if (!opts.noPlannerData) planner.set(fqn, pathOf(fqn));
  }
  for (const e of entries) {
    const props = new PyObject(DCP_MODULE, 'TensorProperties', new PyTuple([
      new PyGlobal('torch', dtypeInfo(e.dtype).torchDtype!),
      new PyGlobal('torch', 'strided'),
      false,
      new PyObject(DCP_MODULE, '_MEM_FORMAT_ENCODING', null, [0], 'call'),
      false,
    ]));
    const chunks = e.chunks.map((c) => new PyObject(DCP_MODULE, 'ChunkStorageMetadata', PyDict.from({ offsets: new TorchSize([...c.offsets]), sizes: new TorchSize([...c.tensor.shape]) })));
    sdm.set(e.name, new PyObject(DCP_MODULE, 'TensorStorageMetadata', PyDict.from({ properties: props, size: new TorchSize([...e.shape]), chunks })));
    if (!opts.noPlannerData) planner.set(e.name, pathOf(e.name));
  }
  const metadata = new PyObject(DCP_MODULE, 'Metadata', PyDict.from({
    state_dict_metadata: sdm,
    planner_data: planner,
    storage_data: storageData,
    storage_meta: new PyObject(DCP_MODULE, 'StorageMeta', PyDict.from({ checkpoint_id: null, save_id: null, load_id: null, modules: [] })),
    version: '1.0.0',
  }));
  const metaBytes = pickle(metadata);
  files.push({ relPath: '.metadata', size: metaBytes.length, parts: [metaBytes] });
  return { files, dropped: [] };
}
