/**
 * The package as a user gets it (issue 21, packaging): `npm pack` of the tree (the build is the
 * one the test command made; `--ignore-scripts` so this test never rebuilds dist/ under the other
 * tests), installed into an empty project, then `npx shardshift --help`, an inspect and a convert
 * of the bundled example run from that project. Also what the tarball holds: LICENSE, CHANGELOG,
 * README, no tests, no install scripts, and every source map's sources inside the package; then
 * every example of docs/library.md, run as written from the consumer project.
 * Dependencies come from npm's cache when they are there (`--prefer-offline`).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { repoRoot } from '../helpers/oracle.js';

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-pack-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function sh(cmd: string, args: string[], cwd: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((res) =>
    execFile(cmd, args, { cwd, maxBuffer: 64 << 20, env: { ...process.env, npm_config_update_notifier: 'false', npm_config_fund: 'false', npm_config_audit: 'false' } }, (err, stdout, stderr) =>
      res({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    ),
  );
}

test('npm pack → install into an empty project → npx shardshift --help, inspect, convert', { timeout: 600_000 }, async () => {
  const pack = await sh('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', tmp], repoRoot);
  assert.equal(pack.code, 0, pack.stderr);
  const [info] = JSON.parse(pack.stdout) as Array<{ filename: string; files: Array<{ path: string }> }>;
  const files = new Set(info!.files.map((f) => f.path));
  for (const f of ['LICENSE', 'CHANGELOG.md', 'README.md', 'package.json', 'dist/src/cli/main.js', 'dist/src/index.d.ts', 'examples/tiny-llama/model.safetensors']) assert.ok(files.has(f), `the package holds ${f}`);
  assert.ok(![...files].some((f) => f.startsWith('test/') || f.startsWith('dist/test/')), 'no tests in the package');
  const pkg = JSON.parse(await readFile(join(repoRoot, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
  for (const s of ['preinstall', 'install', 'postinstall', 'prepare']) assert.equal(pkg.scripts[s], undefined, `no ${s} script runs in a consumer's install`);
  // Every source map points at sources the package holds.
  for (const f of [...files].filter((x) => x.endsWith('.js.map'))) {
    const map = JSON.parse(await readFile(join(repoRoot, f), 'utf8')) as { sources: string[] };
    for (const s of map.sources) assert.ok(files.has(join(dirname(f), s)), `${f}: source ${s} is in the package`);
  }

  const project = join(tmp, 'project');
  await mkdir(project);
  await writeFile(join(project, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true, type: 'module' }));
  const inst = await sh('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', join(tmp, info!.filename)], project);
  assert.equal(inst.code, 0, inst.stderr);
  assert.doesNotMatch(inst.stderr, /install script|prepare/i, 'no install scripts run');
  const help = await sh('npx', ['--no-install', 'shardshift', '--help'], project);
  assert.equal(help.code, 0, help.stderr);
  assert.match(help.stdout, /Usage: shardshift/);
  const example = join(project, 'node_modules', 'shardshift', 'examples', 'tiny-llama');
  const ins = await sh('npx', ['--no-install', 'shardshift', 'inspect', example], project);
  assert.equal(ins.code, 0, ins.stderr);
  assert.match(ins.stdout, /tensors:\s+21/);
  const out = join(project, 'tiny-llama-megatron');
  const conv = await sh('npx', ['--no-install', 'shardshift', 'convert', '-q', '--to', 'megatron', example, out], project);
  assert.equal(conv.code, 0, conv.stderr);
  assert.ok(existsSync(join(out, 'latest_checkpointed_iteration.txt')));
  // The library entry point, imported by the consumer.
  await writeFile(join(project, 'use.js'), "import { openCheckpoint } from 'shardshift';\nconst c = await openCheckpoint(process.argv[2]);\nconsole.log(c.tensors.size);\nawait c.close();\n");
  const lib = await sh(process.execPath, ['use.js', example], project);
  assert.equal(lib.code, 0, lib.stderr);
  assert.equal(lib.stdout.trim(), '21');
  assert.ok((await readdir(join(project, 'node_modules'))).includes('commander'));

  // Every example of docs/library.md, as written, from the consumer project.
  const doc = await readFile(join(repoRoot, 'docs', 'library.md'), 'utf8');
  const examples = [...doc.matchAll(/```js\n\/\/ example: (\S+)\n([\s\S]*?)```/g)].map((m) => ({ name: m[1]!, code: m[2]! }));
  assert.ok(examples.length >= 9, `docs/library.md has its examples (${examples.map((e) => e.name).join(', ')})`);
  for (const ex of examples) {
    await writeFile(join(project, `${ex.name}.mjs`), ex.code);
    const r = await sh(process.execPath, [`${ex.name}.mjs`], project);
    assert.equal(r.code, 0, `docs/library.md example ${ex.name}:\n${r.stderr}`);
    assert.ok(r.stdout.trim().length > 0, `example ${ex.name} printed its result`);
    assert.doesNotMatch(r.stdout + r.stderr, /\bundefined\b/, `example ${ex.name}`);
  }
  assert.ok(existsSync(join(project, 'out', 'run-hf', 'iter_0000200', 'shardshift-manifest.json')));
});
