/** The safe pickle reader and the protocol-2 writer. */
export { unpickle, toPlain, DEFAULT_LIMITS, type UnpickleOptions, type UnpickleLimits } from './unpickler.js';
export { pickle, encodeLong, type PickleOptions } from './pickler.js';
export { UnpicklingError, PicklingError, type UnpicklingErrorInfo } from './errors.js';
export {
  ALLOWLIST, storageFromPersistentId, valueGlobal, dataclass, enumClass, defaultBuild, isBlockedGlobal, fixImports,
  fail, arity, expectInt, expectBool, expectString, expectIntTuple, sequenceItems,
  TORCH_DTYPE_NAMES, TORCH_STORAGE_NAMES, TORCH_LAYOUT_NAMES, TORCH_MEMORY_FORMAT_NAMES,
  type AllowList, type AllowEntry, type ValueEntry, type FunctionEntry, type ClassEntry, type CallContext,
} from './allowlist.js';
export * from './values.js';
