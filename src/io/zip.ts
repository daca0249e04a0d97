/**
 * The zip container that torch.save uses (PyTorchStreamWriter, built on miniz).
 *
 * Hand-written rather than taken from a zip library because (a) reading must work over a byte
 * range of a larger file (DCP embeds one archive per tensor chunk in a `.distcp`) and hand back
 * exact data offsets so tensors are read in place, never extracted; and (b) writing must
 * reproduce torch's layout — STORED records whose data starts on a 64-byte boundary thanks to a
 * `FB` padding extra field, data descriptors, zip64 end records — which no npm zip writer
 * controls. Only what torch archives use is supported: stored (uncompressed), unencrypted,
 * single-disk archives; anything else is refused by name. The writer, which streams target
 * tensors, is `formats/zip-write.ts`.
 */
import { crc32 } from 'node:zlib';
import type { ByteSource } from './file.js';
import { badInput, unsupported } from '../util/errors.js';

export const SIG_LOCAL = 0x04034b50;
export const SIG_CENTRAL = 0x02014b50;
export const SIG_EOCD = 0x06054b50;
export const SIG_ZIP64_EOCD = 0x06064b50;
export const SIG_ZIP64_LOCATOR = 0x07064b50;
export const SIG_DESCRIPTOR = 0x08074b50;
export const U32_MAX = 0xffffffff;

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
