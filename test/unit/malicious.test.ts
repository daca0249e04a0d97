/**
 * The malicious-pickle corpus (issue 16): test/fixtures/malicious.json, written by CPython
 * (test/oracle/malicious_corpus.py; test/interop/malicious.test.ts shows each live payload
 * running under CPython's own pickle.loads). Every payload, in every container shardshift
 * reads — a torch.save zip, a DCP `.metadata`, a legacy Megatron rank file, an NxD shard, a PEFT
 * adapter_model.bin — is refused with
 * one message naming its global (or the limit it hits), nothing is executed (no sentinel file
 * appears in the working directory), and it takes bounded time.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';
import { zipParts } from '../../src/formats/zip-write.js';
import { cli } from '../helpers/cli.js';

interface Payload {
  readonly name: string;
  readonly global: string;
  readonly live: boolean;
  readonly pickle: string;
}
const corpus = (JSON.parse(await readFile(join(repoRoot, 'test', 'fixtures', 'malicious.json'), 'utf8')) as { pickles: Payload[] }).pickles;
let tmp: string;
let cwd: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-malicious-'));
  cwd = join(tmp, 'cwd');
  await mkdir(cwd);
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function torchZip(pkl: Uint8Array): Buffer {
  const { parts } = zipParts([
    { name: 'archive/data.pkl', data: pkl },
    { name: 'archive/version', data: Buffer.from('3\n') },
  ]);
  return Buffer.concat(parts.map((p) => (p instanceof Uint8Array ? p : typeof p === 'function' ? p() : Buffer.alloc(0))));
}

function run(args: string[]): Promise<{ code: number; stderr: string; seconds: number }> {
  const t0 = Date.now();
  return new Promise((res) => execFile(process.execPath, [cli, ...args], { cwd, timeout: 30_000 }, (err, _o, stderr) => res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr, seconds: (Date.now() - t0) / 1000 })));
}

const CONTAINERS: Array<{ name: string; make: (dir: string, pkl: Uint8Array) => Promise<string>; to: string }> = [
  {
    name: 'torch.save zip',
    to: 'safetensors',
    make: async (dir, pkl) => {
      const f = join(dir, 'model.pt');
      await writeFile(f, torchZip(pkl));
      return f;
    },
  },
  {
    name: 'DCP .metadata',
    to: 'safetensors',
    make: async (dir, pkl) => {
      await writeFile(join(dir, '.metadata'), pkl);
      await writeFile(join(dir, '__0_0.distcp'), Buffer.alloc(0));
      return dir;
    },
  },
  {
    name: 'NxD shard',
    to: 'hf',
    make: async (dir, pkl) => {
      await mkdir(join(dir, 'model'), { recursive: true });
      await writeFile(join(dir, 'model', 'dp_rank_00_tp_rank_00_pp_rank_00.pt'), torchZip(pkl));
      return dir;
    },
  },
  {
    name: 'PEFT adapter',
    to: 'merge-lora',
    make: async (dir, pkl) => {
      await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'], base_model_name_or_path: 'tiny-llama' }));
      await writeFile(join(dir, 'adapter_model.bin'), torchZip(pkl));
      return dir;
    },
  },
  {
    name: 'legacy Megatron rank file',
    to: 'hf',
    make: async (dir, pkl) => {
      await mkdir(join(dir, 'iter_0000001', 'mp_rank_00'), { recursive: true });
      await writeFile(join(dir, 'latest_checkpointed_iteration.txt'), '1');
      await writeFile(join(dir, 'iter_0000001', 'mp_rank_00', 'model_optim_rng.pt'), torchZip(pkl));
      return dir;
    },
  },
];

for (const c of CONTAINERS) {
  test(`malicious corpus in a ${c.name}: ${corpus.length} payloads refused by name, nothing executed`, async () => {
    for (const p of corpus) {
      const dir = join(tmp, `${c.name.replace(/\W+/g, '-')}-${p.name}`);
      await mkdir(dir, { recursive: true });
      const src = await c.make(dir, Buffer.from(p.pickle, 'base64'));
      const out = join(tmp, `out-${p.name}-${c.name.replace(/\W+/g, '-')}`);
      const example = join(repoRoot, 'examples', 'tiny-llama');
      const r = await run(
        c.to === 'merge-lora'
          ? ['merge-lora', '--adapter', src, '--base', example, out]
          : ['convert', '--to', c.to, src, out, ...(c.name === 'NxD shard' ? ['--hf-model', example] : [])],
      );
      assert.notEqual(r.code, 0, `${p.name}: refused`);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, `${p.name}: one message line, got:\n${r.stderr}`);
      assert.match(lines[0]!, /^shardshift: error: /, p.name);
      assert.ok(!/internal error/.test(lines[0]!), `${p.name}: ${lines[0]}`);
      if (p.global) assert.ok(p.global.split('|').some((g) => lines[0]!.includes(g)), `${p.name}: the message names ${p.global}: ${lines[0]}`);
      assert.ok(r.seconds < 20, `${p.name}: bounded time`);
    }
    assert.deepEqual((await readdir(cwd)).filter((n) => n.startsWith('ss-pwned-')), [], 'no payload ran');
  });
}
