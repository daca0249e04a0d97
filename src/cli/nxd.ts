/**
 * `shardshift nxd-convert`: NxD Training's checkpoint_converter.py flags, unchanged, so a command
 * line switches by replacing `python3 checkpoint_converter.py` (runs step convert/nxd).
 */
import type { Command } from 'commander';
import { nxdStep } from '../steps/nxd.js';
import { single } from '../steps/registry.js';
import { resolveParams } from '../steps/config.js';
import { resolveModel } from '../hub/download.js';
import { reporter } from './report.js';
import { partLine, partOption, partitionable } from './partition.js';
import { describePlan } from './convert.js';
import { formatBytes } from '../util/size.js';

const VALUE_FLAGS = ['model_style', 'input_dir', 'output_dir', 'config', 'tp_size', 'pp_size', 'n_layers', 'kv_size_multiplier', 'qkv_linear', 'fuse_qkv', 'save_xser', 'load_xser', 'hf_model_name', 'hw_backend', 'dtype', 'max_memory'] as const;
const SWITCHES = ['convert_from_full_state', 'convert_to_full_state', 'overwrite'] as const;

export function registerNxdCommands(p: Command): void {
  const c = p
    .command('nxd-convert')
    .description('NxD Training checkpoints ↔ full state with the flags of NxDT\'s checkpoint_converter.py (step convert/nxd).');
  for (const f of VALUE_FLAGS) c.option(`--${f} <value>`, nxdStep.params[f]!.description);
  for (const f of SWITCHES) c.option(`--${f}`, nxdStep.params[f]!.description);
  c.addOption(partOption());
  c.option('--dry-run', 'print the plan and write nothing')
    .option('-q, --quiet', 'no progress display')
    .addHelpText(
      'after',
      '\nExamples (NxDT\'s, with the command name replaced):\n  $ shardshift nxd-convert --model_style hf --hw_backend trn1 --input_dir ./llama3/pytorch_model.bin --output_dir ./nxdt_tp8pp4 --save_xser True --config ./llama3/config.json --tp_size 8 --pp_size 4 --n_layers 32 --kv_size_multiplier 1 --qkv_linear True --convert_from_full_state\n  $ shardshift nxd-convert --model_style hf --hw_backend trn1 --input_dir ./ckpt/model --output_dir ./hf_out --load_xser True --config ./llama3/config.json --tp_size 8 --pp_size 4 --kv_size_multiplier 1 --qkv_linear True --convert_to_full_state',
    )
    .action(partitionable(async (f: Record<string, string | boolean | undefined>) => {
      const overrides: string[] = [];
      for (const k of VALUE_FLAGS) if (f[k] !== undefined) overrides.push(`${k}=${String(f[k])}`);
      for (const k of SWITCHES) if (f[k]) overrides.push(`${k}=true`);
      const params = await resolveParams(nxdStep, undefined, overrides);
      const rep = reporter({ quiet: !!f.quiet, dryRun: !!f.dryRun });
      rep.status('nxd-convert: opening …');
      const r = await rep.watch(
        nxdStep
          .run(params, {
            dryRun: !!f.dryRun,
            env: process.env,
            onProgress: rep.onProgress,
            resolveModel: (id, what) => resolveModel(id, what, { log: f.quiet ? undefined : (m) => process.stderr.write(`${m}\n`) }),
          })
          .then(single),
      );
      if (f.dryRun) {
        process.stdout.write(`${describePlan(r.plan)}\n(dry run: nothing written)\n`);
        return;
      }
      process.stdout.write(partLine(r) ?? `wrote ${r.plan.target.path} (${r.plan.target.format}): ${r.plan.files.length} files, ${formatBytes(r.bytesWritten)} in ${r.seconds.toFixed(2)} s\n`);
    }));
}
