/**
 * One torch.save zip archive, over any ByteSource: its pickle (read by the safe unpickler) and
 * its storages, and the reverse — an archive's records for a value holding tensors.
 *
 * Shared by the torch-file format (pytorch_model.bin, *.pt) and by DCP, whose `.distcp` files hold
 * one such archive per tensor chunk and per non-tensor entry.
 */
import { createHash } from 'node:crypto';
import type { ByteSource } from '../io/file.js';
import { readEntryChecked, readZipIndex, type ZipEntry } from '../io/zip.js';
import { zipParts, zipTemplate, type ZipRecord, type ZipTemplate } from './zip-write.js';
import { badInput, unsupported, ShardshiftError } from '../util/errors.js';
import { unpickle, pickle, storageFromPersistentId, UnpicklingError, type UnpickleOptions } from '../pickle/index.js';
import type { AllowList } from '../pickle/index.js';
import { StorageRef, TensorRef, type PyValue } from '../pickle/values.js';
import { dtypeFromTorch, dtypeInfo, itemSize, numelOf, type DType } from '../tensor/dtype.js';
import { contiguousStrides, stridedExtent, wholeBox, type Piece } from '../tensor/layout.js';
import { tensorSlot, type Part, type TargetTensor } from '../lazy/types.js';

export interface TorchArchive {
  readonly src: ByteSource;
  /** The archive-name prefix (`archive`, or the saved file's stem). */
  readonly prefix: string;
  readonly root: PyValue;
  readonly storages: ReadonlyMap<string, { ref: StorageRef; entry: ZipEntry }>;
}

/** Opens a torch.save archive: reads the central directory and unpickles `data.pkl`. */
export async function openTorchArchive(src: ByteSource, opts: { extraGlobals?: AllowList } = {}): Promise<TorchArchive> {
  const file = src.name;
  const index = await readZipIndex(src);
  const pkl = index.order.find((n) => n === 'data.pkl' || /^[^/]+\/data\.pkl$/.test(n));
  if (!pkl) throw badInput(`${file}: zip archive has no data.pkl record (not a torch.save file)`, file);
  const prefix = pkl === 'data.pkl' ? '' : pkl.slice(0, pkl.indexOf('/'));
  const rec = (n: string): ZipEntry | undefined => index.entries.get(prefix ? `${prefix}/${n}` : n);
  const byteorder = rec('byteorder');
  if (byteorder) {
    const b = new TextDecoder().decode(await readEntryChecked(src, byteorder));
    if (b !== 'little') throw unsupported(`${file}: saved with byteorder "${b}"; only little-endian checkpoints are supported`, file);
  }
  const data = await readEntryChecked(src, rec('data.pkl')!);
  const storages = new Map<string, { ref: StorageRef; entry: ZipEntry }>();
  const root = unpickleChecked(data, file, pkl, {
    extraGlobals: opts.extraGlobals,
    persistentLoad: (pid) => {
      const ref = storageFromPersistentId(pid);
      const seen = storages.get(ref.key);
      if (seen) {
        if (seen.ref.dtype !== ref.dtype) throw badInput(`${file}: storage ${ref.key} is named with two dtypes (${seen.ref.dtype}, ${ref.dtype})`, file);
        return seen.ref;
      }
      const entry = rec(`data/${ref.key}`);
      if (!entry) throw badInput(`${file}: pickle names storage ${ref.key} but the archive has no data/${ref.key} record`, file);
      const item = itemSize(ref.dtype)!;
      if (entry.size !== ref.numel * item) {
        throw badInput(
          `${file}: storage data/${ref.key} declares ${ref.numel} elements of ${ref.dtype} (${ref.numel * item} bytes) but its zip record holds ${entry.size} bytes`,
          file,
        );
      }
      storages.set(ref.key, { ref, entry });
      return ref;
    },
  });
  return { src, prefix, root, storages };
}

/**
 * Unpickles with the file named first in any refusal (`model.pt: pickle calls a global that is
 * not allowed: os.system (at byte 2 of archive/data.pkl)`); errors raised by our own callbacks
 * (a storage that disagrees with its record) pass through as they are.
 */
export function unpickleChecked(data: Uint8Array, file: string, record: string, opts: Omit<UnpickleOptions, 'source'>): PyValue {
  try {
    return unpickle(data, { ...opts, source: `${file}:${record}` });
  } catch (e) {
    if (e instanceof UnpicklingError) {
      if (e.cause instanceof ShardshiftError) throw e.cause;
      throw badInput(`${file}: ${e.reason}${e.pos === undefined ? '' : ` (at byte ${e.pos} of ${record})`}`, file, undefined, e);
    }
    throw e;
  }
}

/** The piece a TensorRef reads from; checks it stays inside its storage. */
export function tensorPiece(arc: TorchArchive, t: TensorRef, name: string): Piece {
  const file = arc.src.name;
  const st = arc.storages.get(t.storage.key);
  if (!st) throw badInput(`${file}: tensor ${name} uses storage ${t.storage.key}, which the archive does not hold`, file, name);
  const item = itemSize(t.dtype);
  if (item === undefined) throw unsupported(`${file}: tensor ${name} has sub-byte dtype ${t.dtype}`, file, name);
  const storageBytes = st.entry.size;
  const extent = stridedExtent(t.shape, t.stride);
  if (t.shape.length !== t.stride.length) throw badInput(`${file}: tensor ${name} has ${t.shape.length} sizes but ${t.stride.length} strides`, file, name);
  if (t.stride.some((s) => s < 0)) throw badInput(`${file}: tensor ${name} has a negative stride`, file, name);
  const end = (t.storageOffset + extent) * item;
  if (extent > 0 && end > storageBytes) {
    throw badInput(
      `${file}: tensor ${name} (shape [${t.shape.join(', ')}], offset ${t.storageOffset}) reaches byte ${end} of storage ${t.storage.key}, which holds ${storageBytes}`,
      file,
      name,
    );
  }
  // A view may claim more bytes than its storage holds only by reading elements more than once
  // (stride 0, or strides that overlap: torch's expand / as_strided). Small ones (a broadcast
  // bias) are materialised; a 1.6 KB file claiming 4 TiB this way is refused, not ground through.
  const logical = t.shape.reduce((n, d) => n * d, 1) * item;
  if (logical > storageBytes && logical > EXPANDED_VIEW_LIMIT) {
    throw unsupported(
      `${file}: tensor ${name} (shape [${t.shape.join(', ')}], strides [${t.stride.join(', ')}]) reads its ${storageBytes}-byte storage ${t.storage.key} as ${logical} bytes (an expanded or self-overlapping view); such views are materialised only up to ${EXPANDED_VIEW_LIMIT} bytes`,
      file,
      name,
    );
  }
  return { box: wholeBox(t.shape), file: arc.src, byteOffset: st.entry.dataOffset + t.storageOffset * item, strides: t.stride };
}

/** The largest expanded (stride-0 / self-overlapping) view materialised: 1 GiB. */
export const EXPANDED_VIEW_LIMIT = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Writing

/**
 * The records of a torch.save archive holding `root`, whose tensor leaves are given as
 * `TensorRef`s built by `storageFor`. Record order follows torch 2.13: data.pkl, .format_version,
 * .storage_alignment, byteorder, data/<key> in key order, version, .data/serialization_id.
 */
export function torchArchiveParts(
  prefix: string,
  root: PyValue,
  storages: ReadonlyArray<{ key: string; tensor: TargetTensor }>,
  /** `pickle(root)`, when the caller already has it (many archives of the same structure). */
  pickled?: Uint8Array,
): { parts: Part[]; size: number } {
  const pkl = pickled ?? pickle(root);
  const enc = (s: string): Uint8Array => Buffer.from(s, 'utf8');
  const p = (n: string): string => `${prefix}/${n}`;
  const sorted = [...storages].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  const sid = serializationId(pkl, sorted);
  const records: ZipRecord[] = [
    { name: p('data.pkl'), data: pkl },
    { name: p('.format_version'), data: enc('1') },
    { name: p('.storage_alignment'), data: enc('64') },
    { name: p('byteorder'), data: enc('little') },
    ...sorted.map((s) => ({ name: p(`data/${s.key}`), slot: tensorSlot(s.tensor, true) })),
    { name: p('version'), data: enc('3\n') },
    { name: p('.data/serialization_id'), data: enc(sid) },
  ];
  const z = zipParts(records);
  return { parts: z.parts, size: z.size };
}

/** torch derives `.data/serialization_id` from the process; a hash of what is written keeps outputs reproducible. */
function serializationId(pkl: Uint8Array, storages: ReadonlyArray<{ key: string; tensor: TargetTensor }>): string {
  const h = createHash('sha256').update(pkl);
  for (const s of storages) h.update(`${s.key}:${s.tensor.name}:${s.tensor.byteLength};`);
  return BigInt('0x' + h.digest('hex').slice(0, 32)).toString().padStart(40, '0').slice(-40);
}

const templates = new Map<string, WeakMap<Uint8Array, ZipTemplate>>();

/**
 * The archive `torch.save(tensor)` writes for one tensor alone in storage `key` (what DCP embeds
 * per chunk), from its pickle `pkl` — the same bytes as `torchArchiveParts`, through a layout
 * computed once per pickle (callers pass the same `pkl` object for same-shaped tensors).
 */
export function tensorArchiveParts(prefix: string, tensor: TargetTensor, pkl: Uint8Array, key = '0'): { parts: Part[]; size: number } {
  let byPkl = templates.get(`${prefix}\0${key}`);
  if (!byPkl) templates.set(`${prefix}\0${key}`, (byPkl = new WeakMap()));
  let t = byPkl.get(pkl);
  // The pickle names the tensor's dtype and shape, so it fixes the data's length too.
  if (!t) {
    const enc = (s: string): Uint8Array => Buffer.from(s, 'utf8');
    const p = (n: string): string => `${prefix}/${n}`;
    t = zipTemplate([
      { name: p('data.pkl'), data: pkl },
      { name: p('.format_version'), data: enc('1') },
      { name: p('.storage_alignment'), data: enc('64') },
      { name: p('byteorder'), data: enc('little') },
      { name: p(`data/${key}`), slotBytes: tensor.byteLength },
      { name: p('version'), data: enc('3\n') },
      { name: p('.data/serialization_id'), dynamicBytes: 40 },
    ]);
    byPkl.set(pkl, t);
  }
  const slot = tensorSlot(tensor, true);
  return { parts: t.parts(slot, () => [Buffer.from(serializationId(pkl, [{ key, tensor }]), 'utf8')]), size: t.size };
}

/** A fresh contiguous TensorRef for a target tensor stored alone in storage `key`. */
export function contiguousTensorRef(key: string, t: TargetTensor, parameter = false): TensorRef {
  const info = dtypeInfo(t.dtype);
  if (!info.torchDtype) throw unsupported(`tensor ${t.name}: torch has no dtype for ${t.dtype}`, undefined, t.name);
  const numel = numelOf(t.shape);
  const typed = info.torchStorage !== undefined;
  const storage = new StorageRef(key, typed ? t.dtype : 'U8', 'cpu', typed ? numel : t.byteLength, !typed);
  return new TensorRef(storage, 0, [...t.shape], contiguousStrides(t.shape), t.dtype, false, parameter);
}

export function torchDtypeOf(name: string): DType | undefined {
  return dtypeFromTorch(name);
}
