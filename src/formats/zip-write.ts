/**
 * Writing the zip container torch.save uses, byte for byte as PyTorchStreamWriter lays it out
 * (see `io/zip.ts` for why it is hand-written): STORED records whose data starts on a 64-byte
 * boundary thanks to a `FB` padding extra field, data descriptors, zip64 end records. Tensor
 * records are slots the executor streams, so an archive is planned without holding its data.
 */
import { crc32 } from 'node:zlib';
import { SIG_LOCAL, SIG_CENTRAL, SIG_EOCD, SIG_ZIP64_EOCD, SIG_ZIP64_LOCATOR, SIG_DESCRIPTOR, U32_MAX } from '../io/zip.js';
import type { Part, TensorSlot } from '../lazy/types.js';


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
