/**
 * Fault matrix (issue 16, "make it last"): every writer — single-file and directory outputs of
 * every format — under SIGKILL at seeded random moments and just before the commit, a full disk
 * (a small tmpfs), a read-only file system, a directory it may not write (as an unprivileged
 * user), two concurrent runs, and a source rewritten mid-run. After each: nothing that looks done
 * unless it is complete, one readable message naming the path, and a re-run that gives the
 * uninterrupted run's bytes. Mounts and the user switch need root; without it those cases say so
 * and are skipped (the kill, concurrency and source cases always run).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { chmod, cp, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { outputDigest as digest } from '../helpers/tree.js';

const cli = join(repoRoot, 'dist', 'src', 'cli', 'main.js');
const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
let meg: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-faults-'));
  await chmod(tmp, 0o755);
  meg = join(tmp, 'source.meg');
  assert.equal((await run(['convert', '--to', 'megatron', '-q', example, meg])).code, 0);
});
after(async () => {
  for (const m of mounts) spawnSync('umount', [m]);
  await rm(tmp, { recursive: true, force: true });
});

interface Writer {
  readonly name: string;
  /** Output path under `dir`, and the arguments that write it from `src` (default source: the tiny Llama). */
  readonly out: (dir: string) => string;
  readonly args: (src: string, out: string) => string[];
  /** The file of the source the mid-run change rewrites. */
  readonly sourceFile: (src: string) => string;
  readonly source: () => string;
}

const hf = (): string => example;
const WRITERS: Writer[] = [
  { name: 'safetensors file', out: (d) => join(d, 'm.safetensors'), args: (s, o) => ['convert', '--to', 'safetensors', '-q', join(s, 'model.safetensors'), o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'safetensors shards', out: (d) => join(d, 'shards'), args: (s, o) => ['convert', '--to', 'safetensors', '-q', '--shard-size', '16KB', s, o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'torch file', out: (d) => join(d, 'm.pt'), args: (s, o) => ['convert', '--to', 'torch', '-q', join(s, 'model.safetensors'), o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'dcp', out: (d) => join(d, 'dcp'), args: (s, o) => ['convert', '--to', 'dcp', '-q', '--dcp-files', '2', s, o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'megatron torch_dist', out: (d) => join(d, 'meg'), args: (s, o) => ['convert', '--to', 'megatron', '-q', s, o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'megatron legacy', out: (d) => join(d, 'legacy'), args: (s, o) => ['convert', '--to', 'megatron', '-q', '--ckpt-format', 'torch', '--tp', '2', s, o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'megatron fsdp_dtensor', out: (d) => join(d, 'fsdp'), args: (s, o) => ['convert', '--to', 'megatron', '-q', '--ckpt-format', 'fsdp_dtensor', s, o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'nxd', out: (d) => join(d, 'nxd'), args: (s, o) => ['convert', '--to', 'nxd', '-q', '--tp', '2', '--hw-backend', 'trn1', s, o], sourceFile: (s) => join(s, 'model.safetensors'), source: hf },
  { name: 'hf export', out: (d) => join(d, 'hf'), args: (s, o) => ['convert', '--to', 'hf', '-q', s, o], sourceFile: (s) => join(s, 'iter_0000000', '__0_0.distcp'), source: () => meg },
];

function run(args: string[], env: Record<string, string> = {}, as?: number): Promise<{ code: number | null; signal: string | null; stderr: string }> {
  const [cmd, argv] = as === undefined ? [process.execPath, [cli, ...args]] : ['setpriv', [`--reuid=${as}`, `--regid=${as}`, '--clear-groups', process.execPath, cli, ...args]];
  return new Promise((res) => {
    execFile(cmd, argv, { env: { ...process.env, ...env } }, (err, _o, stderr) => {
      const e = err as (Error & { code?: number; signal?: string }) | null;
      res({ code: e ? (e.code ?? null) : 0, signal: e?.signal ?? null, stderr });
    });
  });
}

/** The uninterrupted run's output, per writer. */
const reference = new Map<string, Record<string, string>>();
async function ref(w: Writer): Promise<Record<string, string>> {
  let r = reference.get(w.name);
  if (!r) {
    const dir = join(tmp, `ref-${w.name.replace(/\W+/g, '-')}`);
    await mkdir(dir);
    const out = w.out(dir);
    const x = await run(w.args(w.source(), out));
    assert.equal(x.code, 0, `${w.name}: ${x.stderr}`);
    r = await digest(out);
    reference.set(w.name, r);
  }
  return r;
}

/** A fresh directory for one case. */
let n = 0;
async function caseDir(w: Writer, what: string): Promise<string> {
  const d = join(tmp, `${n++}-${w.name.replace(/\W+/g, '-')}-${what}`);
  await mkdir(d);
  return d;
}

/** One `shardshift: error: …` line, no stack trace. */
function oneMessage(stderr: string, label: string): string {
  const lines = stderr.trim().split('\n');
  assert.equal(lines.length, 1, `${label}: one message line, got:\n${stderr}`);
  assert.match(lines[0]!, /^shardshift: error: /, label);
  assert.ok(!/internal error|\n\s+at /.test(stderr), `${label}: ${stderr}`);
  return lines[0]!;
}

/** What a failed run may leave: nothing, or a resumable `.partial` (never `<out>`, never a lock). */
async function nothingDone(dir: string, out: string, label: string): Promise<void> {
  assert.ok(!existsSync(out), `${label}: ${out} exists after a failure`);
  assert.ok(!existsSync(`${out}.lock`), `${label}: lock left behind`);
  const left = (await readdir(dir)).filter((f) => !f.endsWith('.partial'));
  assert.deepEqual(left, [], `${label}: left ${left.join(', ')}`);
}

// Seeded kill moments (ms after spawn): node's start-up, planning, mid-write and late.
let seed = 20261202;
const rnd = (): number => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 8) / 2 ** 24;

const mounts: string[] = [];
function mountTmpfs(at: string, opts: string): boolean {
  const ok = spawnSync('mount', ['-t', 'tmpfs', '-o', opts, 'tmpfs', at]).status === 0;
  if (ok) mounts.push(at);
  return ok;
}

for (const w of WRITERS) {
  test(`faults: ${w.name} — SIGKILL at random moments and before the commit, then a re-run resumes to the same bytes`, async () => {
    const want = await ref(w);
    // Seeded moments after spawn (node's start-up, planning, writing), and the executor's own kill
    // points: after the first file, in the middle of the first file.
    const kills: Array<{ label: string; delay?: number; env?: Record<string, string> }> = [
      ...Array.from({ length: 4 }, () => {
        const delay = 40 + Math.floor(rnd() * 260);
        return { label: `at ${delay} ms`, delay };
      }),
      // The window a CI run hit at random: the directory made, the plan not yet recorded in it.
      { label: 'after creating the partial directory', env: { SHARDSHIFT_TEST_KILL_AFTER_MKDIR: '1' } },
      { label: 'after the first file', env: { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' } },
      { label: 'in the middle of the first file', env: { SHARDSHIFT_TEST_KILL_MID_FILE: '0' } },
    ];
    for (const [k, kill] of kills.entries()) {
      const dir = await caseDir(w, `kill${k}`);
      const out = w.out(dir);
      const child = spawn(process.execPath, [cli, ...w.args(w.source(), out)], { stdio: 'ignore', env: { ...process.env, ...kill.env } });
      const timer = kill.delay === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), kill.delay);
      const code = await new Promise<number | null>((res) => child.on('exit', (c) => res(c)));
      clearTimeout(timer);
      if (code === 0) {
        // Finished before the kill (a one-file output has no second file to be killed after).
        assert.deepEqual(await digest(out), want, `${w.name}: finished before the kill ${kill.label}`);
        continue;
      }
      if (existsSync(out)) {
        // Killed after the rename (while exiting): the output is whole, as the rename is atomic.
        assert.deepEqual(await digest(out), want, `${w.name}: killed ${kill.label} after its commit`);
        continue;
      }
      const again = await run(w.args(w.source(), out));
      assert.equal(again.code, 0, `${w.name} after a kill ${kill.label}: ${again.stderr}`);
      assert.deepEqual(await digest(out), want, `${w.name}: resumed after a kill ${kill.label}`);
    }
    // The last state transition: everything written and fsynced, killed before the rename.
    const dir = await caseDir(w, 'kill-commit');
    const out = w.out(dir);
    const r = await run(w.args(w.source(), out), { SHARDSHIFT_TEST_KILL_BEFORE_COMMIT: '1' });
    assert.notEqual(r.code, 0);
    assert.ok(!existsSync(out), `${w.name}: killed before the commit, yet ${out} exists`);
    assert.equal((await run(w.args(w.source(), out))).code, 0);
    assert.deepEqual(await digest(out), want, `${w.name}: committed after a kill before the rename`);
  });

  test(`faults: ${w.name} — full disk, read-only file system, no write permission: one message naming the path, nothing done`, async (t) => {
    await ref(w);
    const full = await caseDir(w, 'enospc');
    if (!mountTmpfs(full, 'size=24k')) return t.skip('cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)');
    let out = w.out(full);
    let r = await run(w.args(w.source(), out));
    assert.equal(r.code, 1, `${w.name} ENOSPC: ${r.stderr}`);
    assert.match(oneMessage(r.stderr, `${w.name} ENOSPC`), /no space left on the device; free space or choose another output path/);
    await nothingDone(full, out, `${w.name} ENOSPC`);
    const ro = await caseDir(w, 'erofs');
    assert.ok(mountTmpfs(ro, 'ro,size=1m'));
    out = w.out(ro);
    r = await run(w.args(w.source(), out));
    assert.notEqual(r.code, 0, `${w.name} EROFS`);
    assert.match(oneMessage(r.stderr, `${w.name} EROFS`), new RegExp(`${ro.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}.*read-only`));
    assert.deepEqual(await readdir(ro), []);
    // An unprivileged user writing into a directory it does not own.
    const denied = await caseDir(w, 'eacces');
    await chmod(denied, 0o755);
    if (spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'true']).status !== 0) return t.skip('setpriv cannot switch to an unprivileged user here');
    out = w.out(denied);
    r = await run(w.args(w.source(), out), {}, 65534);
    assert.notEqual(r.code, 0, `${w.name} EACCES`);
    assert.match(oneMessage(r.stderr, `${w.name} EACCES`), /permission denied/i);
    assert.deepEqual(await readdir(denied), []);
  });

  test(`faults: ${w.name} — two concurrent runs give one output; a source rewritten mid-run commits nothing`, async () => {
    const want = await ref(w);
    const dir = await caseDir(w, 'concurrent');
    const out = w.out(dir);
    const [a, b] = await Promise.all([run(w.args(w.source(), out)), run(w.args(w.source(), out))]);
    assert.ok(a.code === 0 || b.code === 0, `${w.name}: neither concurrent run finished:\n${a.stderr}\n${b.stderr}`);
    for (const x of [a, b]) if (x.code !== 0) assert.match(oneMessage(x.stderr, `${w.name} concurrent`), /lock|in use|exists|another/i);
    assert.deepEqual(await digest(out), want, `${w.name}: concurrent output`);
    // The source changes (same size, in place) while the run holds its lock.
    const src = join(await caseDir(w, 'source'), 'src');
    await cp(w.source(), src, { recursive: true });
    const out2 = join(dirname(src), 'changed-out' + (w.out('x').endsWith('.safetensors') ? '.safetensors' : w.out('x').endsWith('.pt') ? '.pt' : ''));
    const running = run(w.args(src, out2), { SHARDSHIFT_TEST_PAUSE_BEFORE_COMMIT_MS: '2500' });
    for (let i = 0; i < 200 && !existsSync(`${out2}.lock`); i++) await new Promise((r) => setTimeout(r, 25));
    const f = w.sourceFile(src);
    const bytes = await readFile(f);
    bytes[bytes.length - 1] = bytes.at(-1)! ^ 1;
    await writeFile(f, bytes);
    const r = await running;
    assert.equal(r.code, 1, `${w.name} changed source: ${r.stderr}`);
    // Caught by the stamps before the commit, or earlier by a read of the changed bytes that fails
    // (a member's checksum or directory): either way one message naming the file, nothing committed.
    assert.match(oneMessage(r.stderr, `${w.name} changed source`), new RegExp(`changed while it was being converted|${f.split('/').at(-1)!.replace('.', '\\.')}`));
    assert.ok(!existsSync(out2) && !existsSync(`${out2}.lock`));
  });
}
