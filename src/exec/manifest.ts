/**
 * What a finished output says about itself (`shardshift-manifest.json`, written last) and what an
 * interrupted one records so a re-run can resume (`.shardshift-progress.json` inside
 * `<out>.partial`): the tool version, the source's identity, the plan's hash, each file's SHA-256.
 */
import { createHash } from 'node:crypto';
import { open, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { OutputFile } from '../lazy/types.js';
import { VERSION } from '../util/version.js';

export const MANIFEST_NAME = 'shardshift-manifest.json';
export const PROGRESS_NAME = '.shardshift-progress.json';

export interface FileRecord {
  readonly size: number;
  readonly sha256: string;
}

export interface SourceFileIdentity {
  readonly path: string;
  readonly size: number;
  readonly mtimeMs: number;
  /** `sha256` of the whole file, or `sha256-head-tail` of its first and last MiB plus its size. */
  readonly hash: string;
  readonly hashKind: 'sha256' | 'sha256-head-tail';
}

export interface Manifest {
  readonly tool: 'shardshift';
  readonly version: string;
  readonly created: string;
  readonly command: string;
  readonly source: { readonly path: string; readonly format: string; readonly files: readonly SourceFileIdentity[] };
  readonly target: { readonly format: string };
  readonly planHash: string;
  readonly files: Readonly<Record<string, FileRecord>>;
}

export interface Progress {
  readonly planHash: string;
  readonly files: Record<string, FileRecord>;
}

/**
 * A hash of everything that decides the output bytes: each file's path, size and parts (tensor
 * name, dtype, shape and what it is made from; literal bytes by content), plus side files.
 */
export function planHash(files: readonly OutputFile[], extra: unknown = null): string {
  const h = createHash('sha256');
  h.update(`shardshift ${VERSION}\n`);
  for (const f of files) {
    h.update(`file ${f.relPath} ${f.size}\n`);
    for (const p of f.parts) {
      if (p instanceof Uint8Array) h.update(`bytes ${createHash('sha256').update(p).digest('hex')}\n`);
      else if (typeof p === 'function') h.update('computed\n');
      else h.update(`tensor ${p.tensor.name} ${p.tensor.dtype} [${p.tensor.shape.join(',')}] ${p.tensor.describe}\n`);
    }
  }
  h.update(JSON.stringify(extra));
  return h.digest('hex');
}

const EDGE = 1 << 20;

/** Identity of one source file: size, mtime and a content hash (whole file when `full`). */
export async function identifyFile(path: string, full: boolean): Promise<SourceFileIdentity> {
  const st = await stat(path);
  const fh = await open(path, 'r');
  try {
    const h = createHash('sha256');
    const buf = Buffer.alloc(Math.min(16 << 20, Math.max(1, st.size)));
    if (full || st.size <= 2 * EDGE) {
      for (let pos = 0; pos < st.size; ) {
        const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, st.size - pos), pos);
        if (bytesRead === 0) break;
        h.update(buf.subarray(0, bytesRead));
        pos += bytesRead;
      }
      return { path, size: st.size, mtimeMs: st.mtimeMs, hash: h.digest('hex'), hashKind: 'sha256' };
    }
    for (const at of [0, st.size - EDGE]) {
      const { bytesRead } = await fh.read(buf, 0, EDGE, at);
      h.update(buf.subarray(0, bytesRead));
    }
    h.update(String(st.size));
    return { path, size: st.size, mtimeMs: st.mtimeMs, hash: h.digest('hex'), hashKind: 'sha256-head-tail' };
  } finally {
    await fh.close();
  }
}

export async function identifySource(dir: string, rels: readonly string[], full: boolean): Promise<SourceFileIdentity[]> {
  const out: SourceFileIdentity[] = [];
  for (const r of rels) out.push(await identifyFile(join(dir, r), full));
  return out;
}
