/**
 * How each Megatron GPT parameter is split across tensor-parallel ranks (Megatron-LM
 * `tools/checkpoint/saver_base.py` / `loader_legacy.py`, megatron-core's sharded_state_dict):
 *
 * - column-parallel (split along dim 0): `linear_qkv` weight and bias (whole query groups per
 *   rank, since the global tensor is interleaved per group), word embeddings and output layer
 *   (the padded vocabulary);
 * - gated column-parallel: SwiGLU `linear_fc1` — each rank holds `[gate_r; up_r]`, its slice of
 *   the gate half followed by its slice of the up half;
 * - MLA (TE spec): `linear_q_up_proj`, `linear_kv_up_proj`, `linear_q_proj` column-parallel (whole
 *   heads per rank), the down projections `linear_q_down_proj` / `linear_kv_down_proj` duplicated;
 * - MTP: `eh_proj` column-parallel;
 * - row-parallel (split along dim 1): `linear_proj` and `linear_fc2` weights;
 * - replicated: norms, q/k layernorms, row-parallel biases — except the norms a model normalises
 *   over all heads and shards with them (`shardedNorms`: MiniMax-M2's full-width q/k norms), which
 *   are column-parallel (their rank's heads' rows).
 */
export type TpSplit = 'column' | 'gated' | 'row' | 'replicated';

/** The args field of shardshift's legacy rank files naming the norms split over TP (layer-relative names). */
export const SHARDED_NORMS_ARG = 'shardshift_tp_sharded_norms';

/** The split of a parameter given its name (per-layer or global, TE or local-spec names). */
export function tpSplitOf(name: string, gated: boolean, shardedNorms: readonly string[] = []): TpSplit {
  if (shardedNorms.some((n) => name.endsWith(`.${n}`))) return 'column';
  if (/(^|\.)linear_qkv\.(weight|bias)$/.test(name)) return 'column';
  // MLA: the up projections (and a plain q_proj) split heads; TE's down projections are duplicated
  // (TELinear parallel_mode='duplicated'), their fused norms replicated like every norm.
  if (/(^|\.)(linear_q_up_proj|linear_kv_up_proj|linear_q_proj)\.weight$/.test(name)) return 'column';
  // The MTP layers' [embedding; hidden] projection is a ColumnParallelLinear (gather_output=False).
  if (/(^|\.)eh_proj\.weight$/.test(name)) return 'column';
  if (/(^|\.)linear_fc1\.(weight|bias)$/.test(name)) return gated ? 'gated' : 'column';
  if (/(^|\.)(linear_proj|linear_fc2)\.weight$/.test(name)) return 'row';
  if (/^(embedding\.word_embeddings|output_layer)\.weight$/.test(name)) return 'column';
  return 'replicated';
}

/** Layers of pipeline stage `p` of `pp` (uniform split, as Megatron-LM does by default). */
export function stageLayers(numLayers: number, pp: number, p: number): { first: number; count: number } {
  const count = numLayers / pp;
  return { first: p * count, count };
}

/**
 * Megatron-LM's per-rank directory name (`get_checkpoint_name`): `mp_rank_TT`, `_PPP` when PP > 1,
 * then `_EEE` when EP > 1 — so `mp_rank_00_001` is PP rank 1 or EP rank 1 depending on the args.
 */
export function rankDirName(tp: number, pp: number, tpRank: number, ppRank: number, ep = 1, epRank = 0): string {
  const t = String(tpRank).padStart(2, '0');
  const base = pp > 1 ? `mp_rank_${t}_${String(ppRank).padStart(3, '0')}` : `mp_rank_${t}`;
  return ep > 1 ? `${base}_${String(epRank).padStart(3, '0')}` : base;
}

/** A canonical expert parameter name's parts, or undefined for non-expert names. */
export function expertOf(name: string): { before: string; expert: number; after: string } | undefined {
  const m = /^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..+)$/.exec(name);
  return m ? { before: m[1]!, expert: Number(m[2]), after: m[3]! } : undefined;
}

/**
 * TE grouped-GEMM expert names (`….mlp.experts.linear_fc1.weight7`, as TEGroupedMLP's state dict
 * and Megatron-FSDP's fsdp_dtensor files name them) → the SequentialMLP form the maps use
 * (`….mlp.experts.local_experts.7.linear_fc1.weight`); other names unchanged.
 */
export function ungroupedExpertName(name: string): string {
  return name.replace(/(^|\.)mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$/, '$1mlp.experts.local_experts.$4.$2.$3');
}
