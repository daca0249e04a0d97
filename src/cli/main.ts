#!/usr/bin/env node
/**
 * The `shardshift` command. Exit codes: 0 ok, 1 conversion error (bad or unsupported input),
 * 2 usage error (flags, paths), 3 verification failure.
 */
import { Command, Option, CommanderError } from 'commander';
import { ShardshiftError, ioError, isErrno } from '../util/errors.js';
import { UnpicklingError } from '../pickle/index.js';
import { FORMAT_NAMES, READ_FORMAT_NAMES } from '../checkpoints/registry.js';
import { runInspect } from './inspect.js';
import { runConvert } from './convert.js';
import { runPush } from './push.js';
import { registerLoraCommands } from './lora.js';
import { VERSION } from '../util/version.js';
import { EXIT } from './exit.js';
import { runVerify, runDiff } from './verify.js';
import { runStepsList, runStepsShow, runStepsRun } from './steps.js';
import { runDcpToHf } from './dcp-to-hf.js';
import { registerNxdCommands } from './nxd.js';
import { CKPT_FORMATS } from '../megatron/run-dir.js';
import { onInterrupt } from './report.js';
import tab from '@bomb.sh/tab/commander';
import { clusterOptions, partOption, partitionable, registerPartCommands, setCommandLine } from './partition.js';


function program(): Command {
  const p = new Command('shardshift')
    .description('Convert large-model checkpoints between formats, byte-exactly, with no Python and no GPU.')
    // The first word is the version (scripts parse it); then what it runs on.
    .version(`${VERSION} (Node.js ${process.version}, ${process.platform}-${process.arch})`)
    // Commander's own errors read like shardshift's ("shardshift: error: …").
    .configureOutput({ outputError: (str, write) => write(`shardshift: ${str}`) })
    .exitOverride();

  p.command('inspect')
    .description('Show what a checkpoint holds (format, tensors, bytes, dtypes, side files) without reading tensor data.')
    .argument('<path>', 'checkpoint file or directory')
    .addOption(new Option('--format <format>', 'skip detection').choices([...READ_FORMAT_NAMES]))
    .option('--json', 'print one JSON document')
    .option('--limit <n>', 'tensors to list (0 = all)', '50')
    .addHelpText('after', '\nExample:\n  $ shardshift inspect examples/tiny-llama\n  $ shardshift inspect model.safetensors --json | jq .dtypes')
    .action(runInspect);

  p.command('convert')
    .description('Convert a checkpoint to another format, streaming tensor by tensor within a memory budget.')
    .argument('<src>', 'source checkpoint (file or directory; never modified), or a hub model org/name[@revision]')
    .argument('<out>', 'output directory (or a .safetensors / .bin / .pt file); must not exist')
    .addOption(new Option('--to <format>', 'target: a file format, or megatron (torch_dist) / hf (safetensors model) through the model map').choices([...FORMAT_NAMES, 'megatron', 'hf', 'nxd']).makeOptionMandatory())
    .addOption(new Option('--from <format>', 'source format (default: detected)').choices([...READ_FORMAT_NAMES]))
    .option('--max-memory <size>', 'byte budget for tensor buffers', '1GiB')
    .option('--shard-size <size>', 'largest output shard (safetensors, torch); transformers 5 default', '50GB')
    .option('--dcp-files <n>', 'number of .distcp files to write (default: one per 5 GB)')
    .addOption(new Option('--dtype <dtype>', 'cast floating-point tensors').choices(['float32', 'float16', 'bfloat16', 'float8_e4m3fn', 'float8_e5m2']))
    .option('--tp <n>', 'megatron: tensor-parallel size the checkpoint is for (sets vocab padding)', '1')
    .option('--pp <n>', 'megatron: pipeline-parallel size (recorded)', '1')
    .option('--ep <n>', 'megatron, MoE models: expert-parallel size (rank files with --ckpt-format torch; recorded for torch_dist)', '1')
    .option('--etp <n>', 'megatron, MoE models: expert tensor-parallel size (default: --tp)')
    .option('--make-vocab-size-divisible-by <n>', 'megatron: vocab padding divisor', '128')
    .option('--iteration <n>', 'megatron: iteration number of the output', '0')
    .addOption(new Option('--ckpt-format <format>', 'megatron: torch_dist, torch (legacy mp_rank_* files for --tp × --pp), or fsdp_dtensor (Megatron-FSDP)').choices([...CKPT_FORMATS]).default('torch_dist'))
    .addOption(new Option('--megatron-spec <spec>', 'megatron: key names of the TransformerEngine (te) or local (TE-free) layer spec; they differ for legacy norms and MoE pre-MLP norms').choices(['te', 'local']).default('te'))
    .option('--hf-model <dir>', 'hf: reference HF model directory or hub id (config, tokenizer) for the export')
    .addOption(new Option('--model-style <style>', 'nxd: names inside the shards (NxDT --model_style)').choices(['hf', 'megatron']).default('hf'))
    .option('--kv-size-multiplier <n>', 'nxd: KV-head replication (read back: detected and checked)')
    .option('--qkv-linear', 'nxd: GQA layer names qkv_proj.weight_q/k/v')
    .option('--fuse-qkv', 'nxd: one qkv_proj.weight_qkv per rank (with --qkv-linear)')
    .option('--xser', 'nxd: write xser shards (tensors in <shard>.tensors/tensor_N.pt)')
    .option('--hw-backend <trn1|trn2>', 'nxd: Q-head order of --qkv-linear (trn1 grouped per KV head, trn2 contiguous); default trn1')
    .option('--allow-unmapped', 'megatron/hf: skip source tensors the model map has no place for (listed) instead of failing')
    .addOption(new Option('--quantize <method>', 'hf: write the weights the hub stores quantized in that layout (mxfp4: GPT-OSS experts, bit for bit as transformers\' quantize_to_mxfp4; fp8: DeepSeek-V3\'s 128×128 block-scaled e4m3 weights, as Megatron-Bridge\'s block quantizer)').choices(['mxfp4', 'fp8']))
    .option('--drop-mtp', 'megatron/hf: leave the multi-token-prediction layers (mtp.*) out on purpose (listed in the plan)')
    .option('--overwrite', 'replace an existing output (the source is never touched)')
    .option('--hash-source', 'record full SHA-256s of the source files in the manifest (default: first and last MiB)')
    .option('--dry-run', 'print the plan and write nothing')
    .option('--json', 'print the plan/result as JSON')
    .option('-q, --quiet', 'no progress display')
    .option('-v, --verbose', 'also list what was skipped that the output does not need (optimizer and RNG state, TransformerEngine extra state, tied copies)')
    .option('--max-disk <size>', 'hub source → megatron: most bytes of source shards on disk at once (each is deleted once read); default: into the HF cache, kept')
    .option('--push-to-hub <org/name[@branch]>', 'upload the finished output to the hub as one commit (files the branch already has are skipped)')
    .option('--create-repo', 'with --push-to-hub: create the repository or branch when missing')
    .option('--private', 'with --create-repo: make the new repository private')
    .addHelpText(
      'after',
      '\nExamples:\n  $ shardshift convert --to safetensors pytorch_model.bin model.safetensors\n  $ shardshift convert --to dcp ./hf-model ./hf-model-dcp --dcp-files 4\n  $ shardshift convert --to torch ./dcp-ckpt ./consolidated.pt --max-memory 512MiB\n  $ shardshift convert --to megatron ./Llama-3.2-1B ./llama-megatron --tp 2\n  $ shardshift convert --to megatron ./llama-megatron ./llama-tp2pp2 --ckpt-format torch --tp 2 --pp 2   # reshard\n  $ shardshift convert --to hf ./llama-megatron ./Llama-3.2-1B-back --hf-model ./Llama-3.2-1B\n  $ shardshift convert --to nxd ./Llama-3.2-1B ./nxd-tag --tp 2 --pp 2 --qkv-linear --kv-size-multiplier 2 --xser\n  $ shardshift convert --to hf ./nxd-tag ./Llama-3.2-1B-back --hf-model ./Llama-3.2-1B   # NxD source detected\n  $ shardshift convert --to megatron meta-llama/Llama-3.1-70B ./llama-megatron --tp 8 --max-disk 40GB   # streamed from the hub\n  $ shardshift convert --to hf ./llama-megatron ./llama-hf --hf-model meta-llama/Llama-3.1-70B --push-to-hub me/llama-ft@iter-1000 --create-repo',
    )
    .addOption(partOption());
  clusterOptions(p.commands.at(-1)!).action(partitionable(runConvert));
  p.command('dcp-to-hf')
    .description('NeMo RL policy checkpoint (DCP, DTensor v1 or v2, or Megatron-backend torch_dist) → Hugging Face; the flags of NeMo RL\'s convert_dcp_to_hf.py.')
    .option('--config <yaml>', 'the run\'s config.yaml (policy.model_name gives the HF model for config.json)')
    .option('--dcp-ckpt-path <dir>', 'step_N/policy/weights')
    .option('--hf-ckpt-path <dir>', 'output HF directory')
    .option('--hf-model-name <id-or-dir>', 'override policy.model_name')
    .addOption(new Option('--dtype <dtype>', 'cast floating-point weights (default: keep)').choices(['float32', 'float16', 'bfloat16']))
    .option('--max-memory <size>', 'byte budget for tensor buffers', '1GiB')
    .option('--overwrite', 'replace an existing output')
    .option('--dry-run', 'print the plan and write nothing')
    .option('--json', 'JSON progress events on stderr, result on stdout')
    .option('-q, --quiet', 'no progress display')
    .addHelpText('after', '\nExample (NeMo RL\'s own):\n  $ shardshift dcp-to-hf --config=$CKPT_DIR/config.yaml --dcp-ckpt-path=$CKPT_DIR/policy/weights --hf-ckpt-path=${CKPT_DIR}-hf')
    .addOption(partOption())
    .action(partitionable(runDcpToHf));

  const steps = p.command('steps').description('The Nemotron-steps-style interface: named steps with YAML configs and key=value overrides.');
  steps.command('list').description('List the steps.').action(runStepsList);
  steps.command('show').description('Print a step\'s parameters, types, defaults and configs.').argument('<step>').action(runStepsShow);
  steps
    .command('run')
    .description('Run a step: defaults ← -c config ← key=value overrides (nested keys: parallel.tp=2).')
    .argument('<step>', 'e.g. convert/hf_to_megatron')
    .argument('[overrides...]', 'key=value')
    .option('-c, --config <name-or-path>', 'a config shipped with the step (default) or a YAML file')
    .option('-d, --dry-run', 'print the plan and write nothing')
    .option('--json', 'machine-readable: JSON progress events on stderr, the result as JSON on stdout')
    .option('-q, --quiet', 'no progress display')
    .addHelpText(
      'after',
      '\nExamples:\n  $ shardshift steps run convert/hf_to_megatron -c default hf_model_id=meta-llama/Llama-3.2-1B megatron_path=./out/llama-megatron parallel.tp=2\n  $ shardshift steps run convert/megatron_to_hf -c default megatron_path=./out/llama-megatron/iter_0000000 hf_model_id=meta-llama/Llama-3.2-1B -d\n  $ shardshift steps run convert/megatron_to_hf -c default --batch slurm_convert_model megatron_path=/lustre/run/iter_0000100 hf_model_id=meta-llama/Llama-3.2-1B hf_path=/lustre/out/run-hf\n  $ shardshift steps run convert/megatron_to_hf -c default megatron_path=/lustre/run iterations=every:1000 hf_path=/lustre/out/run-hf',
    )
    .addOption(partOption());
  clusterOptions(steps.commands.at(-1)!).action(partitionable(runStepsRun));

  p.command('push')
    .description('Upload a finished output directory to the hub as one commit (files the branch already has are skipped).')
    .argument('<dir>', 'a finished output (its manifest is checked first)')
    .argument('<repo>', 'org/name or org/name@branch')
    .option('--create-repo', 'create the repository or branch when missing')
    .option('--private', 'with --create-repo: make the new repository private')
    .option('-m, --message <text>', 'commit title')
    .option('--json', 'print the result (commit, URL, files uploaded) as JSON')
    .option('-q, --quiet', 'no messages but the result')
    .addHelpText('after', '\nExamples:\n  $ HF_TOKEN=hf_… shardshift push ./llama-hf me/llama-ft@iter-1000 --create-repo --private')
    .action(runPush);
  p.command('verify')
    .description('Check an output: its manifest checksums, its tensors against the declared model config, NaN/Inf, and with --against, that every tensor equals its mapping of the source.')
    .argument('<out>', 'a directory written by shardshift')
    .option('--against <src>', 'the source it was converted from')
    .option('--json', 'print the report as JSON')
    .option('--logits', 'with --against: run a reference forward pass of both (each by its own format\'s semantics) and compare the logits')
    .option('--prompt <text>', '--logits: the prompt, tokenized with the checkpoint\'s tokenizer.json')
    .option('--tokens <ids>', '--logits: comma-separated token ids (instead of a prompt)')
    .option('--positions <n>', '--logits: positions compared (default 8; caps a longer prompt)')
    .option('--generate <n>', '--logits: greedy-decode N tokens from both and print them side by side')
    .option('--tolerance <x>', '--logits: largest |Δ| allowed, relative to the largest |logit| (default: by dtype, see README)')
    .option('--min-cosine <x>', '--logits: smallest cosine similarity allowed at any position (default: by dtype)')
    .option('--hf-model <dir>', '--logits: HF model directory describing a Megatron checkpoint saved without training args')
    .option('--max-memory <size>', '--logits: byte budget for weight blocks', '1GiB')
    .addHelpText('after', '\nExit code 3 when a check fails.\n\nExamples:\n  $ shardshift verify out/llama-megatron --against ./Llama-3.2-1B\n  $ shardshift verify out/llama-hf\n  $ shardshift verify out/llama-megatron --against ./Llama-3.2-1B --logits --prompt "The capital of France is" --generate 8')
    .action(runVerify);

  p.command('diff')
    .description('Compare two checkpoints of any formats (HF and Megatron through the model map): per-tensor differing elements, max abs and ulp difference.')
    .argument('<a>', 'first checkpoint')
    .argument('<b>', 'second checkpoint')
    .option('--all', 'list identical tensors too')
    .option('--json', 'print the report as JSON')
    .addHelpText('after', '\nExit code 0 when identical, 1 otherwise.\n\nExamples:\n  $ shardshift diff ./Llama-3.2-1B out/llama-megatron\n  $ shardshift diff merged-by-peft/ merged-by-shardshift/')
    .action(runDiff);
  registerLoraCommands(p);
  registerNxdCommands(p);
  registerPartCommands(p, main);
  // `shardshift completion bash|zsh|fish|powershell` prints the script; the shell then asks the
  // hidden `shardshift complete -- <words>` (commands, options and their choices, from this tree).
  tab(p, { completionCommandName: 'completion' });
  shortUsageErrors(p);
  return p;
}

/**
 * After a usage error, commander prints the error line; then each command adds its usage line and
 * where the rest is — not the whole help (90 lines that push the error off the screen).
 */
function shortUsageErrors(c: Command, parents: readonly string[] = []): void {
  const path = [...parents, c.name()];
  c.showHelpAfterError(`Usage: ${path.join(' ')} ${c.usage()}
See '${path.join(' ')} --help'.`);
  for (const sub of c.commands) shortUsageErrors(sub, path);
}

export async function main(argv: string[]): Promise<number> {
  // Ctrl-C: say what was kept and how to resume (finished files are fsynced and recorded).
  // `scancel` sends SIGTERM first: the same clean stop as Ctrl-C.
  process.once('SIGINT', onInterrupt);
  process.once('SIGTERM', onInterrupt);
  setCommandLine(argv);
  const p = program();
  try {
    await p.parseAsync(argv, { from: 'user' });
    return process.exitCode === undefined ? EXIT.ok : Number(process.exitCode);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') return EXIT.ok;
      return EXIT.usage;
    }
    if (e instanceof UnpicklingError) {
      // The unpickler refused the input (a disallowed global, a malformed pickle): bad input.
      process.stderr.write(`shardshift: error: ${e.message}\n`);
      return EXIT.error;
    }
    if (e instanceof ShardshiftError) {
      process.stderr.write(`shardshift: error: ${e.message}\n`);
      return e.code === 'USAGE' ? EXIT.usage : EXIT.error;
    }
    if (isErrno(e)) {
      process.stderr.write(`shardshift: error: ${ioError(e, undefined).message}\n`);
      return EXIT.error;
    }
    process.stderr.write(`shardshift: internal error (please report): ${(e as Error)?.stack ?? String(e)}\n`);
    return EXIT.error;
  }
}

// A closed pipe (`shardshift inspect … | head`) ends the output, not the program with a trace.
for (const s of [process.stdout, process.stderr]) {
  s.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw e;
  });
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
