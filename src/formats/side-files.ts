/**
 * Files that travel beside the weights (config.json, generation_config.json, tokenizer files,
 * chat templates, training args ...). Sources list them; conversions copy them.
 */
import { readdir, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { MANIFEST_NAME } from '../exec/manifest.js';

/**
 * Relative paths of regular files under `dir` (two levels deep) for which `isData` is false. A
 * symlink to a regular file counts as that file: the Hugging Face hub cache holds every file of a
 * snapshot as `snapshots/<rev>/config.json -> ../../blobs/<sha>`, and those must travel too.
 * Links to directories are not followed (no loops, no walking out of the checkpoint). shardshift's
 * own record of a checkpoint it wrote (`shardshift-manifest.json`; dot files are skipped anyway) is
 * never a side file: copied into the next output, it would stand beside (and be overwritten by)
 * that output's own manifest, which then records the wrong checksum for itself.
 */
export async function listSideFiles(dir: string, isData: (name: string, rel: string) => boolean, depth = 2): Promise<string[]> {
  const out: string[] = [];
  async function walk(d: string, left: number): Promise<void> {
    const entries = await readdir(d, { withFileTypes: true });
    for (const e of entries.sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const full = join(d, e.name);
      const rel = relative(dir, full);
      if (e.isDirectory()) {
        if (left > 0 && !e.name.startsWith('.')) await walk(full, left - 1);
      } else if ((e.isFile() || (e.isSymbolicLink() && (await stat(full).then((st) => st.isFile(), () => false)))) && !isData(e.name, rel) && !e.name.startsWith('.') && e.name !== MANIFEST_NAME) {
        out.push(rel);
      }
    }
  }
  await walk(dir, depth - 1);
  return out;
}
