/**
 * Pickle opcodes of protocols 0–5 (CPython's Lib/pickle.py, documented in Lib/pickletools.py).
 */

// Protocol 0 and 1
export const MARK = 0x28; // '(' push the mark
export const STOP = 0x2e; // '.' end of pickle
export const POP = 0x30; // '0' discard the top item
export const POP_MARK = 0x31; // '1' discard everything down to the mark
export const DUP = 0x32; // '2' duplicate the top item
export const FLOAT = 0x46; // 'F' float as decimal text
export const INT = 0x49; // 'I' int as decimal text ("00"/"01" are False/True)
export const BININT = 0x4a; // 'J' 4-byte signed int
export const BININT1 = 0x4b; // 'K' 1-byte unsigned int
export const LONG = 0x4c; // 'L' int as decimal text with an optional L suffix
export const BININT2 = 0x4d; // 'M' 2-byte unsigned int
export const NONE = 0x4e; // 'N'
export const PERSID = 0x50; // 'P' persistent id as a text line
export const BINPERSID = 0x51; // 'Q' persistent id from the stack
export const REDUCE = 0x52; // 'R' call a callable with an argument tuple
export const STRING = 0x53; // 'S' quoted, escaped byte string (Python 2 str)
export const BINSTRING = 0x54; // 'T' 4-byte length + bytes (Python 2 str)
export const SHORT_BINSTRING = 0x55; // 'U' 1-byte length + bytes (Python 2 str)
export const UNICODE = 0x56; // 'V' raw-unicode-escape text line
export const BINUNICODE = 0x58; // 'X' 4-byte length + UTF-8
export const APPEND = 0x61; // 'a'
export const BUILD = 0x62; // 'b' __setstate__ / __dict__ update
export const GLOBAL = 0x63; // 'c' module and name as two text lines
export const DICT = 0x64; // 'd' dict from the items above the mark
export const EMPTY_DICT = 0x7d; // '}'
export const APPENDS = 0x65; // 'e'
export const GET = 0x67; // 'g' memo index as text
export const BINGET = 0x68; // 'h' 1-byte memo index
export const INST = 0x69; // 'i' module/name lines, args above the mark
export const LONG_BINGET = 0x6a; // 'j' 4-byte memo index
export const LIST = 0x6c; // 'l' list from the items above the mark
export const EMPTY_LIST = 0x5d; // ']'
export const OBJ = 0x6f; // 'o' class and args above the mark
export const PUT = 0x70; // 'p' memo index as text
export const BINPUT = 0x71; // 'q' 1-byte memo index
export const LONG_BINPUT = 0x72; // 'r' 4-byte memo index
export const SETITEM = 0x73; // 's'
export const TUPLE = 0x74; // 't' tuple from the items above the mark
export const EMPTY_TUPLE = 0x29; // ')'
export const SETITEMS = 0x75; // 'u'
export const BINFLOAT = 0x47; // 'G' 8-byte big-endian double

// Protocol 2
export const PROTO = 0x80;
export const NEWOBJ = 0x81;
export const EXT1 = 0x82;
export const EXT2 = 0x83;
export const EXT4 = 0x84;
export const TUPLE1 = 0x85;
export const TUPLE2 = 0x86;
export const TUPLE3 = 0x87;
export const NEWTRUE = 0x88;
export const NEWFALSE = 0x89;
export const LONG1 = 0x8a;
export const LONG4 = 0x8b;

// Protocol 3
export const BINBYTES = 0x42; // 'B'
export const SHORT_BINBYTES = 0x43; // 'C'

// Protocol 4
export const SHORT_BINUNICODE = 0x8c;
export const BINUNICODE8 = 0x8d;
export const BINBYTES8 = 0x8e;
export const EMPTY_SET = 0x8f;
export const ADDITEMS = 0x90;
export const FROZENSET = 0x91;
export const NEWOBJ_EX = 0x92;
export const STACK_GLOBAL = 0x93;
export const MEMOIZE = 0x94;
export const FRAME = 0x95;

// Protocol 5
export const BYTEARRAY8 = 0x96;
export const NEXT_BUFFER = 0x97;
export const READONLY_BUFFER = 0x98;

/** Highest protocol this package reads. */
export const HIGHEST_PROTOCOL = 5;

const NAMES: Record<number, string> = {
  [MARK]: 'MARK', [STOP]: 'STOP', [POP]: 'POP', [POP_MARK]: 'POP_MARK', [DUP]: 'DUP', [FLOAT]: 'FLOAT',
  [INT]: 'INT', [BININT]: 'BININT', [BININT1]: 'BININT1', [LONG]: 'LONG', [BININT2]: 'BININT2',
  [NONE]: 'NONE', [PERSID]: 'PERSID', [BINPERSID]: 'BINPERSID', [REDUCE]: 'REDUCE', [STRING]: 'STRING',
  [BINSTRING]: 'BINSTRING', [SHORT_BINSTRING]: 'SHORT_BINSTRING', [UNICODE]: 'UNICODE',
  [BINUNICODE]: 'BINUNICODE', [APPEND]: 'APPEND', [BUILD]: 'BUILD', [GLOBAL]: 'GLOBAL', [DICT]: 'DICT',
  [EMPTY_DICT]: 'EMPTY_DICT', [APPENDS]: 'APPENDS', [GET]: 'GET', [BINGET]: 'BINGET', [INST]: 'INST',
  [LONG_BINGET]: 'LONG_BINGET', [LIST]: 'LIST', [EMPTY_LIST]: 'EMPTY_LIST', [OBJ]: 'OBJ', [PUT]: 'PUT',
  [BINPUT]: 'BINPUT', [LONG_BINPUT]: 'LONG_BINPUT', [SETITEM]: 'SETITEM', [TUPLE]: 'TUPLE',
  [EMPTY_TUPLE]: 'EMPTY_TUPLE', [SETITEMS]: 'SETITEMS', [BINFLOAT]: 'BINFLOAT', [PROTO]: 'PROTO',
  [NEWOBJ]: 'NEWOBJ', [EXT1]: 'EXT1', [EXT2]: 'EXT2', [EXT4]: 'EXT4', [TUPLE1]: 'TUPLE1', [TUPLE2]: 'TUPLE2',
  [TUPLE3]: 'TUPLE3', [NEWTRUE]: 'NEWTRUE', [NEWFALSE]: 'NEWFALSE', [LONG1]: 'LONG1', [LONG4]: 'LONG4',
  [BINBYTES]: 'BINBYTES', [SHORT_BINBYTES]: 'SHORT_BINBYTES', [SHORT_BINUNICODE]: 'SHORT_BINUNICODE',
  [BINUNICODE8]: 'BINUNICODE8', [BINBYTES8]: 'BINBYTES8', [EMPTY_SET]: 'EMPTY_SET', [ADDITEMS]: 'ADDITEMS',
  [FROZENSET]: 'FROZENSET', [NEWOBJ_EX]: 'NEWOBJ_EX', [STACK_GLOBAL]: 'STACK_GLOBAL', [MEMOIZE]: 'MEMOIZE',
  [FRAME]: 'FRAME', [BYTEARRAY8]: 'BYTEARRAY8', [NEXT_BUFFER]: 'NEXT_BUFFER', [READONLY_BUFFER]: 'READONLY_BUFFER',
};

/** `0x80` → `PROTO`; unknown codes as `opcode 0xNN`. */
export function opcodeName(code: number): string {
  return NAMES[code] ?? `opcode 0x${code.toString(16).padStart(2, '0')}`;
}
