/** SHA-256 of every file of an output (a directory tree, or one file as '.'), manifest excluded: what "the same bytes" means in the resume and fault tests. */
import { readFile, readdir, stat } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';

export async function outputDigest(path: string): Promise<Record<string, string>> {
  const sha = async (f: string): Promise<string> => createHash('sha256').update(await readFile(f)).digest('hex');
  if (!(await stat(path)).isDirectory()) return { '.': await sha(path) };
  const out: Record<string, string> = {};
  const walk = async (d: string, rel: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(join(d, e.name), r);
      else if (e.name !== 'shardshift-manifest.json') out[r] = await sha(join(d, e.name));
    }
  };
  await walk(path, '');
  return out;
}
