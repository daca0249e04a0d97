/**
 * Fault matrix (issue 16, "make it last"): every writer — single-file and directory outputs of
 * every format, the LoRA merges and exports, NeMo RL's dcp-to-hf and a named step, each through
 * the real CLI — under SIGKILL at seeded random moments and at the executor's kill points, a full disk
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
import { basename, join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { outputDigest as digest } from '../helpers/tree.js';
import { writeF32Safetensors, type SyntheticTensor } from '../helpers/synthetic.js';
import { cli } from '../helpers/cli.js';

const example = join(repoRoot, 'examples', 'tiny-llama');
let tmp: string;
/** Sources built once, each a directory a case can copy whole (the mid-run change rewrites a copy). */
let meg: string;
let peftPair: string;
let mbPair: string;
let nemoRl: string;
let stepConfig: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-faults-'));
  await chmod(tmp, 0o755);
  meg = join(tmp, 'source.meg');
  assert.equal((await run(['convert', '--to', 'megatron', '-q', example, meg])).code, 0);
  peftPair = await makePeftPair(join(tmp, 'source.peft'));
  mbPair = await makeMbPair(join(tmp, 'source.mb'));
  nemoRl = await makeNemoRl(join(tmp, 'source.nemorl'));
  // `steps run -c <file>`: the step's settings from YAML, the paths as key=value overrides.
  stepConfig = join(tmp, 'megatron_to_hf.yaml');
  await writeFile(stepConfig, 'dtype: bfloat16\nmax_memory: 64MiB\n');
});
after(async () => {
  for (const m of mounts) spawnSync('umount', [m]);
  await rm(tmp, { recursive: true, force: true });
});

// The tiny Llama's shapes (examples/tiny-llama/config.json). Rank 16 makes every LoRA output,
// the adapter-only export too, larger than the ENOSPC case's 24 KiB tmpfs.
const LAYERS = 2;
const HIDDEN = 32;
const FFN = 64;
const Q = 32;
const KV = 16;
const RANK = 16;

/** `base/` (the tiny Llama) and `adapter/` (a PEFT LoRA on its q/v projections, recording base "base"). */
async function makePeftPair(dir: string): Promise<string> {
  await cp(example, join(dir, 'base'), { recursive: true });
  await mkdir(join(dir, 'adapter'));
  const t: SyntheticTensor[] = [];
  for (let l = 0; l < LAYERS; l++) {
    for (const [m, rows] of [['q_proj', Q], ['v_proj', KV]] as const) {
      t.push({ name: `base_model.model.model.layers.${l}.self_attn.${m}.lora_A.weight`, shape: [RANK, HIDDEN] });
      t.push({ name: `base_model.model.model.layers.${l}.self_attn.${m}.lora_B.weight`, shape: [rows, RANK] });
    }
  }
  await writeF32Safetensors(join(dir, 'adapter', 'adapter_model.safetensors'), t, 16);
  await writeFile(join(dir, 'adapter', 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: RANK, lora_alpha: 32, target_modules: ['q_proj', 'v_proj'], base_model_name_or_path: 'base' }));
  return dir;
}

/**
 * `base/` (the tiny Llama's Megatron checkpoint) and `lora/iter_0000100/`, a Megatron-Bridge LoRA
 * on all four linears: its adapter tensors stacked over layers as torch_dist saves them, with
 * metadata.json and the run_config.yaml `peft:` section that give it its dim and alpha.
 */
async function makeMbPair(dir: string): Promise<string> {
  await cp(meg, join(dir, 'base'), { recursive: true });
  const flat = join(tmp, 'mb-adapter.safetensors');
  const t: SyntheticTensor[] = [];
  for (const [m, cols, rows] of [['self_attention.linear_qkv', HIDDEN, Q + 2 * KV], ['self_attention.linear_proj', Q, HIDDEN], ['mlp.linear_fc1', HIDDEN, 2 * FFN], ['mlp.linear_fc2', FFN, HIDDEN]] as const) {
    t.push({ name: `decoder.layers.${m}.adapter.linear_in.weight`, shape: [LAYERS, RANK, cols] });
    t.push({ name: `decoder.layers.${m}.adapter.linear_out.weight`, shape: [LAYERS, rows, RANK] });
  }
  await writeF32Safetensors(flat, t, 17);
  const it = join(dir, 'lora', 'iter_0000100');
  assert.equal((await run(['convert', '--to', 'dcp', '-q', flat, it])).code, 0);
  await rm(join(it, 'shardshift-manifest.json'));
  await writeFile(join(it, 'metadata.json'), JSON.stringify({ sharded_backend: 'torch_dist', sharded_backend_version: 1, common_backend: 'torch', common_backend_version: 1 }));
  await writeFile(join(it, 'run_config.yaml'), `peft:\n  _target_: megatron.bridge.peft.lora.LoRA\n  dim: ${RANK}\n  alpha: 32\n  dropout: 0.0\n  target_modules: [linear_qkv, linear_proj, linear_fc1, linear_fc2]\n`);
  return dir;
}

/** A NeMo RL step directory: `step_1/config.yaml` naming the model, DTensor v2 weights in two .distcp files. */
async function makeNemoRl(dir: string): Promise<string> {
  const weights = join(dir, 'step_1', 'policy', 'weights', 'model');
  assert.equal((await run(['convert', '--to', 'dcp', '-q', '--dcp-files', '2', example, weights])).code, 0);
  // NeMo RL's weights directory holds the checkpoint only; config.json comes from the model named.
  for (const f of ['shardshift-manifest.json', 'config.json', 'generation_config.json']) await rm(join(weights, f));
  await writeFile(join(dir, 'step_1', 'config.yaml'), `policy:\n  model_name: ${example}\n`);
  return dir;
}

interface Writer {
  readonly name: string;
  /** A single file renamed into place, or a directory written file by file into `<out>.partial` (resumable). */
  readonly kind: 'file' | 'dir';
  /** Output path under `dir`, and the arguments that write it from `src`. */
  readonly out: (dir: string) => string;
  readonly args: (src: string, out: string) => string[];
  /** The source files the mid-run change rewrites, one per run: every input a writer reads (base and adapter). */
  readonly sourceFiles: (src: string) => string[];
  readonly source: () => string;
}

const hf = (): string => example;
const st = (s: string): string[] => [join(s, 'model.safetensors')];
const mbAdapter = (s: string): string => join(s, 'lora', 'iter_0000100');
const WRITERS: Writer[] = [
  { name: 'safetensors file', kind: 'file', out: (d) => join(d, 'm.safetensors'), args: (s, o) => ['convert', '--to', 'safetensors', '-q', join(s, 'model.safetensors'), o], sourceFiles: st, source: hf },
  { name: 'safetensors shards', kind: 'dir', out: (d) => join(d, 'shards'), args: (s, o) => ['convert', '--to', 'safetensors', '-q', '--shard-size', '16KB', s, o], sourceFiles: st, source: hf },
  { name: 'torch file', kind: 'file', out: (d) => join(d, 'm.pt'), args: (s, o) => ['convert', '--to', 'torch', '-q', join(s, 'model.safetensors'), o], sourceFiles: st, source: hf },
  { name: 'dcp', kind: 'dir', out: (d) => join(d, 'dcp'), args: (s, o) => ['convert', '--to', 'dcp', '-q', '--dcp-files', '2', s, o], sourceFiles: st, source: hf },
  { name: 'megatron torch_dist', kind: 'dir', out: (d) => join(d, 'meg'), args: (s, o) => ['convert', '--to', 'megatron', '-q', s, o], sourceFiles: st, source: hf },
  { name: 'megatron legacy', kind: 'dir', out: (d) => join(d, 'legacy'), args: (s, o) => ['convert', '--to', 'megatron', '-q', '--ckpt-format', 'torch', '--tp', '2', s, o], sourceFiles: st, source: hf },
  { name: 'megatron fsdp_dtensor', kind: 'dir', out: (d) => join(d, 'fsdp'), args: (s, o) => ['convert', '--to', 'megatron', '-q', '--ckpt-format', 'fsdp_dtensor', s, o], sourceFiles: st, source: hf },
  { name: 'nxd', kind: 'dir', out: (d) => join(d, 'nxd'), args: (s, o) => ['convert', '--to', 'nxd', '-q', '--tp', '2', '--hw-backend', 'trn1', s, o], sourceFiles: st, source: hf },
  { name: 'hf export', kind: 'dir', out: (d) => join(d, 'hf'), args: (s, o) => ['convert', '--to', 'hf', '-q', s, o], sourceFiles: (s) => [join(s, 'iter_0000000', '__0_0.distcp')], source: () => meg },
  // The LoRA writers read two inputs, the base and the adapter: a rewrite of either must be caught.
  {
    name: 'merge-lora peft',
    kind: 'dir',
    out: (d) => join(d, 'merged'),
    args: (s, o) => ['merge-lora', '-q', '--shard-size', '16KB', '--adapter', join(s, 'adapter'), '--base', join(s, 'base'), o],
    sourceFiles: (s) => [join(s, 'base', 'model.safetensors'), join(s, 'adapter', 'adapter_model.safetensors')],
    source: () => peftPair,
  },
  {
    name: 'merge-lora megatron-bridge',
    kind: 'dir',
    out: (d) => join(d, 'merged-meg'),
    args: (s, o) => ['merge-lora', '-q', '--backend', 'megatron-bridge', '--adapter', mbAdapter(s), '--base', join(s, 'base'), '--hf-model', example, o],
    sourceFiles: (s) => [join(s, 'base', 'iter_0000000', '__0_0.distcp'), join(mbAdapter(s), '__0_0.distcp')],
    source: () => mbPair,
  },
  {
    name: 'lora-to-hf merged',
    kind: 'dir',
    out: (d) => join(d, 'merged-hf'),
    args: (s, o) => ['lora-to-hf', '-q', '--shard-size', '16KB', '--base-ckpt', join(s, 'base'), '--adapter-ckpt', mbAdapter(s), '--hf-model-name', example, '--hf-ckpt-path', o],
    sourceFiles: (s) => [join(s, 'base', 'iter_0000000', '__0_0.distcp'), join(mbAdapter(s), '__0_0.distcp')],
    source: () => mbPair,
  },
  // What `lora-to-hf --adapter-only` runs too.
  { name: 'export-adapter', kind: 'dir', out: (d) => join(d, 'peft'), args: (s, o) => ['export-adapter', '-q', '--adapter', mbAdapter(s), '--hf-model', example, o], sourceFiles: (s) => [join(mbAdapter(s), '__0_0.distcp')], source: () => mbPair },
  {
    name: 'dcp-to-hf',
    kind: 'dir',
    out: (d) => join(d, 'hf'),
    args: (s, o) => ['dcp-to-hf', '-q', '--dcp-ckpt-path', join(s, 'step_1', 'policy', 'weights'), '--hf-ckpt-path', o],
    sourceFiles: (s) => [join(s, 'step_1', 'policy', 'weights', 'model', '__0_1.distcp')],
    source: () => nemoRl,
  },
  {
    name: 'steps run convert/megatron_to_hf',
    kind: 'dir',
    out: (d) => join(d, 'hf'),
    args: (s, o) => ['steps', 'run', 'convert/megatron_to_hf', '-q', '-c', stepConfig, `megatron_path=${s}`, `hf_model_id=${example}`, `hf_path=${o}`],
    sourceFiles: (s) => [join(s, 'iter_0000000', '__0_0.distcp')],
    source: () => meg,
  },
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

/** For a message that names a path. */
const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * The executor's own kill points (src/plan/output.ts `killPoint`) short of the commit. They are
 * steps of a directory output only; the kill before the commit, which every output has, is its own case.
 */
const KILL_POINTS: ReadonlyArray<{ label: string; env: Record<string, string> }> = [
  // The window a CI run hit at random: the directory made, the plan not yet recorded in it.
  { label: 'after creating the partial directory', env: { SHARDSHIFT_TEST_KILL_AFTER_MKDIR: '1' } },
  { label: 'after the first file', env: { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' } },
  { label: 'in the middle of the first file', env: { SHARDSHIFT_TEST_KILL_MID_FILE: '0' } },
];
// A single-file output has none of these points: no partial directory, no progress record, no
// finished file to resume after (it is written whole to <out>.partial and renamed; the random kills
// and the kill before the rename cover it). Its run with the point set must simply complete.

/** Spawns a run and SIGKILLs it `delay` ms later (or lets an env kill point do it). */
function runKilled(args: string[], env: Record<string, string>, delay?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const child = spawn(process.execPath, [cli, ...args], { stdio: 'ignore', env: { ...process.env, ...env } });
  const timer = delay === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), delay);
  return new Promise((res) =>
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      res({ code, signal });
    }),
  );
}

/** After a kill, the re-run of the same command gives the uninterrupted run's bytes. */
async function rerunGives(w: Writer, out: string, want: Record<string, string>, label: string): Promise<void> {
  const again = await run(w.args(w.source(), out));
  assert.equal(again.code, 0, `${w.name} after a kill ${label}: ${again.stderr}`);
  assert.deepEqual(await digest(out), want, `${w.name}: resumed after a kill ${label}`);
}

/** Two runs into the same output at once: one finishes, the other is refused by the lock (or finds it done). */
async function concurrentRuns(w: Writer, want: Record<string, string>): Promise<void> {
  const out = w.out(await caseDir(w, 'concurrent'));
  const [a, b] = await Promise.all([run(w.args(w.source(), out)), run(w.args(w.source(), out))]);
  assert.ok(a.code === 0 || b.code === 0, `${w.name}: neither concurrent run finished:\n${a.stderr}\n${b.stderr}`);
  for (const x of [a, b]) if (x.code !== 0) assert.match(oneMessage(x.stderr, `${w.name} concurrent`), /lock|in use|exists|another/i);
  assert.deepEqual(await digest(out), want, `${w.name}: concurrent output`);
}

/**
 * Rewrites the `i`-th source file of a copy of the source (same size, in place) while a run holds
 * its lock. A directory output is changed once its manifest is written, every read done: only the
 * stamps taken before the run can catch it. A single file is changed once the lock is taken.
 */
async function changedMidRun(w: Writer, i: number): Promise<void> {
  const dir = await caseDir(w, `source${i}`);
  const src = join(dir, 'src');
  await cp(w.source(), src, { recursive: true });
  const out = w.out(dir);
  const running = run(w.args(src, out), { SHARDSHIFT_TEST_PAUSE_BEFORE_COMMIT_MS: '1200' });
  const mark = w.kind === 'dir' ? join(`${out}.partial`, 'shardshift-manifest.json') : `${out}.lock`;
  for (let k = 0; k < 400 && !existsSync(mark); k++) await sleep(25);
  const f = w.sourceFiles(src)[i]!;
  const bytes = await readFile(f);
  bytes[bytes.length - 1] = bytes.at(-1)! ^ 1;
  await writeFile(f, bytes);
  const r = await running;
  const label = `${w.name} changed ${basename(f)}`;
  assert.equal(r.code, 1, `${label}: ${r.stderr}`);
  // A single file may instead be caught earlier, by a read of the changed bytes that fails (a
  // member's checksum or directory): either way one message naming the file, nothing committed.
  const msg = oneMessage(r.stderr, label);
  if (w.kind === 'dir') assert.match(msg, new RegExp(`${escape(basename(f))} changed while it was being converted`), label);
  else assert.match(msg, new RegExp(`changed while it was being converted|${escape(basename(f))}`), label);
  assert.ok(!existsSync(out) && !existsSync(`${out}.lock`), `${label}: committed or left its lock`);
}

for (const w of WRITERS) {
  // Two kills at a time, each into its own directory: the runs are mostly node's start-up.
  test(`faults: ${w.name} — SIGKILL at random moments, at the executor's kill points and before the commit, then a re-run resumes to the same bytes`, { concurrency: 2 }, async (t) => {
    const want = await ref(w);
    const cases: Array<Promise<void>> = [];
    // Seeded moments after spawn: node's start-up, planning, writing.
    for (const delay of Array.from({ length: 4 }, () => 40 + Math.floor(rnd() * 260))) {
      cases.push(t.test(`killed at ${delay} ms`, async () => {
        const out = w.out(await caseDir(w, `kill-${delay}ms`));
        const x = await runKilled(w.args(w.source(), out), {}, delay);
        // Finished before the kill (a tiny model converts in a few hundred ms), or killed after the
        // rename while exiting: the output is whole, as the rename is atomic.
        if (existsSync(out)) assert.deepEqual(await digest(out), want, `${w.name}: ${x.code === 0 ? 'finished before' : 'committed before'} the kill at ${delay} ms`);
        else await rerunGives(w, out, want, `at ${delay} ms`);
      }));
    }
    for (const p of KILL_POINTS) {
      if (w.kind === 'file') {
        cases.push(t.test(`no kill point ${p.label} in a single-file output: the run completes with the same bytes`, async () => {
          const out = w.out(await caseDir(w, 'kill-point'));
          const x = await runKilled(w.args(w.source(), out), p.env);
          assert.equal(x.code, 0, `${w.name}: with the kill point ${p.label} set, exit ${x.code} (${x.signal})`);
          assert.deepEqual(await digest(out), want, `${w.name}: ${p.label}`);
        }));
        continue;
      }
      cases.push(t.test(`killed ${p.label}`, async () => {
        const out = w.out(await caseDir(w, 'kill-point'));
        const x = await runKilled(w.args(w.source(), out), p.env);
        // Reached, so the writer goes through writeOutput's executor (one that did not would finish here).
        assert.equal(x.signal, 'SIGKILL', `${w.name}: never reached the kill point ${p.label} (exit ${x.code})`);
        assert.ok(!existsSync(out), `${w.name}: killed ${p.label}, yet ${out} exists`);
        await rerunGives(w, out, want, p.label);
      }));
    }
    // The last state transition: everything written and fsynced, killed before the rename.
    cases.push(t.test('killed before the commit', async () => {
      const out = w.out(await caseDir(w, 'kill-commit'));
      const r = await run(w.args(w.source(), out), { SHARDSHIFT_TEST_KILL_BEFORE_COMMIT: '1' });
      assert.equal(r.signal, 'SIGKILL', `${w.name}: never reached the kill before the commit (exit ${r.code}): ${r.stderr}`);
      assert.ok(!existsSync(out), `${w.name}: killed before the commit, yet ${out} exists`);
      await rerunGives(w, out, want, 'before the rename');
    }));
    await Promise.all(cases);
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
    assert.match(oneMessage(r.stderr, `${w.name} EROFS`), new RegExp(`${escape(ro)}.*read-only`));
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
    // Side by side: the source cases spend most of their time waiting in the pause before the commit.
    await Promise.all([concurrentRuns(w, want), ...w.sourceFiles(w.source()).map((_, i) => changedMidRun(w, i))]);
  });
}

// Two outputs, each committed on its own: `merge-lora --backend megatron-bridge --export-hf` (and
// the convert/merge_lora step with export_hf=true) commit the Megatron merge, then the HF one. A
// kill between the two commits must not strand the pair: the re-run of the same command keeps
// the finished Megatron output — only after verifying its manifest, its source and every file's
// SHA-256 — and writes the HF one. A finished output that no longer verifies is refused.
const pairArgs = (dir: string): string[] => ['merge-lora', '-q', '--backend', 'megatron-bridge', '--adapter', mbAdapter(mbPair), '--base', join(mbPair, 'base'), '--hf-model', example, join(dir, 'meg'), '--export-hf', join(dir, 'hf')];
const stepPairArgs = (dir: string): string[] => ['steps', 'run', 'convert/merge_lora', '-q', 'backend=megatron_bridge', `lora_checkpoint=${mbAdapter(mbPair)}`, `base_megatron_path=${join(mbPair, 'base')}`, `hf_model_id=${example}`, `output_megatron_path=${join(dir, 'meg')}`, 'export_hf=true', `output_hf_path=${join(dir, 'hf')}`];
async function pairDigest(dir: string): Promise<Record<string, Record<string, string>>> {
  return { meg: await digest(join(dir, 'meg')), hf: await digest(join(dir, 'hf')) };
}

for (const [label, args] of [['merge-lora megatron-bridge --export-hf', pairArgs], ['steps run convert/merge_lora export_hf=true', stepPairArgs]] as const) {
  test(`faults: ${label} — killed between its two commits, the re-run keeps the first (verified) and writes the second`, async () => {
    const refDir = join(tmp, `ref-pair-${label.replace(/\W+/g, '-')}`);
    await mkdir(refDir);
    const r0 = await run(args(refDir));
    assert.equal(r0.code, 0, r0.stderr);
    const want = await pairDigest(refDir);

    // Killed right after the first commit: the Megatron merge is done, the HF export not begun.
    const dir = join(tmp, `pair-${label.replace(/\W+/g, '-')}`);
    await mkdir(dir);
    const k1 = await runKilled(args(dir), { SHARDSHIFT_TEST_KILL_AFTER_COMMIT: '1' });
    assert.equal(k1.signal, 'SIGKILL');
    assert.deepEqual(await digest(join(dir, 'meg')), want.meg);
    assert.ok(!existsSync(join(dir, 'hf')));
    // Killed again, now inside the second output (after its first file): the first is reused, not rewritten.
    const k2 = await runKilled(args(dir), { SHARDSHIFT_TEST_KILL_AFTER_FILES: '1' });
    assert.equal(k2.signal, 'SIGKILL', 'the second run reached the HF export (the Megatron output was kept)');
    assert.ok(!existsSync(join(dir, 'hf')) && existsSync(join(dir, 'hf.partial')));
    const again = await run(args(dir));
    assert.equal(again.code, 0, again.stderr);
    assert.deepEqual(await pairDigest(dir), want);
    // Both finished: a re-run is refused by the second output, as any finished output is.
    const done = await run(args(dir));
    assert.notEqual(done.code, 0);
    assert.match(oneMessage(done.stderr, `${label} re-run`), /already exists/);
  });
}

test('faults: merge-lora megatron-bridge --export-hf — a finished first output that no longer verifies is refused, not reused', async () => {
  for (const tamper of ['file', 'source'] as const) {
    const dir = join(tmp, `pair-tampered-${tamper}`);
    await mkdir(dir);
    let args = pairArgs(dir);
    if (tamper === 'source') {
      // A copy of the inputs, so the shared source stays as it is.
      const src = join(dir, 'src');
      await cp(mbPair, src, { recursive: true });
      args = args.map((a) => (a.startsWith(mbPair) ? src + a.slice(mbPair.length) : a));
    }
    assert.equal((await runKilled(args, { SHARDSHIFT_TEST_KILL_AFTER_COMMIT: '1' })).signal, 'SIGKILL');
    if (tamper === 'file') {
      // One byte of a tensor file flipped, size unchanged.
      const rel = Object.keys(await digest(join(dir, 'meg'))).find((f) => f.endsWith('.distcp'))!;
      const p = join(dir, 'meg', rel);
      const b = await readFile(p);
      b[b.length >> 1] = b[b.length >> 1]! ^ 1;
      await writeFile(p, b);
    } else {
      const p = join(dir, 'src', 'lora', 'iter_0000100', '__0_0.distcp');
      const b = await readFile(p);
      b[b.length >> 1] = b[b.length >> 1]! ^ 1;
      await writeFile(p, b);
    }
    const r = await run(args);
    assert.notEqual(r.code, 0, `${tamper}: ${r.stderr}`);
    assert.match(oneMessage(r.stderr, `tampered ${tamper}`), tamper === 'file' ? /already exists and is not this run's finished output \(iter_0000000\/__0_0\.distcp in it no longer matches its recorded SHA-256\); remove it or pass --overwrite/ : /already exists and is not this run's finished output \(.*__0_0\.distcp changed since it was made\)/);
    assert.ok(!existsSync(join(dir, 'hf')) && !existsSync(join(dir, 'hf.partial')), `${tamper}: nothing of the second output was written`);
  }
});
