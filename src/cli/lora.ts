/** The LoRA commands (`merge-lora`), registered on the main program by `registerLoraCommands`. */
import { Option, type Command } from 'commander';
import { mergeLora } from '../plan/lora-convert.js';
import { exportMbAdapterToPeft, mergeMbToHf, mergeMbToMegatron } from '../plan/lora-mb.js';
import { dtypeFromTorch } from '../tensor/dtype.js';
import { formatBytes, parseSize } from '../util/size.js';
import { usage } from '../util/errors.js';
import { describePlan } from './convert.js';
import { reporter } from './report.js';
import { partLine, partOption, partitionable } from './partition.js';
import type { ConvertResult } from '../plan/convert.js';

interface MergeFlags {
  adapter: string;
  base: string;
  backend: 'peft' | 'megatron-bridge';
  hfModel?: string;
  exportHf?: string;
  forceBase?: boolean;
  dtype?: string;
  safeMerge?: boolean;
  maxMemory: string;
  shardSize: string;
  part?: string;
  overwrite?: boolean;
  dryRun?: boolean;
  json?: boolean;
  quiet?: boolean;
}

function report(r: ConvertResult, f: { json?: boolean; dryRun?: boolean }): void {
  if (f.json) {
    process.stdout.write(JSON.stringify({ plan: r.plan, seconds: r.seconds, bytesWritten: r.bytesWritten, dryRun: !!f.dryRun, outcome: r.outcome }, null, 2) + '\n');
    return;
  }
  if (f.dryRun) {
    process.stdout.write(describePlan(r.plan) + '\n(dry run: nothing written)\n');
    return;
  }
  const pl = partLine(r);
  if (pl) {
    process.stdout.write(pl);
    return;
  }
  if (r.outcome === 'reused') {
    process.stdout.write(`kept ${r.plan.target.path}: already this finished output (manifest, source and every file's SHA-256 verified)\n`);
    return;
  }
  const rate = r.seconds > 0 ? r.bytesWritten / r.seconds : 0;
  process.stdout.write(
    `wrote ${r.plan.target.path}: ${r.plan.files.length} file${r.plan.files.length === 1 ? '' : 's'}, ${formatBytes(r.bytesWritten)} in ${r.seconds.toFixed(2)} s (${formatBytes(rate)}/s)\n`,
  );
}

async function runMergeLora(out: string, f: MergeFlags): Promise<void> {
  const maxMemory = parseSize(f.maxMemory, '--max-memory');
  const maxShardSize = parseSize(f.shardSize, '--shard-size');
  let dtype;
  if (f.dtype) {
    dtype = dtypeFromTorch(f.dtype);
    if (!dtype) throw usage(`--dtype: unknown dtype ${f.dtype}`);
  }
  if (f.part && f.exportHf) throw usage('--part splits one output, and --export-hf writes a second: run the merge with --part, then the export (lora-to-hf) on its own');
  const progress = reporter(f);
  if (f.backend === 'megatron-bridge') {
    if (f.safeMerge || f.forceBase) throw usage('--safe-merge and --force-base apply to --backend peft only');
    const common = { hfModel: f.hfModel, maxMemory, maxShardSize, overwrite: f.overwrite, dryRun: f.dryRun, onProgress: progress.onProgress };
    // With --export-hf the command writes two outputs, each committed on its own: a re-run after a
    // kill between the two commits keeps the finished Megatron output (verified) and writes the HF one.
    progress.status(`opening ${f.base} and ${f.adapter} …`);
    const r = await progress.watch(mergeMbToMegatron(f.base, f.adapter, out, { ...common, reuseComplete: !!f.exportHf }));
    report(r, f);
    if (f.exportHf) {
      const second = reporter(f);
      const h = await second.watch(mergeMbToHf(f.base, f.adapter, f.exportHf, { ...common, dtype, onProgress: second.onProgress }));
      report(h, f);
    }
    return;
  }
  if (f.exportHf || f.hfModel) throw usage('--export-hf and --hf-model apply to --backend megatron-bridge only');
  progress.status(`opening ${f.base} and ${f.adapter} …`);
  const r = await progress.watch(mergeLora(f.base, f.adapter, out, {
    forceBase: f.forceBase,
    dtype,
    safeMerge: f.safeMerge,
    maxMemory,
    maxShardSize,
    overwrite: f.overwrite,
    dryRun: f.dryRun,
    onProgress: progress.onProgress,
  }));
  report(r, f);
}

/** Adds `merge-lora` to the program. */
export function registerLoraCommands(p: Command): void {
  p.command('merge-lora')
    .description(
      "Merge a LoRA adapter into the exact base model it was trained on: a PEFT adapter into its HF base (merged HF checkpoint, bit for bit peft's merge_and_unload), or a Megatron-Bridge LoRA into its Megatron base (merged Megatron checkpoint; --export-hf writes the HF one too).",
    )
    .argument('<out>', 'output directory (must not exist)')
    .requiredOption('--adapter <dir>', 'peft: PEFT adapter directory (adapter_config.json + adapter_model.safetensors or .bin); megatron-bridge: the LoRA torch_dist checkpoint (run or iter_* directory with run_config.yaml)')
    .requiredOption('--base <dir>', 'the base the adapter was trained on: peft: HF model directory; megatron-bridge: the dense Megatron checkpoint')
    .addOption(new Option('--backend <backend>', 'adapter format: peft (HF PEFT adapter + HF base → merged HF) or megatron-bridge (Megatron-Bridge LoRA + Megatron base → merged Megatron)').choices(['peft', 'megatron-bridge']).default('peft'))
    .option('--hf-model <dir>', "megatron-bridge: the base's HF model directory (config, tokenizer); default: the base checkpoint's hf/")
    .option('--export-hf <dir>', 'megatron-bridge: also write the merged model as an HF checkpoint here')
    .option('--force-base', "merge even if the adapter's base_model_name_or_path names another model (shapes are always checked)")
    .addOption(new Option('--dtype <dtype>', 'peft: merge into the base loaded in this dtype, as from_pretrained(dtype=...) (default: as stored); megatron-bridge: dtype of --export-hf').choices(['float32', 'float16', 'bfloat16']))
    .option('--safe-merge', "reproduce merge_and_unload(safe_merge=True): the delta is rounded to the base dtype before it is added")
    .option('--max-memory <size>', 'byte budget for tensor buffers (LoRA factors of the module being merged come on top, as fp32)', '1GiB')
    .option('--shard-size <size>', 'largest output shard; transformers 5 default', '50GB')
    .option('--overwrite', 'replace an existing output (the base and adapter are never touched)')
    .option('--dry-run', 'check everything, print the plan and write nothing')
    .option('--json', 'print the plan/result as JSON')
    .option('-q, --quiet', 'no progress display')
    .addHelpText(
      'after',
      '\nExamples:\n  $ shardshift merge-lora --adapter ./my-lora --base ./Llama-3.2-1B ./Llama-3.2-1B-merged\n  $ shardshift merge-lora --adapter ./my-lora --base ./base --dry-run ./merged\n  $ shardshift merge-lora --backend megatron-bridge --adapter ./lora_ckpt --base ./base_megatron --hf-model ./Llama-3.2-1B ./merged_megatron --export-hf ./merged_hf',
    )
    .addOption(partOption())
    .action(partitionable(runMergeLora));

  p.command('lora-to-hf')
    .description("A Megatron-Bridge LoRA checkpoint to Hugging Face (NeMo RL convert_lora_to_hf.py): merged into the base as an HF checkpoint, or --adapter-only as a PEFT adapter that PeftModel.from_pretrained and vLLM load.")
    .requiredOption('--adapter-ckpt <dir>', 'the LoRA adapter checkpoint (iter_* or run directory, with run_config.yaml and its peft section)')
    .option('--base-ckpt <dir>', "the base model's Megatron checkpoint (required unless --adapter-only)")
    .requiredOption('--hf-model-name <dir>', 'HF model directory of the base (config, tokenizer; recorded as base_model_name_or_path)')
    .requiredOption('--hf-ckpt-path <dir>', 'output directory (must not exist)')
    .option('--adapter-only', 'export only the adapter, in PEFT format (fused q/k/v and gate/up split into HF modules, A shared)')
    .addOption(new Option('--dtype <dtype>', 'merged export dtype (default: the HF config dtype)').choices(['float32', 'float16', 'bfloat16']))
    .option('--max-memory <size>', 'byte budget for tensor buffers', '1GiB')
    .option('--shard-size <size>', 'largest output shard', '50GB')
    .option('--overwrite', 'replace an existing output')
    .option('--dry-run', 'print the plan and write nothing')
    .option('--json', 'print the plan/result as JSON')
    .option('-q, --quiet', 'no progress display')
    .addHelpText(
      'after',
      '\nExamples:\n  $ shardshift lora-to-hf --base-ckpt base/iter_0000000 --adapter-ckpt lora/iter_0000100 --hf-model-name ./Qwen2.5-7B --hf-ckpt-path ./merged\n  $ shardshift lora-to-hf --adapter-only --adapter-ckpt lora/iter_0000100 --hf-model-name ./Qwen2.5-7B --hf-ckpt-path ./adapter',
    )
    .addOption(partOption())
    .action(partitionable(runLoraToHf));

  p.command('export-adapter')
    .description('Export a Megatron-Bridge LoRA adapter as a Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors), without merging — what lora-to-hf --adapter-only does.')
    .requiredOption('--adapter <dir>', 'the Megatron-Bridge LoRA checkpoint (iter_* or run directory)')
    .requiredOption('--hf-model <dir>', 'HF model directory of the base (decides how fused q/k/v and gate/up split; recorded as base_model_name_or_path)')
    .argument('<out>', 'output PEFT adapter directory (must not exist)')
    .option('--max-memory <size>', 'byte budget for tensor buffers', '1GiB')
    .option('--overwrite', 'replace an existing output')
    .option('--dry-run', 'print the plan and write nothing')
    .option('--json', 'print the plan/result as JSON')
    .option('-q, --quiet', 'no progress display')
    .addHelpText('after', '\nExample:\n  $ shardshift export-adapter --adapter lora/iter_0000100 --hf-model ./Qwen2.5-7B ./qwen-lora-peft\n  $ python -c "from peft import PeftModel; ..."   # loads with PeftModel.from_pretrained(base, \'./qwen-lora-peft\')')
    .addOption(partOption())
    .action(partitionable(async (out: string, f: { adapter: string; hfModel: string; maxMemory: string; overwrite?: boolean; dryRun?: boolean; json?: boolean; quiet?: boolean }) =>
      runLoraToHf({ adapterCkpt: f.adapter, hfModelName: f.hfModel, hfCkptPath: out, adapterOnly: true, maxMemory: f.maxMemory, shardSize: '50GB', overwrite: f.overwrite, dryRun: f.dryRun, json: f.json, quiet: f.quiet }),
    ));
}

interface LoraToHfFlags {
  adapterCkpt: string;
  baseCkpt?: string;
  hfModelName: string;
  hfCkptPath: string;
  adapterOnly?: boolean;
  dtype?: string;
  maxMemory: string;
  shardSize: string;
  overwrite?: boolean;
  dryRun?: boolean;
  json?: boolean;
  quiet?: boolean;
}

async function runLoraToHf(f: LoraToHfFlags): Promise<void> {
  const maxMemory = parseSize(f.maxMemory, '--max-memory');
  const maxShardSize = parseSize(f.shardSize, '--shard-size');
  const dtype = f.dtype ? dtypeFromTorch(f.dtype) : undefined;
  const progress = reporter(f);
  const common = { hfModel: f.hfModelName, dtype, maxMemory, maxShardSize, overwrite: f.overwrite, dryRun: f.dryRun, onProgress: progress.onProgress };
  if (!f.adapterOnly && !f.baseCkpt) throw usage('--base-ckpt is required to merge (or pass --adapter-only)');
  progress.status(`opening ${f.adapterCkpt} …`);
  const r = await progress.watch(f.adapterOnly ? exportMbAdapterToPeft(f.adapterCkpt, f.hfCkptPath, common) : mergeMbToHf(f.baseCkpt!, f.adapterCkpt, f.hfCkptPath, common));
  report(r, f);
}
