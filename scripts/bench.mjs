// `npm run bench -- <case…> [options]`: builds, then runs the benchmark runner (bench/run.mjs;
// cases, options and method are described there and in bench/README.md). Not a test: nothing
// here asserts a time.
import { execFileSync } from 'node:child_process';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
execFileSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.json')], { stdio: 'inherit' });
// `published` (full-size round trips of the published checkpoints), `mxfp4` (GPT-OSS MXFP4
// dequantisation against cp) and `slurm` (a conversion as a Slurm job array against one
// process) and `logits` (verify --logits on an 8B shape) have their own runners.
const args = process.argv.slice(2);
await import(args.includes('published') ? '../bench/published.mjs' : args.includes('mxfp4') ? '../bench/mxfp4.mjs' : args.includes('slurm') ? '../bench/slurm.mjs' : args.includes('hub') ? '../bench/hub.mjs' : args.includes('logits') ? '../bench/logits.mjs' : '../bench/run.mjs');
