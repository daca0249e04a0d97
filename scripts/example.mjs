// The main job on the bundled example: inspect examples/tiny-llama, convert it to torch.save,
// to DCP and back to safetensors, and show that the round trip kept every tensor byte.
// Output goes to ./output/example (replaced on each run).
import { execFileSync } from 'node:child_process';
import { rmSync, readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
process.chdir(root);
execFileSync(process.execPath, [join('node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], { stdio: 'inherit' });
const cli = join(root, 'dist', 'src', 'cli', 'main.js');
const out = join(root, 'output', 'example');
rmSync(out, { recursive: true, force: true });

function run(...args) {
  process.stdout.write(`\n$ shardshift ${args.join(' ')}\n`);
  execFileSync(process.execPath, [cli, ...args], { stdio: 'inherit' });
}

run('inspect', 'examples/tiny-llama', '--limit', '6');
run('convert', '--to', 'torch', 'examples/tiny-llama', join(out, 'torch'));
run('convert', '--to', 'dcp', join(out, 'torch'), join(out, 'dcp'), '--dcp-files', '2');
run('convert', '--to', 'safetensors', join(out, 'dcp'), join(out, 'safetensors'));
run('inspect', join(out, 'dcp'), '--limit', '3');

const data = (p) => {
  const b = readFileSync(p);
  return b.subarray(8 + Number(b.readBigUInt64LE(0)));
};
const same = data('examples/tiny-llama/model.safetensors').equals(data(join(out, 'safetensors', 'model.safetensors')));
process.stdout.write(`\nround trip safetensors → torch → dcp → safetensors: tensor bytes ${same ? 'identical' : 'DIFFER'}\n`);
process.exit(same ? 0 : 1);
