/**
 * Bad input through the real CLI: each case gives one readable message naming the file (and the
 * tensor or global where known), a non-zero exit, and no output left behind.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdtemp, readdir, readFile, rm, writeFile, truncate, mkdir } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { zipParts } from '../../src/formats/zip-write.js';
import { pickle } from '../../src/pickle/index.js';
import { PyDict, StorageRef, TensorRef } from '../../src/pickle/values.js';
import { encodeHeader } from '../../src/formats/safetensors.js';
import { cli } from '../helpers/cli.js';

const golden = join(repoRoot, 'test', 'fixtures', 'golden');
let tmp: string;

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-bad-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function run(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) => {
    execFile(process.execPath, [cli, ...args], (err, stdout, stderr) => {
      res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
  });
}

/** Converts `src` and checks the failure: exit code, one message line matching `re`, no output. */
async function expectFailure(src: string, re: RegExp, code = 1, to = 'safetensors'): Promise<string> {
  const out = join(tmp, `out-${Math.random().toString(36).slice(2)}`);
  const r = await run(['convert', '--to', to, src, out]);
  assert.equal(r.code, code, `exit code (stderr: ${r.stderr})`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one message line, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^shardshift: error: /);
  assert.match(lines[0]!, re);
  assert.ok(!/\n\s+at /.test(r.stderr), 'no stack trace');
  assert.ok(!existsSync(out), 'no output left behind');
  assert.deepEqual((await readdir(tmp)).filter((n) => n.includes('.partial')), [], 'no partial output left behind');
  return lines[0]!;
}

function torchZip(name: string, pkl: Uint8Array, storages: Array<[string, Uint8Array]> = []): Buffer {
  const records = [{ name: `${name}/data.pkl`, data: pkl }, ...storages.map(([k, d]) => ({ name: `${name}/data/${k}`, data: d })), { name: `${name}/version`, data: Buffer.from('3\n') }];
  const { parts } = zipParts(records);
  return Buffer.concat(parts.map((p) => (p instanceof Uint8Array ? p : typeof p === 'function' ? p() : Buffer.alloc(0))));
}

test('truncated safetensors file', async () => {
  const f = join(tmp, 'trunc.safetensors');
  await cp(join(golden, 'all_dtypes.safetensors'), f);
  const buf = await readFile(f);
  await truncate(f, buf.length - 10);
  const msg = await expectFailure(f, /trunc\.safetensors/, 1, 'torch');
  assert.match(msg, /truncated|past|only/);
});

test('truncated zip', async () => {
  const f = join(tmp, 'trunc.pt');
  const buf = await readFile(join(golden, 'module_state.pt'));
  await writeFile(f, buf.subarray(0, Math.floor(buf.length / 2)));
  await expectFailure(f, /trunc\.pt.*(end-of-central-directory|truncated)/);
});

test('corrupt zip central directory', async () => {
  const f = join(tmp, 'corrupt-cd.pt');
  const buf = Buffer.from(await readFile(join(golden, 'module_state.pt')));
  const at = buf.indexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]));
  buf.writeUInt32LE(0xdeadbeef, buf.indexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]), at + 4));
  await writeFile(f, buf);
  await expectFailure(f, /corrupt-cd\.pt.*corrupt zip central directory/);
});

test('pickle calling os.system through __reduce__', async () => {
  const f = join(tmp, 'evil.pt');
  // cos\nsystem\n(S'echo pwned'\ntR.  — what a malicious __reduce__ pickles to.
  await writeFile(f, torchZip('evil', Buffer.from("\x80\x02cos\nsystem\nq\x00X\n\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03.", 'latin1')));
  await expectFailure(f, /evil\.pt.*os\.system/);
});

test('pickle naming a look-alike global', async () => {
  const f = join(tmp, 'lookalike.pt');
  await writeFile(f, torchZip('lookalike', Buffer.from('\x80\x02ctorch._utils\nevil\nq\x00)Rq\x01.', 'latin1')));
  await expectFailure(f, /lookalike\.pt.*torch\._utils\.evil/);
});

test('storage whose declared size disagrees with its zip entry', async () => {
  const f = join(tmp, 'badsize.pt');
  const st = new StorageRef('0', 'F32', 'cpu', 10, false);
  const d = new PyDict();
  d.set('w', new TensorRef(st, 0, [2], [1], 'F32'));
  await writeFile(f, torchZip('badsize', pickle(d), [['0', new Uint8Array(8)]]));
  await expectFailure(f, /badsize\.pt.*storage data\/0 declares 10 elements of F32 \(40 bytes\) but its zip record holds 8 bytes/);
});

test('DCP .metadata pointing past the end of a .distcp', async () => {
  const d = join(tmp, 'dcp-trunc');
  await cp(join(golden, 'dcp_single'), d, { recursive: true });
  const f = join(d, '__0_0.distcp');
  await truncate(f, (await readFile(f)).length - 100);
  await expectFailure(d, /__0_0\.distcp.*\.metadata places [\w.]+ at bytes \d+\.\.\d+ but the file has \d+ bytes/);
});

async function safetensorsWith(name: string, entries: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>, dataLen: number): Promise<string> {
  const json = Buffer.from(JSON.stringify(entries));
  const pad = (8 - (json.length % 8)) % 8;
  const head = Buffer.alloc(8);
  head.writeBigUInt64LE(BigInt(json.length + pad));
  const f = join(tmp, name);
  await writeFile(f, Buffer.concat([head, json, Buffer.alloc(pad, 0x20), Buffer.alloc(dataLen)]));
  return f;
}

test('safetensors header with overlapping offsets', async () => {
  const f = await safetensorsWith('overlap.safetensors', {
    a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
    b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] },
  }, 12);
  await expectFailure(f, /overlap\.safetensors: tensor b .*overlaps/);
});

test('safetensors header with a misspelt __metadata__ key, or an entry without a shape: the message names what is missing, never "undefined"', async () => {
  const f = await safetensorsWith('misspelt.safetensors', {
    __metadatx__: { format: 'pt' } as unknown as { dtype: string; shape: number[]; data_offsets: [number, number] },
    a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
  }, 8);
  const m = await expectFailure(f, /misspelt\.safetensors: tensor "__metadatx__": header entry has no dtype \(a misspelt "__metadata__"\?\)/);
  assert.doesNotMatch(m, /undefined/);
  const g = await safetensorsWith('noshape.safetensors', { a: { dtype: 'F32', data_offsets: [0, 8] } as unknown as { dtype: string; shape: number[]; data_offsets: [number, number] } }, 8);
  assert.doesNotMatch(await expectFailure(g, /noshape\.safetensors: tensor a: shape missing is not a list of non-negative integers/), /undefined/);
});

test('a named pipe where a checkpoint file should be is refused by name at once, never opened blocking (a hang)', async () => {
  const { execFileSync } = await import('node:child_process');
  const { mkdir, copyFile } = await import('node:fs/promises');
  const d = join(tmp, 'fifo-model');
  await mkdir(d);
  await copyFile(join(repoRoot, 'examples', 'tiny-llama', 'config.json'), join(d, 'config.json'));
  execFileSync('mkfifo', [join(d, 'model.safetensors')]);
  await expectFailure(d, /fifo-model\/model\.safetensors is a named pipe, not a checkpoint file/);
  // A config.json read whole (readFile would have blocked on it).
  const c = join(tmp, 'fifo-config');
  await mkdir(c);
  await copyFile(join(repoRoot, 'examples', 'tiny-llama', 'model.safetensors'), join(c, 'model.safetensors'));
  execFileSync('mkfifo', [join(c, 'config.json')]);
  await expectFailure(c, /fifo-config\/config\.json is a named pipe, not a checkpoint file/, 1, 'megatron');
  execFileSync('mkfifo', [join(tmp, 'lone.safetensors')]);
  await expectFailure(join(tmp, 'lone.safetensors'), /lone\.safetensors is a named pipe, not a checkpoint$/);
});

test('safetensors header with a hole', async () => {
  const f = await safetensorsWith('hole.safetensors', {
    a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] },
    b: { dtype: 'F32', shape: [2], data_offsets: [12, 20] },
  }, 20);
  await expectFailure(f, /hole\.safetensors: tensor b starts at data byte 12, leaving a hole/);
});

test('output path inside the source', async () => {
  const d = join(tmp, 'src-dir');
  await cp(join(golden, 'sharded'), d, { recursive: true });
  const r = await run(['convert', '--to', 'torch', d, join(d, 'out')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^shardshift: error: output .*out is inside the source/);
  assert.ok(!existsSync(join(d, 'out')));
  assert.deepEqual((await readdir(d)).sort(), (await readdir(join(golden, 'sharded'))).sort(), 'source untouched');
});

test('output that already exists is refused without --overwrite', async () => {
  const out = join(tmp, 'exists');
  await mkdir(out);
  const r = await run(['convert', '--to', 'torch', join(golden, 'all_dtypes.safetensors'), out]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /already exists; remove it or pass --overwrite/);
});

test('the header encoder agrees with the reader on a clean file', () => {
  const h = encodeHeader([{ name: 'a', dtype: 'F32', shape: [2], byteLength: 8 }]);
  assert.equal(h.length % 8, 0);
});

test('legacy pre-1.6 torch file is refused by name', async () => {
  const f = join(tmp, 'old.bin');
  // A legacy file starts with the protocol-2 pickle of torch's magic number (LONG1, 10 bytes).
  await writeFile(f, Buffer.concat([Buffer.from([0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e]), Buffer.alloc(64)]));
  await expectFailure(f, /old\.bin: legacy \(pre-1\.6\) torch\.save pickle-stream format is not supported/);
});

test('a legacy Megatron rank file whose pickle root is not a dict: one message naming the file (it was "rank0.get is not a function")', async () => {
  const ckpt = join(tmp, 'legacy-list');
  await mkdir(join(ckpt, 'iter_0000001', 'mp_rank_00'), { recursive: true });
  await writeFile(join(ckpt, 'latest_checkpointed_iteration.txt'), '1');
  await writeFile(join(ckpt, 'iter_0000001', 'mp_rank_00', 'model_optim_rng.pt'), torchZip('archive', pickle([1, 2, 3])));
  await expectFailure(ckpt, /mp_rank_00\/model_optim_rng\.pt: holds \[1, 2, 3\], not the dict a Megatron rank file holds/, 1, 'hf');
});

test('a stride-0 view claiming 4 TiB of a 4-byte storage is refused by name (issue 16, defect 4); a small expanded view is materialised', async () => {
  const f = join(tmp, 'expanded.pt');
  const st = new StorageRef('0', 'F32', 'cpu', 1, false);
  const d = new PyDict();
  d.set('w', new TensorRef(st, 0, [1 << 20, 1 << 20], [0, 0], 'F32'));
  await writeFile(f, torchZip('expanded', pickle(d), [['0', new Uint8Array(4)]]));
  await expectFailure(f, /expanded\.pt: tensor w \(shape \[1048576, 1048576\], strides \[0, 0\]\) reads its 4-byte storage 0 as 4398046511104 bytes \(an expanded or self-overlapping view\); such views are materialised only up to 1073741824 bytes/);
  const g = join(tmp, 'bias.pt');
  const e = new PyDict();
  const st3 = new StorageRef('0', 'F32', 'cpu', 3, false);
  e.set('b', new TensorRef(st3, 0, [4, 3], [0, 1], 'F32'));
  await writeFile(g, torchZip('bias', pickle(e), [['0', new Uint8Array(Float32Array.of(1, 2, 3).buffer)]]));
  const out = join(tmp, 'bias-out.safetensors');
  const r = await run(['convert', '--to', 'safetensors', g, out]);
  assert.equal(r.code, 0, r.stderr);
  const bytes = await readFile(out);
  const hl = Number(bytes.readBigUInt64LE(0));
  assert.deepEqual([...new Float32Array(bytes.buffer.slice(bytes.byteOffset + 8 + hl, bytes.byteOffset + 8 + hl + 48))], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]);
});
