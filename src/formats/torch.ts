/**
 * torch.save files: `pytorch_model.bin`, `*.pt`, `*.pth`, and sharded `pytorch_model-0000i-of-0000n.bin`
 * with `pytorch_model.bin.index.json`. Only the zip format (torch ≥ 1.6) is read; the legacy
 * pickle-stream and tar formats are recognised and refused by name.
 */
import { readdir, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { ReadOnlyFile } from '../io/file.js';
import { badInput, unsupported, usage } from '../util/errors.js';
import { byteLength, numelOf, type DType } from '../tensor/dtype.js';
import { readBox, type Box, type Piece } from '../tensor/layout.js';
import { PyDict, TensorRef, type PyValue } from '../pickle/values.js';
import { type CheckpointSource, type SourceObject, type WriteReport } from './types.js';
import { type OutputFile, type SourceTensor, type TargetTensor } from '../lazy/types.js';
import { openTorchArchive, tensorPiece, torchArchiveParts, contiguousTensorRef, type TorchArchive } from './torch-archive.js';
import { planShards, shardName, indexFile, DEFAULT_MAX_SHARD_SIZE, readWeightMap } from './shards.js';
import { listSideFiles } from './side-files.js';
import { flattenTree, mapTreeLeaves } from './tree.js';

const TORCH_EXT = /\.(bin|pt|pth|ckpt)$/;

export type TorchFileKind = 'zip' | 'legacy-pickle' | 'legacy-tar' | 'other';

/** Looks at the first bytes: a zip (torch ≥ 1.6), the legacy pickle stream, or the older tar. */
export async function sniffTorchFile(f: ReadOnlyFile): Promise<TorchFileKind> {
  const head = await f.read(0, Math.min(f.size, 512));
  if (head[0] === 0x50 && head[1] === 0x4b && head[2] === 0x03 && head[3] === 0x04) return 'zip';
  // Legacy torch.save: protocol-2 pickle of the magic number 0x1950a86a20f9469cfc6c (LONG1, 10 bytes).
  if (head[0] === 0x80 && head[1] === 0x02 && head[2] === 0x8a && head[3] === 0x0a) return 'legacy-pickle';
  if (head.length >= 262 && new TextDecoder().decode(head.subarray(257, 262)) === 'ustar') return 'legacy-tar';
  return 'other';
}

class TorchTensor implements SourceTensor {
  readonly byteLength: number;
  readonly pieces: Piece[];
  constructor(
    readonly name: string,
    readonly dtype: DType,
    readonly shape: readonly number[],
    piece: Piece,
    readonly where: string,
  ) {
    this.byteLength = byteLength(dtype, numelOf(shape));
    this.pieces = [piece];
  }
  read(box: Box, out: Uint8Array): Promise<void> {
    return readBox(this.name, this.dtype, this.shape, this.pieces, box, out);
  }
}

export async function isTorchPath(path: string): Promise<boolean> {
  const st = await stat(path);
  if (st.isFile()) {
    const f = await ReadOnlyFile.open(path);
    try {
      const k = await sniffTorchFile(f);
      return k !== 'other';
    } finally {
      await f.close();
    }
  }
  const names = await readdir(path);
  return names.some((n) => n.endsWith('.bin.index.json') || n.endsWith('.pt.index.json')) || names.filter((n) => TORCH_EXT.test(n)).length === 1;
}

async function openArchiveFile(path: string): Promise<{ f: ReadOnlyFile; arc: TorchArchive }> {
  const f = await ReadOnlyFile.open(path);
  try {
    const kind = await sniffTorchFile(f);
    if (kind === 'legacy-pickle' || kind === 'legacy-tar') {
      throw unsupported(
        `${path}: legacy (pre-1.6) torch.save ${kind === 'legacy-tar' ? 'tar' : 'pickle-stream'} format is not supported; re-save it with a current torch (torch.save(torch.load(f, weights_only=True), f2))`,
        path,
      );
    }
    if (kind !== 'zip') throw badInput(`${path}: not a torch.save zip archive`, path);
    return { f, arc: await openTorchArchive(f) };
  } catch (e) {
    await f.close();
    throw e;
  }
}

export async function openTorch(path: string): Promise<CheckpointSource> {
  const st = await stat(path);
  let dir: string;
  let files: string[];
  let weightMap: Map<string, string> | undefined;
  if (st.isFile()) {
    dir = join(path, '..');
    files = [basename(path)];
  } else {
    dir = path;
    const names = (await readdir(path)).sort();
    const idx = names.filter((n) => n.endsWith('.bin.index.json') || n.endsWith('.pt.index.json'));
    if (idx.length > 1) throw usage(`${path}: several torch indexes (${idx.join(', ')}); name one file`);
    if (idx.length === 1) {
      weightMap = await readWeightMap(join(path, idx[0]!), (v) => TORCH_EXT.test(v), 'torch.save (.bin/.pt)');
      files = [...new Set(weightMap.values())];
    } else {
      files = names.filter((n) => TORCH_EXT.test(n));
      if (files.length !== 1) throw usage(`${path}: ${files.length} torch files and no index.json; name the file to read`);
    }
  }
  const opened: ReadOnlyFile[] = [];
  const tensors = new Map<string, SourceTensor>();
  const objects = new Map<string, SourceObject>();
  let tree: PyValue | undefined;
  try {
    for (const rel of files) {
      const full = join(dir, rel);
      const { f, arc } = await openArchiveFile(full).catch((e: unknown) => {
        if ((e as { code?: string }).code === 'ENOENT') throw badInput(`${full}: shard named by the index is missing`, full);
        throw e;
      });
      opened.push(f);
      const where = files.length > 1 || !st.isFile() ? rel : basename(full);
      for (const leaf of flattenTree(arc.root)) {
        if (leaf.value instanceof TensorRef) {
          const piece = tensorPiece(arc, leaf.value, leaf.name);
          if (tensors.has(leaf.name)) throw badInput(`${full}: tensor ${leaf.name} also appears in another shard`, full, leaf.name);
          if (weightMap && weightMap.get(leaf.name) !== rel) {
            throw badInput(`${full}: holds tensor ${leaf.name} that the index ${weightMap.has(leaf.name) ? `places in ${weightMap.get(leaf.name)}` : 'does not list'}`, full, leaf.name);
          }
          tensors.set(leaf.name, new TorchTensor(leaf.name, leaf.value.dtype, leaf.value.shape, piece, `${where}:data/${leaf.value.storage.key}`));
        } else {
          objects.set(leaf.name, { name: leaf.name, value: leaf.value, where });
        }
      }
      if (files.length === 1) tree = arc.root;
    }
    if (weightMap) {
      const missing = [...weightMap.keys()].filter((n) => !tensors.has(n));
      if (missing.length) throw badInput(`${dir}: index lists ${missing.length} tensors no shard holds: ${missing.slice(0, 5).join(', ')}`, dir, missing[0]);
    }
  } catch (e) {
    await Promise.all(opened.map((f) => f.close()));
    throw e;
  }
  const sideFiles = st.isFile() ? [] : await listSideFiles(dir, (n) => TORCH_EXT.test(n) || n.endsWith('.index.json'));
  return {
    format: 'torch',
    path,
    root: dir,
    tensors,
    objects,
    tree,
    metadata: new Map(),
    dataFiles: files,
    sideFiles,
    close: async () => {
      await Promise.all(opened.map((f) => f.close()));
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface TorchWriteOptions {
  maxShardSize?: number;
  /** `pytorch_model` → pytorch_model.bin / pytorch_model-0000i-of-0000n.bin + .bin.index.json */
  prefix?: string;
  /** Write exactly one file with this name. */
  singleFile?: string;
  /**
   * Nesting to reproduce (a torch source's tree). Tensor leaves are replaced by the target tensor
   * of the same flattened name; object leaves are kept. Only for single-file output.
   */
  tree?: PyValue;
  /** Non-tensor entries to carry in a flat output (name → value). */
  objects?: ReadonlyMap<string, PyValue>;
}

export function writeTorch(tensors: readonly TargetTensor[], opts: TorchWriteOptions = {}): WriteReport {
  const prefix = opts.prefix ?? 'pytorch_model';
  const shards = opts.singleFile ? [[...tensors]] : planShards(tensors, opts.maxShardSize ?? DEFAULT_MAX_SHARD_SIZE);
  if (shards.length === 0) shards.push([]);
  const files: OutputFile[] = [];
  const weightMap: Array<[string, string]> = [];
  let total = 0;
  shards.forEach((shard, i) => {
    const rel = opts.singleFile ?? shardName(prefix, 'bin', i, shards.length);
    const storages: Array<{ key: string; tensor: TargetTensor }> = [];
    const byName = new Map(shard.map((t) => [t.name, t]));
    const refFor = (t: TargetTensor): TensorRef => {
      const key = String(storages.length);
      storages.push({ key, tensor: t });
      return contiguousTensorRef(key, t);
    };
    let root: PyValue;
    if (opts.tree !== undefined && shards.length === 1) {
      const used = new Set<string>();
      root = mapTreeLeaves(opts.tree, (name, leaf) => {
        const t = byName.get(name);
        if (!t) return leaf;
        used.add(name);
        return refFor(t);
      });
      const extra = shard.filter((t) => !used.has(t.name));
      if (extra.length) throw new Error(`internal: ${extra.length} target tensors are not in the tree (${extra[0]!.name})`);
    } else {
      const d = new PyDict();
      for (const t of shard) d.set(t.name, refFor(t));
      if (i === 0 && opts.objects) for (const [k, v] of opts.objects) d.set(k, v);
      root = d;
    }
    const stem = rel.replace(/\.[^.]*$/, '').replace(/^.*\//, '');
    const { parts, size } = torchArchiveParts(stem, root, storages);
    files.push({ relPath: rel, size, parts });
    for (const t of shard) {
      weightMap.push([t.name, rel]);
      total += t.byteLength;
    }
  });
  if (files.length > 1) files.push(indexFile(`${prefix}.bin.index.json`, weightMap, total));
  return { files, dropped: [] };
}
