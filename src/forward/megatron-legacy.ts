/**
 * megatron-core semantics of legacy Megatron-LM rank files (`--ckpt-format torch`:
 * `iter_XXXXXXX/mp_rank_TT[_PPP]/model_optim_rng.pt`), rank by rank as each rank's `GPTModel` computes
 * with its own `state_dict` — not through the global view shardshift's converter assembles:
 *
 * - every tensor-parallel rank holds `linear_qkv` rows for its own `num_query_groups / tp` query
 *   groups, each group [its query heads; one key head; one value head] (ColumnParallelLinear over
 *   the grouped layout), its biases likewise; its heads attend on their own and its row-parallel
 *   `linear_proj` ([hidden, local heads · hd]) makes a partial sum, all-reduced across the ranks;
 * - `linear_fc1` holds the rank's [gate_r; up_r] (the swiglu halves are split per rank), the
 *   row-parallel `linear_fc2` a partial sum;
 * - `embedding.word_embeddings` is vocab-parallel (rank r: rows r · Vp/tp …), `output_layer`
 *   column-parallel over the padded vocabulary (or, tied on a single stage, the embedding);
 * - pipeline stage p numbers its layers from 0; its first global layer is p · num_layers / pp.
 *
 * The shape comes from the `args` every rank file carries. Expert-parallel (MoE) rank files,
 * uneven or virtual pipelines and fewer query groups than TP ranks are refused by name.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { openTorchArchive, tensorPiece } from '../formats/torch-archive.js';
import { ReadOnlyFile } from '../io/file.js';
import type { SourceTensor } from '../lazy/types.js';
import { commonArgs } from '../megatron/checkpoint.js';
import { MEGATRON_GLOBALS, resolveIteration } from '../megatron/run-dir.js';
import { RankTensor } from '../nxd/shards.js';
import { PyDict, TensorRef, type PyValue } from '../pickle/values.js';
import { badInput, unsupported } from '../util/errors.js';
import { columnParallelHead, project, vocabParallelEmbed, type AttentionShard, type ModelReader, type SwigluReader } from './decoder.js';
import { linear } from './linear.js';
import { argsShape, splitQueryGroups, type MegatronShape } from './megatron-gpt.js';
import { ref, WeightStore, type WeightRef } from './weights.js';

const RANK_DIR = /^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$/;

export interface LegacyModel {
  readonly model: ModelReader;
  readonly config: string;
  close(): Promise<void>;
}

/** Whether `path` (a run or iter_* directory) holds legacy rank directories. */
export async function isLegacyRun(path: string): Promise<boolean> {
  try {
    const r = await resolveIteration(path);
    return (await readdir(r.iterDir)).some((n) => RANK_DIR.test(n));
  } catch {
    return false;
  }
}

export async function openLegacyForward(path: string, blockBytes: number): Promise<LegacyModel> {
  const { iterDir } = await resolveIteration(path);
  const dirs = (await readdir(iterDir)).filter((n) => RANK_DIR.test(n)).sort();
  if (!dirs.length) throw badInput(`${iterDir}: no mp_rank_* directories`, iterDir);
  const opened: ReadOnlyFile[] = [];
  const close = () => Promise.all(opened.map((f) => f.close())).then(() => undefined);
  try {
    const files = dirs.map((d) => join(iterDir, d, 'model_optim_rng.pt'));
    // Each rank file: {args, model: {name: tensor …}, rng_state (numpy), …}, read with the
    // allow-list Megatron's files need (numpy RNG state, megatron enums).
    const roots: PyDict[] = [];
    const rankTensors: Array<Map<string, SourceTensor>> = [];
    for (const file of files) {
      const f = await ReadOnlyFile.open(file);
      opened.push(f);
      const arc = await openTorchArchive(f, { extraGlobals: MEGATRON_GLOBALS });
      const model: PyValue | undefined = arc.root instanceof PyDict ? arc.root.get('model') : undefined;
      if (!(arc.root instanceof PyDict) || !(model instanceof PyDict)) throw badInput(`${file}: not a Megatron rank file (no model state dict)`, file);
      if (arc.root.has('model0')) throw unsupported(`${file}: virtual pipeline stages (model0, model1 …) have no reference forward yet`, file);
      roots.push(arc.root);
      const m = new Map<string, SourceTensor>();
      for (const [k, v] of model.stringEntries()) if (v instanceof TensorRef) m.set(k, new RankTensor(k, v.dtype, v.shape, tensorPiece(arc, v, k), `${file}:${k}`));
      rankTensors.push(m);
    }
    const args = commonArgs(roots[0]!);
    if (!args) throw badInput(`${files[0]}: no training args (the legacy format stores them in every rank file)`, files[0]);
    const argFile = files[0]!;
    const num = (k: string, d: number) => {
      const v = args.get(k);
      return typeof v === 'number' ? v : typeof v === 'bigint' ? Number(v) : d;
    };
    const tp = num('tensor_model_parallel_size', 1);
    const pp = num('pipeline_model_parallel_size', 1);
    if (num('expert_model_parallel_size', 1) > 1 || num('num_experts', 0) > 0) throw unsupported(`${path}: legacy MoE rank files have no reference forward yet; verify a torch_dist copy`, path);
    if (args.get('virtual_pipeline_model_parallel_size') !== null && args.get('virtual_pipeline_model_parallel_size') !== undefined) throw unsupported(`${path}: virtual pipeline stages have no reference forward yet`, path);
    for (const k of ['decoder_first_pipeline_num_layers', 'decoder_last_pipeline_num_layers', 'pipeline_model_parallel_layout', 'account_for_embedding_in_pipeline_split', 'account_for_loss_in_pipeline_split']) {
      const v = args.get(k);
      if (v !== undefined && v !== null && v !== false) throw unsupported(`${path}: ${k} (uneven pipeline stages) has no reference forward yet`, path);
    }
    if (dirs.length !== tp * pp) throw badInput(`${iterDir}: ${dirs.length} rank directories for tensor_model_parallel_size ${tp} × pipeline_model_parallel_size ${pp}`, iterDir);
    const shape = argsShape(args, argFile);
    const tensors = new Map<string, SourceTensor>();
    for (let i = 0; i < dirs.length; i++) {
      const m = RANK_DIR.exec(dirs[i]!)!;
      const t = Number(m[1]);
      const p = m[2] === undefined ? 0 : Number(m[2]);
      for (const [n, x] of rankTensors[i]!) tensors.set(`tp${t}/pp${p}/model.${n}`, x);
    }
    const store = new WeightStore({ path, root: join(iterDir, 'hf'), tensors }, blockBytes);
    return { model: legacyGpt(store, shape, tp, pp, path), config: `${argFile} (training args)`, close };
  } catch (e) {
    await close();
    throw e;
  }
}

function legacyGpt(store: WeightStore, s: MegatronShape, tp: number, pp: number, path: string): ModelReader {
  const { heads, kvHeads, headDim: hd, hidden: H } = s.dims;
  if (kvHeads % tp !== 0) throw unsupported(`${path}: ${kvHeads} query groups over ${tp} tensor-parallel ranks (fewer groups than ranks) have no reference forward yet`, path);
  if (s.layers % pp !== 0) throw badInput(`${path}: ${s.layers} layers do not split evenly over ${pp} pipeline stages`, path);
  const perStage = s.layers / pp;
  const ranks = [...Array(tp).keys()];
  const last = pp - 1;
  const name = (t: number, p: number, n: string) => `tp${t}/pp${p}/model.${n}`;
  const need = (t: number, p: number, n: string): WeightRef => {
    if (!store.has(name(t, p, n))) throw badInput(`${path}: mp_rank_${String(t).padStart(2, '0')}${pp > 1 ? `_${String(p).padStart(3, '0')}` : ''} has no model.${n}`, path, n);
    return ref(name(t, p, n));
  };
  const has = (t: number, p: number, n: string) => store.has(name(t, p, n));
  /** Layer i on tensor rank t: its stage's tensor under the stage-local layer number. */
  const L = (t: number, i: number, rest: string): WeightRef => need(t, Math.floor(i / perStage), `decoder.layers.${i % perStage}.${rest}`);
  const hasL = (t: number, i: number, rest: string) => has(t, Math.floor(i / perStage), `decoder.layers.${i % perStage}.${rest}`);
  const either = (i: number, a: string, b: string) => (hasL(0, i, a) ? L(0, i, a) : L(0, i, b));
  const groups = kvHeads / tp;
  const r = heads / kvHeads;

  const attentionShard = (i: number, t: number): AttentionShard => ({
    heads: groups * r,
    kvHeads: groups,
    async qkv(x, T) {
      const fused = await project(store, L(t, i, 'self_attention.linear_qkv.weight'), x, T, s.qkvBias ? L(t, i, 'self_attention.linear_qkv.bias') : undefined);
      return splitQueryGroups(fused, T, groups, r, hd);
    },
    out: L(t, i, 'self_attention.linear_proj.weight'),
  });
  const mlpShard = (i: number, t: number): SwigluReader => {
    const fc1 = L(t, i, 'mlp.linear_fc1.weight');
    return {
      async gateUp(x, T) {
        const half = store.shape(fc1)[0]! / 2;
        return { gate: await linear(store, fc1, x, T, [0, half]), up: await linear(store, fc1, x, T, [half, 2 * half]) };
      },
      down: L(t, i, 'mlp.linear_fc2.weight'),
    };
  };
  const emb = 'embedding.word_embeddings.weight';
  // No output_layer on the last stage: the model is tied (and, on one stage, computes with its embedding).
  const tied = !has(0, last, 'output_layer.weight');
  return {
    describe: `GPTModel (megatron-core legacy rank files, tp ${tp} × pp ${pp})`,
    dims: s.dims,
    store,
    embed: (tokens) => vocabParallelEmbed(store, ranks.map((t) => need(t, 0, emb)), tokens, H),
    layers: s.layers,
    attention: (i) => ({
      norm: either(i, 'self_attention.linear_qkv.layer_norm_weight', 'input_layernorm.weight'),
      shards: ranks.map((t) => attentionShard(i, t)),
      ...(s.qkNorm ? { qNorm: L(0, i, 'self_attention.q_layernorm.weight'), kNorm: L(0, i, 'self_attention.k_layernorm.weight') } : {}),
    }),
    mlp: (i) => ({ kind: 'dense', norm: either(i, 'mlp.linear_fc1.layer_norm_weight', 'pre_mlp_layernorm.weight'), shards: ranks.map((t) => mlpShard(i, t)) }),
    finalNorm: need(0, last, 'decoder.final_layernorm.weight'),
    // Column-parallel over the padded vocabulary; the real rows are the first `vocab`. A tied model
    // on one stage computes with its embedding; on several, megatron-core gives the last stage its
    // own output_layer (gpt_model.py: skip_weight_param_allocation only on the first).
    head: (x, T, vocab) => columnParallelHead(store, ranks.map((t) => need(t, last, tied && pp === 1 ? emb : 'output_layer.weight')), x, T, vocab),
  };
}
