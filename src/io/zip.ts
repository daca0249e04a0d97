/**
 * The zip container that torch.save uses (PyTorchStreamWriter, built on miniz).
 *
 * Hand-written rather than taken from a zip library because (a) reading must work over a byte
 * range of a larger file (DCP embeds one archive per tensor chunk in a `.distcp`) and hand back
 * exact data offsets so tensors are read in place, never extracted; and (b) writing must
 * reproduce torch's layout — STORED records whose data starts on a 64-byte boundary thanks to a
 * `FB` padding extra field, data descriptors, zip64 end records — which no npm zip writer
 * controls. Only what torch archives use is supported: stored (uncompressed), unencrypted,
 * single-disk archives; anything else is refused by name.
 */
import { crc32 } from 'node:zlib';
import type { ByteSource } from './file.js';
import { badInput, unsupported } from '../util/errors.js';
import type { Part, TensorSlot } from '../lazy/types.js';

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const SIG_DESCRIPTOR = 0x08074b50;
const U32_MAX = 0xffffffff;

export interface ZipEntry {
  readonly name: string;
  /** Absolute position of the record's data within the ByteSource. */
  readonly dataOffset: number;
  readonly size: number;
  readonly crc: number;
}

export interface ZipIndex {
  readonly entries: ReadonlyMap<string, ZipEntry>;
  /** Entry names in central-directory order. */
  readonly order: readonly string[];
}

function u16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}
function u32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
function u64(b: Uint8Array, o: number, what: string, file: string): number {
  const lo = u32(b, o);
  const hi = u32(b, o + 4);
  const v = hi * 2 ** 32 + lo;
  if (!Number.isSafeInteger(v)) throw badInput(`${file}: zip ${what} ${v} is too large`, file);
  return v;
}

/** Reads the central directory of the zip archive in `src`; checks every record lies inside it. */
export async function readZipIndex(src: ByteSource): Promise<ZipIndex> {
  const file = src.name;
  if (src.size < 22) throw badInput(`${file}: not a zip archive (${src.size} bytes)`, file);
  // The end record sits in the last 22 bytes plus its comment (up to 64 KiB); torch writes no
  // comment, so the few bytes of the end record and the zip64 locator usually suffice. (DCP
  // checkpoints embed one archive per chunk: tens of thousands of these reads.)
  const find = (tail: Uint8Array): number => {
    for (let i = tail.length - 22; i >= 0; i--) if (u32(tail, i) === SIG_EOCD && i + 22 + u16(tail, i + 20) <= tail.length) return i;
    return -1;
  };
  let tailLen = Math.min(src.size, 22 + 20);
  let tailStart = src.size - tailLen;
  let tail = await src.read(tailStart, tailLen);
  let eocd = find(tail);
  if (eocd < 0 && tailLen < src.size) {
    tailLen = Math.min(src.size, 22 + 65535 + 20);
    tailStart = src.size - tailLen;
    tail = await src.read(tailStart, tailLen);
    eocd = find(tail);
  }
  if (eocd < 0) throw badInput(`${file}: no zip end-of-central-directory record (truncated, or not a torch zip file)`, file);
  if (u16(tail, eocd + 4) !== 0 || u16(tail, eocd + 6) !== 0) throw unsupported(`${file}: multi-disk zip archives are not supported`, file);
  let count = u16(tail, eocd + 10);
  let cdSize = u32(tail, eocd + 12);
  let cdOffset = u32(tail, eocd + 16);
  const locAt = eocd - 20;
  if (locAt >= 0 && u32(tail, locAt) === SIG_ZIP64_LOCATOR) {
    const z64Offset = u64(tail, locAt + 8, 'zip64 record offset', file);
    if (z64Offset + 56 > src.size) throw badInput(`${file}: zip64 end record points past the end of the file`, file);
    const z = await src.read(z64Offset, 56);
    if (u32(z, 0) !== SIG_ZIP64_EOCD) throw badInput(`${file}: corrupt zip64 end-of-central-directory record`, file);
    count = u64(z, 32, 'entry count', file);
    cdSize = u64(z, 40, 'central directory size', file);
    cdOffset = u64(z, 48, 'central directory offset', file);
  }
  const cdEnd = tailStart + (locAt >= 0 && u32(tail, locAt) === SIG_ZIP64_LOCATOR ? locAt : eocd);
  if (cdOffset + cdSize > src.size || cdOffset + cdSize > cdEnd + 56 + 20 + 22 || cdSize < 46 * count) {
    throw badInput(`${file}: zip central directory (offset ${cdOffset}, ${cdSize} bytes, ${count} entries) does not fit the file (truncated or corrupt)`, file);
  }
  const cd = await src.read(cdOffset, cdSize);
  const raw: Array<{ name: string; localOffset: number; size: number; csize: number; crc: number }> = [];
  let p = 0;
  for (let i = 0; i < count; i++) {
    if (p + 46 > cd.length || u32(cd, p) !== SIG_CENTRAL) throw badInput(`${file}: corrupt zip central directory (entry ${i} of ${count})`, file);
    const flags = u16(cd, p + 8);
    const method = u16(cd, p + 10);
    const crc = u32(cd, p + 16);
    let csize = u32(cd, p + 20);
    let size = u32(cd, p + 24);
    const nameLen = u16(cd, p + 28);
    const extraLen = u16(cd, p + 30);
    const commentLen = u16(cd, p + 32);
    let localOffset = u32(cd, p + 42);
    if (p + 46 + nameLen + extraLen + commentLen > cd.length) throw badInput(`${file}: corrupt zip central directory (entry ${i} runs past it)`, file);
    const name = new TextDecoder().decode(cd.subarray(p + 46, p + 46 + nameLen));
    // zip64 extended information: the 8-byte values of the fields that read 0xFFFFFFFF, in order.
    let e = p + 46 + nameLen;
    const eEnd = e + extraLen;
    while (e + 4 <= eEnd) {
      const id = u16(cd, e);
      const len = u16(cd, e + 2);
      if (id === 0x0001) {
        let q = e + 4;
        if (size === U32_MAX) { size = u64(cd, q, 'entry size', file); q += 8; }
        if (csize === U32_MAX) { csize = u64(cd, q, 'entry size', file); q += 8; }
        if (localOffset === U32_MAX) { localOffset = u64(cd, q, 'entry offset', file); q += 8; }
        if (q > e + 4 + len) throw badInput(`${file}: corrupt zip64 extra field for ${name}`, file);
      }
      e += 4 + len;
    }
    if (flags & 1) throw unsupported(`${file}: record ${name} is encrypted`, file);
    if (method !== 0) throw unsupported(`${file}: record ${name} is compressed (method ${method}); torch archives store records uncompressed`, file);
    if (csize !== size) throw badInput(`${file}: record ${name} has compressed size ${csize} but size ${size} though it is stored`, file);
    raw.push({ name, localOffset, size, csize, crc });
    p += 46 + nameLen + extraLen + commentLen;
  }
  // Local headers tell where each record's data starts (their extra field carries torch's padding).
  const entries = new Map<string, ZipEntry>();
  const order: string[] = [];
  const BATCH = 64;
  for (let i = 0; i < raw.length; i += BATCH) {
    const batch = raw.slice(i, i + BATCH);
    const headers = await Promise.all(
      batch.map((r) => {
        if (r.localOffset + 30 > cdOffset) throw badInput(`${file}: record ${r.name}'s local header lies past the central directory (corrupt)`, file);
        return src.read(r.localOffset, 30);
      }),
    );
    batch.forEach((r, j) => {
      const h = headers[j]!;
      if (u32(h, 0) !== SIG_LOCAL) throw badInput(`${file}: record ${r.name} has no local header at offset ${r.localOffset} (corrupt)`, file);
      const dataOffset = r.localOffset + 30 + u16(h, 26) + u16(h, 28);
      if (dataOffset + r.size > cdOffset) {
        throw badInput(`${file}: record ${r.name} (${r.size} bytes at ${dataOffset}) runs past the end of the data (truncated or corrupt)`, file);
      }
      if (entries.has(r.name)) throw badInput(`${file}: record ${r.name} appears twice in the archive`, file);
      entries.set(r.name, { name: r.name, dataOffset, size: r.size, crc: r.crc });
      order.push(r.name);
    });
  }
  return { entries, order };
}

export async function readEntry(src: ByteSource, e: ZipEntry): Promise<Uint8Array> {
  return src.read(e.dataOffset, e.size);
}

/** Reads a small record and checks its CRC-32 (used for data.pkl and the marker records). */
export async function readEntryChecked(src: ByteSource, e: ZipEntry): Promise<Uint8Array> {
  const b = await src.read(e.dataOffset, e.size);
  if (crc32(b) !== e.crc) throw badInput(`${src.name}: record ${e.name} fails its CRC-32 check (corrupt)`, src.name);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Writer

/** One record to write: literal bytes, or a tensor slot streamed by the executor. */
export type ZipRecord = { name: string; data: Uint8Array } | { name: string; slot: TensorSlot };

const ALIGN = 64;

/** A record's local header at archive offset `at`, with the `FB` extra field that pads its data to 64 bytes. */
function localHeader(name: Uint8Array, at: number): Uint8Array {
  const headerEnd = at + 30 + name.length + 4; // 4 bytes of the FB extra-field header
  const padLen = (ALIGN - (headerEnd % ALIGN)) % ALIGN;
  const local = new Uint8Array(30 + name.length + 4 + padLen);
  const dv = new DataView(local.buffer);
  dv.setUint32(0, SIG_LOCAL, true);
  dv.setUint16(4, 0, true); // version needed: torch writes 0
  dv.setUint16(6, 0x0808, true); // data descriptor follows; UTF-8 names
  // method, time, date, crc, sizes: all 0 here; the descriptor and central directory hold them
  dv.setUint16(26, name.length, true);
  dv.setUint16(28, 4 + padLen, true);
  local.set(name, 30);
  local[30 + name.length] = 0x46; // 'F'
  local[31 + name.length] = 0x42; // 'B'
  dv.setUint16(32 + name.length, padLen, true);
  local.fill(0x5a, 34 + name.length); // 'Z'
  return local;
}

function descriptorLen(size: number): number {
  return size >= U32_MAX ? 24 : 16;
}

/** The data descriptor after a record's data, written into `d` at `o`. */
function writeDescriptor(d: Uint8Array, o: number, size: number, crc: number): void {
  const v = new DataView(d.buffer, d.byteOffset + o, descriptorLen(size));
  v.setUint32(0, SIG_DESCRIPTOR, true);
  v.setUint32(4, crc, true);
  if (size >= U32_MAX) {
    v.setBigUint64(8, BigInt(size), true);
    v.setBigUint64(16, BigInt(size), true);
  } else {
    v.setUint32(8, size, true);
    v.setUint32(12, size, true);
  }
}

function descriptor(size: number, crc: number): Uint8Array {
  const d = new Uint8Array(descriptorLen(size));
  writeDescriptor(d, 0, size, crc);
  return d;
}

/**
 * Lays out a torch-style archive as executor parts. Offsets (and so the 64-byte alignment) are
 * relative to the archive's start, as torch computes them, which is what DCP's embedded archives
 * need too. Returns the parts, the total size and each record's data offset.
 */
export function zipParts(records: readonly ZipRecord[]): { parts: Part[]; size: number; dataOffsets: Map<string, number> } {
  const parts: Part[] = [];
  const dataOffsets = new Map<string, number>();
  const central: Array<() => Uint8Array> = [];
  const centralSizes: number[] = [];
  let at = 0;
  for (const r of records) {
    const name = Buffer.from(r.name, 'utf8');
    const size = 'data' in r ? r.data.length : r.slot.tensor.byteLength;
    const local = localHeader(name, at);
    const localOffset = at;
    parts.push(local);
    at += local.length;
    dataOffsets.set(r.name, at);
    let crcOf: () => number;
    if ('data' in r) {
      const c = crc32(r.data);
      crcOf = () => c;
      parts.push(r.data, descriptor(size, c));
    } else {
      const slot = r.slot;
      crcOf = () => slot.crc;
      parts.push(slot, () => descriptor(size, slot.crc));
    }
    at += size + descriptorLen(size);
    central.push(() => centralEntry(name, size, localOffset, crcOf()));
    centralSizes.push(46 + name.length + centralExtraLen(size, localOffset));
  }
  const cdOffset = at;
  const cdSize = centralSizes.reduce((a, b) => a + b, 0);
  parts.push(() => {
    const chunks = central.map((f) => f());
    const total = chunks.reduce((s, c) => s + c.length, 0);
    if (total !== cdSize) throw new Error(`internal: zip central directory is ${total} bytes, planned ${cdSize}`);
    return Buffer.concat(chunks);
  });
  at += cdSize;
  const end = endRecords(records.length, cdSize, cdOffset, at);
  parts.push(end);
  at += end.length;
  return { parts: coalesce(parts), size: at, dataOffsets };
}

/**
 * The same bytes in fewer parts: each run of literal and computed parts between two tensor slots
 * becomes one part (one literal when the run has nothing computed). A computed run is still
 * called only once the slots before it are written, which is all its parts need.
 */
function coalesce(parts: readonly Part[]): Part[] {
  const out: Part[] = [];
  let run: Array<Uint8Array | (() => Uint8Array)> = [];
  const flush = (): void => {
    if (run.length === 0) return;
    // Adjacent literals joined first.
    const merged: Array<Uint8Array | (() => Uint8Array)> = [];
    let lits: Uint8Array[] = [];
    for (const p of run) {
      if (p instanceof Uint8Array) lits.push(p);
      else {
        if (lits.length) merged.push(lits.length === 1 ? lits[0]! : Buffer.concat(lits));
        lits = [];
        merged.push(p);
      }
    }
    if (lits.length) merged.push(lits.length === 1 ? lits[0]! : Buffer.concat(lits));
    if (merged.length === 1) out.push(merged[0]!);
    else out.push(() => Buffer.concat(merged.map((p) => (p instanceof Uint8Array ? p : p()))));
    run = [];
  };
  for (const p of parts) {
    if (p instanceof Uint8Array || typeof p === 'function') run.push(p);
    else {
      flush();
      out.push(p);
    }
  }
  flush();
  return out;
}

/**
 * A record of a template: literal bytes (the same in every instance), the place of the one tensor
 * slot (its byte length), or bytes each instance gives (their length).
 */
export type TemplateRecord = { name: string; data: Uint8Array } | { name: string; slotBytes: number } | { name: string; dynamicBytes: number };

export interface ZipTemplate {
  readonly size: number;
  /**
   * One archive's parts: the shared bytes up to the tensor's data, the slot, and everything after
   * it computed when written (the slot's CRC-32 and `dynamic()`, the per-instance records' bytes).
   */
  parts(slot: TensorSlot, dynamic: () => readonly Uint8Array[]): Part[];
}

/**
 * An archive layout computed once and instantiated many times — what `zipParts` would lay out for
 * the same records, byte for byte. DCP outputs embed one single-tensor archive per chunk (tens of
 * thousands for MoE models, all of a few shapes); instantiating a template costs one closure
 * instead of a layout. Records before the slot must be literal.
 */
export function zipTemplate(records: readonly TemplateRecord[]): ZipTemplate {
  const slotAt = records.findIndex((r) => 'slotBytes' in r);
  if (slotAt < 0 || records.findIndex((r, i) => i !== slotAt && 'slotBytes' in r) >= 0) throw new Error('internal: a zip template holds exactly one tensor slot');
  if (records.slice(0, slotAt).some((r) => 'dynamicBytes' in r)) throw new Error('internal: zip template records before the slot must be literal');
  const head: Uint8Array[] = [];
  // The tail (from the slot's descriptor on) as bytes with holes, filled per instance.
  const tail: Uint8Array[] = [];
  let tailLen = 0;
  const put = (b: Uint8Array): void => {
    tail.push(b);
    tailLen += b.length;
  };
  const crcAt: Array<{ record: number; at: number }> = []; // tail offsets where a record's CRC goes
  const dataAt = new Map<number, number>(); // dynamic record → its data's tail offset
  const entries: Array<{ name: Uint8Array; size: number; localOffset: number; crc?: number }> = [];
  let at = 0;
  let tailStart = 0;
  records.forEach((r, i) => {
    const name = Buffer.from(r.name, 'utf8');
    const size = 'data' in r ? r.data.length : 'slotBytes' in r ? r.slotBytes : r.dynamicBytes;
    const local = localHeader(name, at);
    entries.push({ name, size, localOffset: at, ...('data' in r ? { crc: crc32(r.data) } : {}) });
    at += local.length + size + descriptorLen(size);
    if (i < slotAt) head.push(local, (r as { data: Uint8Array }).data, descriptor(size, entries[i]!.crc!));
    else if (i === slotAt) {
      head.push(local);
      tailStart = at - descriptorLen(size);
      crcAt.push({ record: i, at: tailLen + 4 });
      put(new Uint8Array(descriptorLen(size)));
      writeDescriptor(tail.at(-1)!, 0, size, 0);
    } else {
      put(local);
      if ('data' in r) put(r.data);
      else {
        dataAt.set(i, tailLen);
        put(new Uint8Array(size));
      }
      const d = descriptor(size, entries[i]!.crc ?? 0);
      if (entries[i]!.crc === undefined) crcAt.push({ record: i, at: tailLen + 4 });
      put(d);
    }
  });
  const cdOffset = at;
  let cdSize = 0;
  for (const [i, e] of entries.entries()) {
    if (e.crc === undefined) crcAt.push({ record: i, at: tailLen + 16 });
    const c = centralEntry(e.name, e.size, e.localOffset, e.crc ?? 0);
    put(c);
    cdSize += c.length;
  }
  at += cdSize;
  const end = endRecords(records.length, cdSize, cdOffset, at);
  put(end);
  at += end.length;
  const headBytes = Buffer.concat(head);
  const tailBytes = Buffer.concat(tail);
  const slotBytes = entries[slotAt]!.size;
  if (headBytes.length + slotBytes + tailBytes.length !== at || tailStart !== headBytes.length + slotBytes) {
    throw new Error('internal: zip template layout does not add up');
  }
  const dynamic = [...dataAt.keys()];
  return {
    size: at,
    parts(slot, dyn) {
      return [
        headBytes,
        slot,
        () => {
          const out = Uint8Array.from(tailBytes);
          const v = new DataView(out.buffer);
          const given = dyn();
          const crcs = new Map<number, number>([[slotAt, slot.crc]]);
          dynamic.forEach((rec, k) => {
            const b = given[k]!;
            if (b.length !== entries[rec]!.size) throw new Error(`internal: ${records[rec]!.name} is ${b.length} bytes, the template has ${entries[rec]!.size}`);
            out.set(b, dataAt.get(rec)!);
            crcs.set(rec, crc32(b));
          });
          for (const c of crcAt) v.setUint32(c.at, crcs.get(c.record)!, true);
          return out;
        },
      ];
    },
  };
}

function centralExtraLen(size: number, localOffset: number): number {
  const values = (size >= U32_MAX ? 2 : 0) + (localOffset >= U32_MAX ? 1 : 0);
  return values ? 4 + 8 * values : 0;
}

function centralEntry(name: Uint8Array, size: number, localOffset: number, crc: number): Uint8Array {
  const bigSize = size >= U32_MAX;
  const bigOffset = localOffset >= U32_MAX;
  const extraValues = (bigSize ? 2 : 0) + (bigOffset ? 1 : 0);
  const extraLen = centralExtraLen(size, localOffset);
  const b = new Uint8Array(46 + name.length + extraLen);
  const v = new DataView(b.buffer);
  v.setUint32(0, SIG_CENTRAL, true);
  v.setUint16(4, 0, true); // version made by: torch writes 0
  v.setUint16(6, extraValues ? 45 : 0, true);
  v.setUint16(8, 0x0808, true);
  v.setUint32(16, crc, true);
  v.setUint32(20, bigSize ? U32_MAX : size, true);
  v.setUint32(24, bigSize ? U32_MAX : size, true);
  v.setUint16(28, name.length, true);
  v.setUint16(30, extraLen, true);
  v.setUint32(42, bigOffset ? U32_MAX : localOffset, true);
  b.set(name, 46);
  if (extraValues) {
    let q = 46 + name.length;
    v.setUint16(q, 0x0001, true);
    v.setUint16(q + 2, 8 * extraValues, true);
    q += 4;
    if (bigSize) {
      v.setBigUint64(q, BigInt(size), true);
      v.setBigUint64(q + 8, BigInt(size), true);
      q += 16;
    }
    if (bigOffset) v.setBigUint64(q, BigInt(localOffset), true);
  }
  return b;
}

/** zip64 end record + locator + classic end record, as miniz writes them for torch. */
function endRecords(count: number, cdSize: number, cdOffset: number, z64At: number): Uint8Array {
  const b = new Uint8Array(56 + 20 + 22);
  const v = new DataView(b.buffer);
  v.setUint32(0, SIG_ZIP64_EOCD, true);
  v.setBigUint64(4, 44n, true);
  v.setUint16(12, 0x031e, true);
  v.setUint16(14, 45, true);
  v.setBigUint64(24, BigInt(count), true);
  v.setBigUint64(32, BigInt(count), true);
  v.setBigUint64(40, BigInt(cdSize), true);
  v.setBigUint64(48, BigInt(cdOffset), true);
  v.setUint32(56, SIG_ZIP64_LOCATOR, true);
  v.setBigUint64(64, BigInt(z64At), true);
  v.setUint32(72, 1, true);
  v.setUint32(76, SIG_EOCD, true);
  v.setUint16(84, Math.min(count, 0xffff), true);
  v.setUint16(86, Math.min(count, 0xffff), true);
  v.setUint32(88, Math.min(cdSize, U32_MAX), true);
  v.setUint32(92, Math.min(cdOffset, U32_MAX), true);
  return b;
}
