/**
 * What a re-run may take over, and what it must refuse (issue 16; found by an independent review
 * of the output state machine). A finished output or a stranded `.partial` is trusted only when
 * its manifest lists exactly the files this run writes, its recorded source is unchanged, its
 * side files are copies of this run's, and every file has its SHA-256; a `.partial` another user
 * planted (or everyone can write into) is never adopted; a side file cut short by a kill is copied
 * again on resume.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chmod, chown, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { runCli } from '../helpers/cli.js';
import { outputDigest as tree } from '../helpers/tree.js';
import { writeOutput, type WriteOutputOptions } from '../../src/exec/output.js';
import type { OutputFile } from '../../src/lazy/types.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-trust-'));
  await chmod(tmp, 0o755);
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const run = runCli;

/** A source directory (two data files, one side file) and a plan writing two files from it. */
async function fixture(name: string): Promise<{ src: string; out: string; files: OutputFile[]; side: Array<{ from: string; to: string }>; opts: WriteOutputOptions }> {
  const src = join(tmp, name, 'src');
  await mkdir(src, { recursive: true });
  await writeFile(join(src, 'a.bin'), Buffer.alloc(3000, 1));
  await writeFile(join(src, 'b.bin'), Buffer.alloc(5000, 2));
  await writeFile(join(src, 'config.json'), '{"x": 1}\n');
  const files: OutputFile[] = [
    { relPath: 'a.out', size: 3, parts: [new Uint8Array([1, 2, 3])] },
    { relPath: 'b.out', size: 4, parts: [new Uint8Array([4, 5, 6, 7])] },
  ];
  const side = [{ from: join(src, 'config.json'), to: 'config.json' }];
  const opts: WriteOutputOptions = { reuseComplete: true, manifest: { command: 'test', sourceFormat: 'bin', targetFormat: 'out', sourceDir: src, sourceFiles: ['a.bin', 'b.bin'] } };
  return { src, out: join(tmp, name, 'out'), files, side, opts };
}

async function editManifest(dir: string, edit: (m: { files: Record<string, unknown> }) => void): Promise<void> {
  const p = join(dir, 'shardshift-manifest.json');
  const m = JSON.parse(await readFile(p, 'utf8'));
  edit(m);
  await writeFile(p, JSON.stringify(m));
}

test('reuseComplete keeps only this very output: not one missing a file (manifest edited to match), nor one listing a path of its own, nor one whose side file differs', async () => {
  const f = await fixture('reuse');
  assert.equal(await writeOutput(f.src, f.out, 'dir', f.files, f.side, f.opts), 'written');
  assert.equal(await writeOutput(f.src, f.out, 'dir', f.files, f.side, f.opts), 'reused');
  // A file removed from the output and from its manifest alike.
  await rm(join(f.out, 'b.out'));
  await editManifest(f.out, (m) => delete m.files['b.out']);
  await assert.rejects(writeOutput(f.src, f.out, 'dir', f.files, f.side, f.opts), /already exists and is not this run's finished output \(its manifest lists other files than this run writes\)/);
  // A manifest entry pointing outside the directory (it would be hashed, and trusted).
  await writeFile(join(f.out, 'b.out'), Buffer.from([4, 5, 6, 7]));
  await editManifest(f.out, (m) => {
    m.files['b.out'] = { size: 4, sha256: 'x' };
    m.files['../src/a.bin'] = { size: 3000, sha256: 'y' };
  });
  await assert.rejects(writeOutput(f.src, f.out, 'dir', f.files, f.side, f.opts), /its manifest lists other files than this run writes/);
  // The side file's source changed since: the kept config.json would be stale.
  const g = await fixture('reuse-side');
  assert.equal(await writeOutput(g.src, g.out, 'dir', g.files, g.side, g.opts), 'written');
  await writeFile(join(g.src, 'config.json'), '{"x": 2}\n');
  await assert.rejects(writeOutput(g.src, g.out, 'dir', g.files, g.side, g.opts), /its config\.json is not a copy of \S+config\.json/);
  // The source changed since.
  const h = await fixture('reuse-source');
  assert.equal(await writeOutput(h.src, h.out, 'dir', h.files, h.side, h.opts), 'written');
  await writeFile(join(h.src, 'b.bin'), Buffer.alloc(5000, 3));
  await assert.rejects(writeOutput(h.src, h.out, 'dir', h.files, h.side, h.opts), /b\.bin changed since it was made/);
});

test('reuseComplete never keeps an output directory another user owns or everyone can write into', async () => {
  if (process.getuid?.() !== 0) return; // chown needs root; the ownership rule is the same code as for .partial below
  const f = await fixture('reuse-owner');
  assert.equal(await writeOutput(f.src, f.out, 'dir', f.files, f.side, f.opts), 'written');
  await chmod(f.out, 0o777);
  await assert.rejects(writeOutput(f.src, f.out, 'dir', f.files, f.side, f.opts), /is writable by every user/);
  await chmod(f.out, 0o755);
  await chown(f.out, 65534, 65534);
  await assert.rejects(writeOutput(f.src, f.out, 'dir', f.files, f.side, f.opts), /belongs to another user \(uid 65534\)/);
});

// Megatron output: several files plus side files (config, tokenizer) copied from the source.
const ARGS = (out: string): string[] => ['convert', '--to', 'megatron', '--dcp-files', '4', '-q', example, out];

test('a finished .partial stranded before its rename is not committed once its source has changed', async () => {
  const src = join(tmp, 'stranded-src');
  await mkdir(src);
  for (const n of ['config.json', 'model.safetensors']) await writeFile(join(src, n), await readFile(join(example, n)));
  const out = join(tmp, 'stranded-out');
  const args = ['convert', '--to', 'megatron', '-q', src, out];
  assert.equal((await run(args, { SHARDSHIFT_TEST_KILL_BEFORE_COMMIT: '1' })).signal, 'SIGKILL');
  // Rewritten in place at the same size between the kill and the re-run.
  const p = join(src, 'model.safetensors');
  const b = await readFile(p);
  b[b.length - 5] = b[b.length - 5]! ^ 0x10;
  await writeFile(p, b);
  const r = await run(args);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /stranded-out\.partial holds a finished conversion that is not this run's \(\S+model\.safetensors changed since it was made\); remove it to start over/);
  assert.ok(!existsSync(out), 'nothing committed');
  assert.ok(existsSync(`${out}.partial`), 'nothing removed');
});

test('an empty .partial another user planted, or one everyone can write into, is refused and left alone', async () => {
  const out = join(tmp, 'planted-out');
  await mkdir(`${out}.partial`);
  await chmod(`${out}.partial`, 0o777);
  let r = await run(ARGS(out));
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /planted-out\.partial is not this user's partial output \(\S+ is writable by every user\); remove it to start over/);
  if (process.getuid?.() === 0) {
    await chmod(`${out}.partial`, 0o755);
    await chown(`${out}.partial`, 65534, 65534);
    r = await run(ARGS(out));
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /belongs to another user \(uid 65534\)/);
  }
  assert.ok(existsSync(`${out}.partial`) && !existsSync(out));
});

test('a side file cut short by a kill in a resumed .partial is copied again, not committed truncated', async () => {
  const ref = join(tmp, 'side-ref');
  assert.equal((await run(ARGS(ref))).code, 0);
  const want = await tree(ref);
  const out = join(tmp, 'side-out');
  assert.equal((await run(ARGS(out), { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' })).signal, 'SIGKILL');
  // As a kill in the middle of copying it would leave it (side files are copied after the data files).
  const side = Object.keys(want).find((k) => k.endsWith('config.json'))!;
  await mkdir(join(`${out}.partial`, side, '..'), { recursive: true });
  await writeFile(join(`${out}.partial`, side), '{"vocab_si');
  const r = await run(ARGS(out));
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(await tree(out), want);
});
