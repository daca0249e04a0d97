/**
 * Small synthetic HF checkpoints for pure-TypeScript tests: a config.json and a model.safetensors
 * of deterministic pseudo-random F32 values (no Python needed). The safetensors file is written
 * by hand (8-byte header length, JSON header, data) so the tests do not depend on the writer they test.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export interface SyntheticTensor {
  readonly name: string;
  readonly shape: readonly number[];
}

/** Writes `tensors` as F32 with values from a seeded xorshift generator. */
export async function writeF32Safetensors(path: string, tensors: readonly SyntheticTensor[], seed = 1): Promise<void> {
  let x = seed >>> 0 || 1;
  const header: Record<string, unknown> = {};
  let offset = 0;
  const datas: Buffer[] = [];
  for (const t of [...tensors].sort((a, b) => (a.name < b.name ? -1 : 1))) {
    const n = t.shape.reduce((a, b) => a * b, 1);
    const buf = Buffer.alloc(n * 4);
    for (let i = 0; i < n; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      buf.writeFloatLE(((x >>> 0) / 2 ** 32 - 0.5) * 0.2, i * 4);
    }
    header[t.name] = { dtype: 'F32', shape: t.shape, data_offsets: [offset, offset + buf.length] };
    offset += buf.length;
    datas.push(buf);
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  await writeFile(path, Buffer.concat([len, Buffer.from(json), ...datas]));
}

export interface MoeShape {
  readonly layers: number;
  readonly hidden: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly experts: number;
  readonly topK: number;
  readonly expertFfn: number;
  readonly vocab: number;
}

export const TINY_MOE: MoeShape = { layers: 3, hidden: 32, heads: 4, kvHeads: 2, headDim: 8, experts: 8, topK: 2, expertFfn: 16, vocab: 50 };

/** A tiny Mixtral or Qwen3-MoE HF directory (per-expert tensors, as save_pretrained writes them). */
export async function writeSyntheticMoe(
  dir: string,
  family: 'mixtral' | 'qwen3_moe',
  s: MoeShape = TINY_MOE,
  configEdit?: (c: Record<string, unknown>) => void,
  /** Qwen3-MoE layers written as dense MLPs (intermediate 2 × expertFfn); list them in mlp_only_layers. */
  denseLayers: readonly number[] = [],
): Promise<void> {
  await mkdir(dir, { recursive: true });
  const H = s.hidden;
  const q = s.heads * s.headDim;
  const kv = s.kvHeads * s.headDim;
  const t: SyntheticTensor[] = [
    { name: 'model.embed_tokens.weight', shape: [s.vocab, H] },
    { name: 'model.norm.weight', shape: [H] },
    { name: 'lm_head.weight', shape: [s.vocab, H] },
  ];
  const moe = family === 'mixtral' ? 'block_sparse_moe' : 'mlp';
  const [g, u, d] = family === 'mixtral' ? ['w1', 'w3', 'w2'] : ['gate_proj', 'up_proj', 'down_proj'];
  for (let i = 0; i < s.layers; i++) {
    const L = `model.layers.${i}`;
    t.push(
      { name: `${L}.input_layernorm.weight`, shape: [H] },
      { name: `${L}.post_attention_layernorm.weight`, shape: [H] },
      { name: `${L}.self_attn.q_proj.weight`, shape: [q, H] },
      { name: `${L}.self_attn.k_proj.weight`, shape: [kv, H] },
      { name: `${L}.self_attn.v_proj.weight`, shape: [kv, H] },
      { name: `${L}.self_attn.o_proj.weight`, shape: [H, q] },
      { name: `${L}.${moe}.gate.weight`, shape: [s.experts, H] },
    );
    if (family === 'qwen3_moe') t.push({ name: `${L}.self_attn.q_norm.weight`, shape: [s.headDim] }, { name: `${L}.self_attn.k_norm.weight`, shape: [s.headDim] });
    if (denseLayers.includes(i)) {
      const F = 2 * s.expertFfn;
      t.splice(t.findIndex((x) => x.name === `${L}.${moe}.gate.weight`), 1); // no router
      t.push({ name: `${L}.mlp.gate_proj.weight`, shape: [F, H] }, { name: `${L}.mlp.up_proj.weight`, shape: [F, H] }, { name: `${L}.mlp.down_proj.weight`, shape: [H, F] });
      continue;
    }
    for (let e = 0; e < s.experts; e++) {
      t.push(
        { name: `${L}.${moe}.experts.${e}.${g}.weight`, shape: [s.expertFfn, H] },
        { name: `${L}.${moe}.experts.${e}.${u}.weight`, shape: [s.expertFfn, H] },
        { name: `${L}.${moe}.experts.${e}.${d}.weight`, shape: [H, s.expertFfn] },
      );
    }
  }
  await writeF32Safetensors(join(dir, 'model.safetensors'), t);
  const cfg: Record<string, unknown> = {
    architectures: [family === 'mixtral' ? 'MixtralForCausalLM' : 'Qwen3MoeForCausalLM'],
    model_type: family,
    hidden_size: H,
    num_hidden_layers: s.layers,
    num_attention_heads: s.heads,
    num_key_value_heads: s.kvHeads,
    head_dim: s.headDim,
    vocab_size: s.vocab,
    tie_word_embeddings: false,
    num_experts_per_tok: s.topK,
    rms_norm_eps: 1e-6,
    torch_dtype: 'float32',
    ...(family === 'mixtral'
      ? { num_local_experts: s.experts, intermediate_size: s.expertFfn }
      : { num_experts: s.experts, moe_intermediate_size: s.expertFfn, intermediate_size: 2 * s.expertFfn, decoder_sparse_step: 1, mlp_only_layers: [], norm_topk_prob: true }),
  };
  configEdit?.(cfg);
  await writeFile(join(dir, 'config.json'), JSON.stringify(cfg, null, 2));
}
