/**
 * The dtype table: every safetensors dtype with its torch names and its size.
 *
 * The safetensors name is the canonical one inside shardshift (it is what the most common
 * on-disk format spells). Torch has two spellings that reach disk: the `torch.<X>Storage` class
 * that torch.save's pickle names for legacy typed storages, and the `torch.<dtype>` global that
 * DCP metadata and untyped storages name. Sub-byte types (F4, F6_*) have no torch storage class
 * and are carried through untouched; slicing them is allowed only on whole bytes.
 */

export const DTYPES = [
  'BOOL', 'U8', 'I8', 'U16', 'I16', 'F16', 'BF16', 'U32', 'I32', 'F32', 'U64', 'I64', 'F64', 'C64',
  'F8_E4M3', 'F8_E5M2', 'F8_E8M0', 'F8_E4M3FNUZ', 'F8_E5M2FNUZ', 'F4', 'F6_E2M3', 'F6_E3M2',
  // Not a safetensors dtype: torch can save complex128, so torch and DCP files may hold it.
  'C128',
] as const;

export type DType = (typeof DTYPES)[number];

export interface DTypeInfo {
  readonly name: DType;
  /** Bits per element (4 and 6 for the sub-byte types). */
  readonly bits: number;
  /** `torch.<name>` (the dtype object), or undefined where torch has none. */
  readonly torchDtype?: string;
  /** `torch.<Name>Storage` legacy typed-storage class that torch.save pickles, where one exists. */
  readonly torchStorage?: string;
  /** numpy-ish short name for display. */
  readonly short: string;
  /** Is this a floating-point type (for NaN/Inf checks and casts)? */
  readonly float: boolean;
  /** Whether safetensors can store it (all but C128). */
  readonly safetensors: boolean;
}

const TABLE: Record<DType, Omit<DTypeInfo, 'name' | 'safetensors'> & { safetensors?: false }> = {
  BOOL: { bits: 8, torchDtype: 'bool', torchStorage: 'BoolStorage', short: 'bool', float: false },
  U8: { bits: 8, torchDtype: 'uint8', torchStorage: 'ByteStorage', short: 'u8', float: false },
  I8: { bits: 8, torchDtype: 'int8', torchStorage: 'CharStorage', short: 'i8', float: false },
  U16: { bits: 16, torchDtype: 'uint16', short: 'u16', float: false },
  I16: { bits: 16, torchDtype: 'int16', torchStorage: 'ShortStorage', short: 'i16', float: false },
  F16: { bits: 16, torchDtype: 'float16', torchStorage: 'HalfStorage', short: 'f16', float: true },
  BF16: { bits: 16, torchDtype: 'bfloat16', torchStorage: 'BFloat16Storage', short: 'bf16', float: true },
  U32: { bits: 32, torchDtype: 'uint32', short: 'u32', float: false },
  I32: { bits: 32, torchDtype: 'int32', torchStorage: 'IntStorage', short: 'i32', float: false },
  F32: { bits: 32, torchDtype: 'float32', torchStorage: 'FloatStorage', short: 'f32', float: true },
  U64: { bits: 64, torchDtype: 'uint64', short: 'u64', float: false },
  I64: { bits: 64, torchDtype: 'int64', torchStorage: 'LongStorage', short: 'i64', float: false },
  F64: { bits: 64, torchDtype: 'float64', torchStorage: 'DoubleStorage', short: 'f64', float: true },
  C64: { bits: 64, torchDtype: 'complex64', torchStorage: 'ComplexFloatStorage', short: 'c64', float: true },
  F8_E4M3: { bits: 8, torchDtype: 'float8_e4m3fn', short: 'f8e4m3', float: true },
  F8_E5M2: { bits: 8, torchDtype: 'float8_e5m2', short: 'f8e5m2', float: true },
  F8_E8M0: { bits: 8, torchDtype: 'float8_e8m0fnu', short: 'f8e8m0', float: true },
  F8_E4M3FNUZ: { bits: 8, torchDtype: 'float8_e4m3fnuz', short: 'f8e4m3fnuz', float: true },
  F8_E5M2FNUZ: { bits: 8, torchDtype: 'float8_e5m2fnuz', short: 'f8e5m2fnuz', float: true },
  F4: { bits: 4, short: 'f4', float: true },
  F6_E2M3: { bits: 6, short: 'f6e2m3', float: true },
  F6_E3M2: { bits: 6, short: 'f6e3m2', float: true },
  C128: { bits: 128, torchDtype: 'complex128', torchStorage: 'ComplexDoubleStorage', short: 'c128', float: true, safetensors: false },
};

const INFOS = new Map<DType, DTypeInfo>(DTYPES.map((d) => [d, { name: d, ...TABLE[d], safetensors: TABLE[d].safetensors ?? true }]));
const BY_TORCH_DTYPE = new Map<string, DType>();
const BY_TORCH_STORAGE = new Map<string, DType>();
for (const info of INFOS.values()) {
  if (info.torchDtype) BY_TORCH_DTYPE.set(info.torchDtype, info.name);
  if (info.torchStorage) BY_TORCH_STORAGE.set(info.torchStorage, info.name);
}
// torch dtype aliases that pickles may name (torch.half is pickled as torch.float16, but be lenient
// with the aliases torch itself accepts as attributes).
for (const [alias, d] of [
  ['half', 'F16'], ['float', 'F32'], ['double', 'F64'], ['long', 'I64'], ['int', 'I32'],
  ['short', 'I16'], ['cfloat', 'C64'], ['cdouble', 'C128'],
] as const) BY_TORCH_DTYPE.set(alias, d);

export function isDType(s: string): s is DType {
  return INFOS.has(s as DType);
}

export function dtypeInfo(d: DType): DTypeInfo {
  return INFOS.get(d)!;
}

/** `float32` → F32 (the attribute of `torch` that names the dtype), or undefined. */
export function dtypeFromTorch(name: string): DType | undefined {
  return BY_TORCH_DTYPE.get(name);
}

/** `FloatStorage` → F32, or undefined. */
export function dtypeFromTorchStorage(name: string): DType | undefined {
  return BY_TORCH_STORAGE.get(name);
}

/** Bytes for `numel` elements; throws for sub-byte types whose elements do not fill whole bytes. */
export function byteLength(d: DType, numel: number): number {
  const bits = dtypeInfo(d).bits * numel;
  if (bits % 8 !== 0) {
    throw new RangeError(`${numel} elements of ${d} (${dtypeInfo(d).bits} bits each) do not fill whole bytes`);
  }
  return bits / 8;
}

/** Whether `numel` elements of `d` fill whole bytes (always true but for the sub-byte types). */
export function fillsWholeBytes(d: DType, numel: number): boolean {
  return (dtypeInfo(d).bits * numel) % 8 === 0;
}

/** Size in bytes of one element; undefined for the sub-byte types. */
export function itemSize(d: DType): number | undefined {
  const bits = dtypeInfo(d).bits;
  return bits % 8 === 0 ? bits / 8 : undefined;
}

/** Alignment used when ordering tensors in a safetensors file (larger items first). */
export function alignmentOf(d: DType): number {
  return Math.max(1, Math.floor(dtypeInfo(d).bits / 8));
}

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const s of shape) n *= s;
  if (!Number.isSafeInteger(n)) throw new RangeError(`shape [${shape.join(', ')}] has more elements than can be counted exactly`);
  return n;
}
