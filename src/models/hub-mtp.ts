/**
 * Multi-token prediction as DeepSeek-V3's hub checkpoints lay it out, which GLM-4.5 / 4.6 / 4.7
 * copy: MTP layer k is HF layer `num_hidden_layers + k` — a full decoder layer (named like the
 * decoder's) plus `enorm`, `hnorm`, `eh_proj` and `shared_head.norm`, and the hub's own copies of
 * the main embedding (`embed_tokens`) and head (`shared_head.head`). megatron-core's MTP block
 * (`mtp.layers.<k>.enorm` / `hnorm` / `eh_proj` / `final_layernorm` / `transformer_layer.*`)
 * shares the model's embedding and output layer, so the copies are compared with the originals on
 * import and written back from them on export (`GlobalParam.hfCopies`).
 *
 * Shared by the families with this layout (Megatron-Bridge maps both the same way:
 * `models/deepseek/common.py`, `models/glm/glm45_bridge.py`); the decoder layer inside is the
 * family's own.
 */
import { badInput } from '../util/errors.js';
import type { HfLayout, ModelConfig } from './config.js';
import type { Block, GlobalParam, LayerParam } from './spec.js';

/** HF name prefix of MTP layer k: the layers after the decoder's. */
export const hubMtpPrefix = (c: ModelConfig, k: number): string => `model.layers.${c.numLayers + k}`;

/**
 * megatron-core's MTP block over the hub's MTP layers: `layer(P)` gives the decoder layer's
 * parameters at HF prefix P (an MoE layer like the decoder's last), `layerExtraState` its
 * linears with `_extra_state`.
 */
export function hubMtpBlock(c: ModelConfig, layer: (P: string) => readonly LayerParam[], layerExtraState: readonly string[]): Block {
  const H = c.hiddenSize;
  const norm = (megatron: string, hf: string): LayerParam => ({ megatron, hf: [hf], kind: 'copy', hfShapes: [[H]], shape: [H] });
  const inLayer = (p: LayerParam): LayerParam => ({ ...p, megatron: `transformer_layer.${p.megatron}`, ...(p.aliases ? { aliases: p.aliases.map((a) => `transformer_layer.${a}`) } : {}) });
  return {
    prefix: 'mtp.layers.',
    layers: c.mtpLayers ?? 0,
    keying: 'per-layer',
    params: (k) => {
      const P = hubMtpPrefix(c, k);
      return [
        norm('enorm.weight', `${P}.enorm.weight`),
        norm('hnorm.weight', `${P}.hnorm.weight`),
        // [embedding; hidden] on both sides: megatron-core concatenates (enorm(emb), hnorm(h)) as DeepSeek does.
        { megatron: 'eh_proj.weight', hf: [`${P}.eh_proj.weight`], kind: 'copy', hfShapes: [[H, 2 * H]], shape: [H, 2 * H] },
        ...layer(P).map(inLayer),
        norm('final_layernorm.weight', `${P}.shared_head.norm.weight`),
      ];
    },
    extraStateModules: () => ['eh_proj', ...layerExtraState.map((m) => `transformer_layer.${m}`)],
  };
}

/** The global parameters with the MTP layers' embedding / head copies attached (unless the checkpoint has none: `hfLayout.mtpCopies`). */
export function withHubMtpCopies(c: ModelConfig, globals: readonly GlobalParam[]): GlobalParam[] {
  if (c.hfLayout?.mtpCopies === false) return [...globals];
  const copies = (hf: string): string[] => Array.from({ length: c.mtpLayers ?? 0 }, (_, k) => `${hubMtpPrefix(c, k)}.${hf}`);
  return globals.map((g) =>
    g.megatron === 'embedding.word_embeddings.weight' ? { ...g, hfCopies: copies('embed_tokens.weight') } : g.megatron === 'output_layer.weight' ? { ...g, hfCopies: copies('shared_head.head.weight') } : g,
  );
}

/**
 * The HF layout facts of a checkpoint in this layout: fused experts (`mlp.experts.gate_up_proj`) in
 * the decoder and in the MTP layers, and whether the MTP layers carry the embedding / head copies.
 */
export function hubMtpLayout(c: ModelConfig, names: readonly string[]): HfLayout {
  const layout: { -readonly [K in keyof HfLayout]: HfLayout[K] } = { ...c.hfLayout };
  const fusedAt = names.map((n) => /^model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$/.exec(n)?.[1]).filter((x): x is string => x !== undefined).map(Number);
  if (fusedAt.some((i) => i < c.numLayers)) layout.experts = 'fused';
  if (fusedAt.some((i) => i >= c.numLayers)) layout.mtpExperts = 'fused';
  if (!hubMtpCopiesHeld(c, names)) layout.mtpCopies = false;
  return layout;
}

/** The MTP layers an HF checkpoint holds: any `model.layers.<n>.` with n ≥ num_hidden_layers. */
function heldMtpLayers(c: ModelConfig, names: readonly string[]): number[] {
  const ks = new Set<number>();
  for (const n of names) {
    const m = /^model\.layers\.(\d+)\./.exec(n);
    if (m && Number(m[1]) >= c.numLayers) ks.add(Number(m[1]) - c.numLayers);
  }
  return [...ks].sort((a, b) => a - b);
}

/**
 * How many MTP layers to map, from the config's `num_nextn_predict_layers` (`c.mtpLayers`) and
 * the layers the checkpoint holds: none when it holds none (transformers builds no MTP layer, so
 * a checkpoint it saved has none whatever the config says); with `dropMtp` the layers held (all
 * left out); otherwise the two must agree — a disagreement is an error, never a silent drop.
 */
export function hubMtpLayerCount(c: ModelConfig, names: readonly string[], dropMtp: boolean | undefined): number {
  const held = heldMtpLayers(c, names);
  const want = c.mtpLayers ?? 0;
  if (held.length === 0) return 0;
  if (dropMtp) return held[held.length - 1]! + 1;
  if (held.length !== want || held[held.length - 1] !== want - 1) {
    throw badInput(
      `config.json: num_nextn_predict_layers is ${want}, but the checkpoint holds MTP layer tensors at model.layers.${held.map((k) => c.numLayers + k).join(', ')} (num_hidden_layers ${c.numLayers}); the two must agree`,
      'config.json',
    );
  }
  return want;
}

/** Whether the checkpoint's MTP layers carry the embedding / head copies (false only when it holds MTP layers without them). */
export function hubMtpCopiesHeld(c: ModelConfig, names: readonly string[]): boolean {
  if (!names.some((n) => n.startsWith(`${hubMtpPrefix(c, 0)}.`))) return true;
  const has = new Set(names);
  return has.has(`${hubMtpPrefix(c, 0)}.embed_tokens.weight`) || has.has(`${hubMtpPrefix(c, 0)}.shared_head.head.weight`);
}

/** The HF names of the MTP layers (what `--drop-mtp` leaves out). */
export function hubMtpNames(c: ModelConfig): RegExp {
  return new RegExp(`^model\\.layers\\.(${Array.from({ length: Math.max(1, c.mtpLayers ?? 0) }, (_, k) => c.numLayers + k).join('|')})\\.`);
}

/** `num_nextn_predict_layers` from an HF config (0 when absent). */
export function mtpLayersOf(cfg: Record<string, unknown>, file: string): number {
  const mtp = cfg.num_nextn_predict_layers ?? 0;
  if (typeof mtp !== 'number' || !Number.isInteger(mtp) || mtp < 0) throw badInput(`${file}: num_nextn_predict_layers is ${JSON.stringify(mtp)}, expected a whole number`, file);
  return mtp;
}
