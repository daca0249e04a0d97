/**
 * Step `convert/nxd`: NxD Training's checkpoint_converter.py with its own flag names
 * (`--model_style --input_dir --output_dir --config --tp_size --pp_size --n_layers
 * --kv_size_multiplier --qkv_linear --fuse_qkv --save_xser --load_xser --convert_from_full_state
 * --convert_to_full_state --hf_model_name --hw_backend`), as step keys and as the flags of
 * `shardshift nxd-convert`. Same outputs as the converter: `<output_dir>/model/<shard>.pt` from a
 * full state, `<output_dir>/checkpoint.pt` to a full state.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { usage } from '../util/errors.js';
import { convertHfToNxd, convertNxdToHf } from '../plan/nxd-convert.js';
import { registerStep, type Step } from './registry.js';

const bool = (description: string) => ({ type: 'bool' as const, description, default: false });

export const nxdStep: Step = {
  name: 'convert/nxd',
  description: 'NxD Training checkpoints ↔ full state (HF names), the flags of NxDT\'s checkpoint_converter.py: HF or megatron style, tp/pp shards, GQA (qkv_linear, fuse_qkv, kv_size_multiplier), plain or xser.',
  params: {
    model_style: { type: 'string', description: 'names inside the NxD shards', default: 'hf', choices: ['hf', 'megatron'] },
    input_dir: { type: 'string', description: 'from full state: the weights (pytorch_model.bin, a safetensors file or an HF directory); to full state: the shard directory (<tag>/model or <tag>)', default: null },
    output_dir: { type: 'string', description: 'from full state: the tag directory to create (model/ inside); to full state: directory for checkpoint.pt', required: true },
    config: { type: 'string', description: 'the model\'s config.json (default from full state: beside the weights)', default: null },
    tp_size: { type: 'int', description: 'tensor-parallel degree', default: 1 },
    pp_size: { type: 'int', description: 'pipeline-parallel degree', default: 1 },
    n_layers: { type: 'int', description: 'number of layers (checked against config.json; 0 = not given)', default: 0 },
    kv_size_multiplier: { type: 'int', description: 'KV-head replication factor (read back: detected from the shapes and checked)', default: 1 },
    qkv_linear: bool('GQAQKVColumnParallelLinear names qkv_proj.weight_q/k/v (NxDT GQA models). Unlike the converter\'s argparse type=bool, False means off'),
    fuse_qkv: bool('one qkv_proj.weight_qkv per rank (needs qkv_linear)'),
    save_xser: bool('write xser shards: tensors in <shard>.tensors/tensor_N.pt, TensorReference in the shard, .info.pt'),
    load_xser: bool('the input is xser (detected anyway; checked when given)'),
    convert_from_full_state: bool('full state → NxD shards'),
    convert_to_full_state: bool('NxD shards → full state (checkpoint.pt)'),
    hf_model_name: { type: 'string', description: 'from full state without input_dir: an HF model id or directory', default: null },
    hw_backend: { type: 'string', description: 'trn1 or trn2: the Q-head order of qkv_linear in hf style (trn2 contiguous; trn1 grouped per KV head)', required: true },
    dtype: { type: 'string', description: 'cast floating-point weights (default: keep, as the converter does)', default: null, choices: ['bfloat16', 'float16', 'float32'] },
    max_memory: { type: 'size', description: 'byte budget for tensor buffers', default: '1GiB' },
    overwrite: { type: 'bool', description: 'replace an existing output (never the source)', default: false },
  },
  async run(p, ctx) {
    const from = p.convert_from_full_state === true;
    const to = p.convert_to_full_state === true;
    if (from === to) throw usage(`${this.name}: give exactly one of convert_from_full_state / convert_to_full_state`);
    const dtype = p.dtype === 'bfloat16' ? 'BF16' : p.dtype === 'float16' ? 'F16' : p.dtype === 'float32' ? 'F32' : undefined;
    const common = {
      modelStyle: p.model_style as 'hf' | 'megatron',
      tp: p.tp_size as number,
      pp: p.pp_size as number,
      nLayers: p.n_layers as number,
      kvSizeMultiplier: p.kv_size_multiplier as number,
      qkvLinear: p.qkv_linear as boolean,
      fuseQkv: p.fuse_qkv as boolean,
      hwBackend: String(p.hw_backend),
      dtype: dtype as 'BF16' | 'F16' | 'F32' | undefined,
      maxMemory: p.max_memory as number,
      overwrite: p.overwrite as boolean,
      dryRun: ctx.dryRun,
      onProgress: ctx.onProgress,
    } as const;
    const out = String(p.output_dir);
    if (from) {
      let input = p.input_dir as string | null;
      if (!input) {
        if (!p.hf_model_name) throw usage(`${this.name}: give input_dir or hf_model_name`);
        input = await ctx.resolveModel(String(p.hf_model_name), 'all');
      }
      let config = (p.config as string | null) ?? undefined;
      if (!config && p.hf_model_name) {
        const dir = await ctx.resolveModel(String(p.hf_model_name), 'config');
        if (await stat(join(dir, 'config.json')).then(() => true, () => false)) config = join(dir, 'config.json');
      }
      return convertHfToNxd(input, out, { ...common, config, xser: p.save_xser as boolean, command: `steps run ${this.name} convert_from_full_state` });
    }
    if (!p.input_dir) throw usage(`${this.name}: convert_to_full_state needs input_dir (the shard directory)`);
    if (!p.config) throw usage(`${this.name}: convert_to_full_state needs config (the model's config.json)`);
    return convertNxdToHf(String(p.input_dir), out, {
      ...common,
      config: String(p.config),
      xser: p.load_xser ? true : undefined,
      fullStateAs: 'checkpoint.pt',
      command: `steps run ${this.name} convert_to_full_state`,
    });
  },
};

registerStep(nxdStep);
