/**
 * Nemotron-H (Nemotron-H 8B/47B/56B, Nemotron Nano 2, Nemotron 3 Nano 30B-A3B): a hybrid stack
 * whose layers the config spells as megatron-core's `hybrid_override_pattern` (`M` Mamba-2, `*`
 * attention, `-` MLP, `E` MoE; transformers 5 writes the same as `layers_block_type`), each HF
 * layer `backbone.layers.<i>` = `norm` + `mixer`. Megatron-Core's MambaModel as Megatron-Bridge's
 * nemotron_h bridge maps it (megatron-core 0.16.1 `mamba_stack_spec`, TE names):
 *
 * - `M`: `norm` → `mixer.in_proj.layer_norm_weight`; `in_proj` rows [z; x; B; C; dt] in the same
 *   order on both sides (torch_dist stores them as five keys `mixer.in_proj.weight.{z,x,B,C,dt}`);
 *   `conv1d` weight [C, 1, K] / bias [C] with C = x + B + C rows (keys `.x .B .C`); `A_log`, `D`,
 *   `dt_bias` [heads]; the gated group RMSNorm `mixer.norm.weight`; `out_proj`;
 * - `*`: `norm` → `self_attention.linear_qkv.layer_norm_weight`, q/k/v → `linear_qkv`, o_proj;
 * - `-`: `norm` → `mlp.linear_fc1.layer_norm_weight`; squared-ReLU MLP, not gated: up_proj →
 *   `linear_fc1` as is, down_proj → `linear_fc2`;
 * - `E`: `norm` → `pre_mlp_layernorm`; `gate.weight` → `router.weight`,
 *   `gate.e_score_correction_bias` → `router.expert_bias`; experts and the shared expert not gated;
 * - `backbone.embeddings` → word embeddings, `backbone.norm_f` → `decoder.final_norm` (MambaStack's
 *   name, not `final_layernorm`), `lm_head` → `output_layer`.
 */
import { badInput, unsupported } from '../util/errors.js';
import { PyFloat } from '../pickle/values.js';
import { fromHfConfig, num, type HybridConfig, type ModelConfig } from './config.js';
import { attentionParams, moeArgs, moeParams } from './dense.js';
import type { Family, GlobalParam, LayerParam, SplitParam } from './spec.js';

const B = 'backbone.layers.{i}';
const NORM = `${B}.norm.weight`;

/** transformers 5 `layers_block_type` names (and the older hub ones) → pattern chars. */
const BLOCK_TYPES: Record<string, string> = { mamba: 'M', linear_attention: 'M', attention: '*', full_attention: '*', mlp: '-', moe: 'E' };
const KINDS: Record<string, string> = { M: 'Mamba-2', '*': 'attention', '-': 'MLP', E: 'MoE' };

/** The layer pattern of an HF config, every char checked. */
export function hybridPattern(cfg: Record<string, unknown>, file: string): string {
  let pattern: string;
  if (typeof cfg.hybrid_override_pattern === 'string') pattern = cfg.hybrid_override_pattern;
  else if (Array.isArray(cfg.layers_block_type)) {
    pattern = (cfg.layers_block_type as unknown[])
      .map((t, i) => {
        const ch = typeof t === 'string' ? BLOCK_TYPES[t] : undefined;
        if (!ch) throw badInput(`${file}: layers_block_type[${i}] is ${JSON.stringify(t)}, an unknown layer type (expected one of ${Object.keys(BLOCK_TYPES).join(', ')})`, file);
        return ch;
      })
      .join('');
  } else throw badInput(`${file}: a Nemotron-H config needs hybrid_override_pattern (or layers_block_type)`, file);
  if (pattern.length === 0) throw badInput(`${file}: hybrid_override_pattern is empty`, file);
  for (let i = 0; i < pattern.length; i++) {
    const ch = pattern[i]!;
    if (!KINDS[ch]) {
      throw badInput(`${file}: hybrid_override_pattern ${JSON.stringify(pattern)} has an unknown layer type ${JSON.stringify(ch)} at layer ${i} (expected M = Mamba, * = attention, - = MLP, E = MoE)`, file);
    }
  }
  return pattern;
}

function mamba(c: ModelConfig): HybridConfig['mamba'] {
  return c.hybrid!.mamba;
}

/** Rows of in_proj's blocks z, x, B, C, dt and conv1d's x, B, C. */
function mambaRows(c: ModelConfig): { di: number; bc: number; nh: number } {
  const m = mamba(c);
  return { di: m.numHeads * m.headDim, bc: m.numGroups * m.stateDim, nh: m.numHeads };
}

function mambaParams(c: ModelConfig): LayerParam[] {
  const H = c.hiddenSize;
  const m = mamba(c);
  const { di, bc, nh } = mambaRows(c);
  const conv = di + 2 * bc;
  const X = `${B}.mixer`;
  const copy = (megatron: string, hf: string, shape: number[], aliases?: string[]): LayerParam => ({ megatron, hf: [hf], kind: 'copy', hfShapes: [shape], shape, ...(aliases ? { aliases } : {}) });
  return [
    copy('mixer.in_proj.layer_norm_weight', NORM, [H], ['norm.weight']),
    copy('mixer.in_proj.weight', `${X}.in_proj.weight`, [2 * di + 2 * bc + nh, H]),
    copy('mixer.conv1d.weight', `${X}.conv1d.weight`, [conv, 1, m.convKernel]),
    ...(m.convBias ? [copy('mixer.conv1d.bias', `${X}.conv1d.bias`, [conv])] : []),
    copy('mixer.A_log', `${X}.A_log`, [nh]),
    copy('mixer.D', `${X}.D`, [nh]),
    copy('mixer.dt_bias', `${X}.dt_bias`, [nh]),
    copy('mixer.norm.weight', `${X}.norm.weight`, [di]),
    copy('mixer.out_proj.weight', `${X}.out_proj.weight`, [H, di]),
  ];
}

function mlpParams(c: ModelConfig): LayerParam[] {
  const H = c.hiddenSize;
  const F = c.ffnHiddenSize;
  return [
    { megatron: 'mlp.linear_fc1.layer_norm_weight', hf: [NORM], kind: 'copy', hfShapes: [[H]], shape: [H], aliases: ['pre_mlp_layernorm.weight'] },
    { megatron: 'mlp.linear_fc1.weight', hf: [`${B}.mixer.up_proj.weight`], kind: 'copy', hfShapes: [[F, H]], shape: [F, H] },
    { megatron: 'mlp.linear_fc2.weight', hf: [`${B}.mixer.down_proj.weight`], kind: 'copy', hfShapes: [[H, F]], shape: [H, F] },
  ];
}

function layerChar(c: ModelConfig, i: number): string {
  return c.hybrid!.pattern[i]!;
}

export const nemotronH: Family = {
  id: 'nemotron_h',
  architectures: ['NemotronHForCausalLM'],
  modelType: 'nemotron_h',
  description: 'Nemotron-H hybrid Mamba-2 / attention / MoE (Nemotron 3 Nano 30B-A3B, Nemotron-H, Nano 2)',
  keying: () => 'per-layer',
  fromHf(cfg, file): ModelConfig {
    const pattern = hybridPattern(cfg, file);
    if (typeof cfg.num_hidden_layers === 'number' && cfg.num_hidden_layers !== pattern.length) {
      throw badInput(`${file}: num_hidden_layers (${cfg.num_hidden_layers}) differs from the ${pattern.length} layers of hybrid_override_pattern ${JSON.stringify(pattern)}`, file);
    }
    if (typeof cfg.num_nextn_predict_layers === 'number' && cfg.num_nextn_predict_layers > 0) {
      throw unsupported(`${file}: multi-token prediction layers (num_nextn_predict_layers ${cfg.num_nextn_predict_layers}) are not supported yet`, file);
    }
    if (cfg.moe_latent_size !== undefined && cfg.moe_latent_size !== null) throw unsupported(`${file}: moe_latent_size (latent MoE projections) is not supported yet`, file);
    if (cfg.mamba_proj_bias === true || cfg.use_bias === true) throw unsupported(`${file}: Mamba projection biases (mamba_proj_bias / use_bias) are not supported (megatron-core's MambaMixer has none)`, file);
    const base = fromHfConfig(
      'nemotron_h',
      { ...cfg, num_hidden_layers: pattern.length, intermediate_size: cfg.intermediate_size ?? 1, tie_word_embeddings: cfg.tie_word_embeddings === true },
      file,
      { qkvBias: false, qkNorm: false },
    );
    const alt = (k: string, old: string): string => (cfg[k] === undefined && cfg[old] !== undefined ? old : k);
    const m = {
      numHeads: num(cfg, 'mamba_num_heads', file),
      headDim: num(cfg, 'mamba_head_dim', file),
      numGroups: num(cfg, alt('n_groups', 'mamba_n_groups'), file, 8),
      stateDim: num(cfg, 'ssm_state_size', file, 128),
      convKernel: num(cfg, alt('conv_kernel', 'mamba_d_conv'), file, 4),
      convBias: (cfg.use_conv_bias ?? cfg.mamba_conv_bias ?? true) === true,
    };
    if (pattern.includes('M') && m.numHeads % m.numGroups !== 0) {
      throw badInput(`${file}: mamba_num_heads (${m.numHeads}) is not a multiple of n_groups (${m.numGroups})`, file);
    }
    const c: ModelConfig = { ...base, hybrid: { pattern, mamba: m } };
    if (!pattern.includes('E')) return c;
    const numExperts = num(cfg, cfg.n_routed_experts === undefined ? 'num_local_experts' : 'n_routed_experts', file);
    const topK = num(cfg, 'num_experts_per_tok', file, 2);
    if (topK > numExperts) throw badInput(`${file}: num_experts_per_tok (${topK}) exceeds the ${numExperts} experts`, file);
    const shared = cfg.n_shared_experts === 0 ? undefined : num(cfg, 'moe_shared_expert_intermediate_size', file);
    return {
      ...c,
      moe: {
        numExperts,
        topK,
        ffnHiddenSize: num(cfg, 'moe_intermediate_size', file),
        ...(shared ? { sharedExpertFfn: shared } : {}),
        routerBias: true,
        moeLayers: [...pattern].map((ch) => ch === 'E'),
      },
    };
  },
  globalParams(c): GlobalParam[] {
    const g: GlobalParam[] = [
      { megatron: 'embedding.word_embeddings.weight', hf: 'backbone.embeddings.weight', kind: 'vocab', shape: [c.vocabSize, c.hiddenSize] },
      { megatron: 'decoder.final_norm.weight', hf: 'backbone.norm_f.weight', kind: 'copy', shape: [c.hiddenSize] },
    ];
    if (!c.tieEmbeddings) g.push({ megatron: 'output_layer.weight', hf: 'lm_head.weight', kind: 'vocab', shape: [c.vocabSize, c.hiddenSize] });
    return g;
  },
  layerParams(c, i): LayerParam[] {
    switch (layerChar(c, i)) {
      case 'M':
        return mambaParams(c);
      case '*':
        return attentionParams(c, `${B}.mixer`, NORM);
      case '-':
        return mlpParams(c);
      default:
        return moeParams(c, {
          norm: NORM,
          router: `${B}.mixer.gate.weight`,
          routerBias: `${B}.mixer.gate.e_score_correction_bias`,
          // NemotronHPreTrainedModel._keep_in_fp32_modules_strict = ['e_score_correction_bias', 'gate.weight'].
          routerFp32: true,
          up: `${B}.mixer.experts.{e}.up_proj.weight`,
          down: `${B}.mixer.experts.{e}.down_proj.weight`,
          shared: { up: `${B}.mixer.shared_experts.up_proj.weight`, down: `${B}.mixer.shared_experts.down_proj.weight` },
        });
    }
  },
  extraStateModules(c, i): string[] {
    switch (layerChar(c, i)) {
      case 'M':
        return ['mixer.in_proj', 'mixer.out_proj'];
      case '*':
        return ['self_attention.linear_qkv', 'self_attention.linear_proj'];
      case '-':
        return ['mlp.linear_fc1', 'mlp.linear_fc2'];
      default: {
        const out: string[] = [];
        for (let e = 0; e < c.moe!.numExperts; e++) out.push(`mlp.experts.local_experts.${e}.linear_fc1`, `mlp.experts.local_experts.${e}.linear_fc2`);
        if (c.moe!.sharedExpertFfn) out.push('mlp.shared_experts.linear_fc1', 'mlp.shared_experts.linear_fc2');
        return out;
      }
    }
  },
  // MambaModel keeps output_layer._extra_state in its sharded_state_dict (tied or not); GPTModel pops it.
  globalExtraStateModules: () => ['output_layer'],
  splitKeys(c, i): SplitParam[] {
    if (layerChar(c, i) !== 'M') return [];
    const { di, bc, nh } = mambaRows(c);
    const xbc = [
      { suffix: 'x', rows: di },
      { suffix: 'B', rows: bc },
      { suffix: 'C', rows: bc },
    ];
    return [
      { param: 'mixer.in_proj.weight', parts: [{ suffix: 'z', rows: di }, ...xbc, { suffix: 'dt', rows: nh }] },
      { param: 'mixer.conv1d.weight', parts: xbc },
      ...(mamba(c).convBias ? [{ param: 'mixer.conv1d.bias', parts: xbc }] : []),
    ];
  },
  megatronArgs(c) {
    const hf = c.hf ?? {};
    const m = mamba(c);
    return {
      ...moeArgs(c),
      is_hybrid_model: true,
      hybrid_override_pattern: c.hybrid!.pattern,
      mamba_num_heads: m.numHeads,
      mamba_head_dim: m.headDim,
      mamba_num_groups: m.numGroups,
      mamba_state_dim: m.stateDim,
      swiglu: false,
      squared_relu: true,
      position_embedding_type: 'none',
      norm_epsilon: new PyFloat(typeof hf.layer_norm_epsilon === 'number' ? hf.layer_norm_epsilon : 1e-5),
      ...(c.moe ? { moe_router_score_function: 'sigmoid', moe_router_load_balancing_type: 'seq_aux_loss', moe_router_topk_scaling_factor: new PyFloat(typeof hf.routed_scaling_factor === 'number' ? hf.routed_scaling_factor : 1) } : {}),
    };
  },
};
