"""transformers 5.24 and megatron-core 0.16.1 (CPU, gloo) as oracles for Gemma 2 (Gemma2ForCausalLM)
and Gemma 3 text (Gemma3ForCausalLM).

  make <hf_dir> [--gemma3]
      a tiny random Gemma2ForCausalLM (eager attention: the soft-capping path) saved with
      save_pretrained: random zero-centred norms (all four per layer), soft-capping small enough to
      bite (attention 5, final 3), a 4-token sliding window on layers 0 and 2, query_pre_attn_scalar 24;
      --gemma3: a Gemma3ForCausalLM of 6 layers (5 sliding + 1 global), random zero-centred q/k
      norms, local RoPE base 10000 and global 1e6 with linear scaling 8 on the global layer
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel built as Megatron-Bridge's Gemma 2 provider builds it (gemma2_layer_spec,
      below) loads the torch_dist checkpoint strictly under the TE names (the layer's sharded-state
      keys map, as megatron-core's own local spec maps its norms); logits vs transformers' (JSON)
  save <run_dir> [--tp N] [--gemma3]
      megatron-core saves that model under TP=N, with its logits and an equivalent HF config (hf_ref/)
  check_hf <hf_dir> <run_dir>
      from_pretrained(hf_dir) loads with no missing / unexpected keys; logits vs megatron-core's (JSON)
  make_vl <hf_dir> [--native-names]
      a tiny random Gemma3ForConditionalGeneration (the Gemma 3 text model above, a SigLIP tower of 2
      layers without pooling head, the projector) saved with save_pretrained (which writes the
      language model as `language_model.model.*`, the tower flattened as `vision_tower.*`); the hub's
      `vision_tower.vision_model.*` by default, --native-names for transformers 5's in-memory names
      (`model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`)
  load_vl <iter_dir> <hf_dir>
      the Gemma 3 text model loads the checkpoint's `language_model.*` keys strictly (nothing else
      missing or unexpected); logits vs transformers' on text tokens; the tower's and projector's
      torch_dist tensors vs Megatron-Bridge's Gemma 3 VL mapping (`vision_tower.**` replicated,
      `mm_soft_emb_norm` → `mm_soft_embed_norm`, `mm_input_projection_weight` transposed → `proj`) (JSON)
  compare_vl <hf_a> <hf_b>
      both load cleanly in transformers with the same logits (JSON)

Megatron-Bridge's Gemma 2 modules need TransformerEngine for their linears and norms; on CPU the
oracle builds the same module tree from megatron-core's local parts: Gemma2DotProductAttention
(Megatron-Bridge's gemma2_provider.py at NVIDIA-NeMo/Megatron-Bridge 067f987d, copied — the
unfused path, its SWA mask made on the CPU), a RowParallelLinear with the `post_layernorm` of
TERowParallelLinearLayerNorm (common/te_layers.py), Gemma2OutputLayer's final soft-capping and
EmbeddingScalingMixin's √hidden (gemma/modules.py), and — in place of TENorm with
layernorm_zero_centered_gamma — an RMSNorm computing x̂ · (1 + w) in float32 (TENorm's formula).
Gemma 3 adds Gemma3SelfAttention (the local / global RoPE switch) and Gemma3RotaryEmbedding
(gemma3_provider.py, copied) and uses the same core attention with Gemma3TEDotProductAttention's
window rule (5 : 1) and no soft-capping.
"""
import json
import math
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import TOKENS, forward, init  # noqa: E402

V = 100
KW = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
          head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
          final_logit_softcapping=3.0, sliding_window=4, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
COMMON = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}


KW3 = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=4,
           hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, attn_logit_softcapping=None, final_logit_softcapping=None)


def hf_config(gemma3=False):
    from transformers import AutoConfig
    if gemma3:
        return AutoConfig.for_model(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], dtype="float32",
                                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}, **KW3)
    return AutoConfig.for_model(model_type="gemma2", architectures=["Gemma2ForCausalLM"], dtype="float32",
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **KW)


def is_gemma3(h):
    return h.model_type == "gemma3_text"


def cmd_make(hf_dir, gemma3=False):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(7)
    m = AutoModelForCausalLM.from_config(hf_config(gemma3), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5)  # zero-centred: the effective scale is 1 + w
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 * 2)
    m.save_pretrained(hf_dir)
    return {"ok": True}


def hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM
    m, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    with torch.no_grad():
        return m.eval()(TOKENS).logits, info


# ---------------------------------------------------------------------------------------------------
# Megatron-Bridge's Gemma 2 model on megatron-core's local parts (see the module docstring)


class ZeroCenteredRMSNorm(torch.nn.Module):
    """TENorm(RMSNorm, zero_centered_gamma=True): x̂ · (1 + w), in float32."""

    def __init__(self, config, hidden_size, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def row_linear_layernorm():
    from megatron.core.tensor_parallel import RowParallelLinear

    class RowParallelLinearLayerNorm(RowParallelLinear):
        """TERowParallelLinearLayerNorm: a row-parallel linear with a post-norm on its output."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.post_layernorm = ZeroCenteredRMSNorm(config, output_size, config.layernorm_epsilon)

        def forward(self, x):
            out, bias = super().forward(x)
            assert bias is None
            return self.post_layernorm(out), bias

    return RowParallelLinearLayerNorm


def logit_softcapping(logits, scale):
    if not scale:
        return logits
    return scale * torch.tanh(logits / scale)


def get_swa(seq_q, seq_kv, window_size):
    m = torch.ones(seq_q, seq_kv, dtype=torch.bool)  # Megatron-Bridge makes it on CUDA
    mu = torch.triu(m, diagonal=seq_kv - seq_q - window_size[0])
    ml = torch.tril(mu, diagonal=seq_kv - seq_q + window_size[1])
    return ~ml


def _is_local_attn_layer(layer_number, layer_pattern):
    """Megatron-Bridge gemma3_provider.py: layer_number (1-based) is local unless it ends a (local, global) period."""
    pattern_size = sum(layer_pattern)
    return layer_number % pattern_size != 0


def gemma3_self_attention():
    from megatron.core.transformer.attention import SelfAttention

    class Gemma3SelfAttention(SelfAttention):
        """Megatron-Bridge's: the local rope for local layers, the global one for global layers."""

        def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None, rotary_pos_emb=None,
                    rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None,
                    sequence_len_offset=None, *, inference_params=None):
            assert isinstance(rotary_pos_emb, torch.Tensor) and rotary_pos_emb.size(0) == 2
            emb = rotary_pos_emb[0] if _is_local_attn_layer(self.layer_number, self.config.interleaved_attn_pattern) else rotary_pos_emb[1]
            return super().forward(hidden_states=hidden_states, attention_mask=attention_mask, key_value_states=key_value_states,
                                   inference_context=inference_context, rotary_pos_emb=emb, rotary_pos_cos=rotary_pos_cos,
                                   rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias, packed_seq_params=packed_seq_params,
                                   sequence_len_offset=sequence_len_offset, inference_params=inference_params)

    return Gemma3SelfAttention


def gemma3_rotary(kv_channels, rotary_base, rotary_base_local, factor):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class Gemma3RotaryEmbedding(RotaryEmbedding):
        """Megatron-Bridge's: the global rope with linear scaling (inv_freq / factor) and a local one."""

        def __init__(self):
            super().__init__(kv_channels=kv_channels, rotary_percent=1.0, rotary_base=rotary_base, rope_scaling=False)
            self.inv_freq /= factor
            self.rope_local = RotaryEmbedding(kv_channels=kv_channels, rotary_percent=1.0, rotary_base=rotary_base_local, rope_scaling=False)

        def forward(self, max_seq_len, offset=0, packed_seq=False, cp_group=None):
            return torch.stack([self.rope_local.forward(max_seq_len, offset, packed_seq), super().forward(max_seq_len, offset, packed_seq)], dim=0)

    return Gemma3RotaryEmbedding()


def gemma2_core_attention():
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import attention_mask_func
    from megatron.core.utils import divide

    class Gemma2DotProductAttention(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None, **kwargs):
            super().__init__(config=config)
            self.config = config
            self.layer_number = max(1, layer_number)
            if getattr(config, "interleaved_attn_pattern", None):  # Gemma 3: Gemma3TEDotProductAttention's rule
                self.window_size = (config.gemma3_window - 1, 0) if _is_local_attn_layer(self.layer_number, config.interleaved_attn_pattern) else None
            else:
                self.window_size = config.window_size if self.layer_number % 2 == 1 else None
            self.attn_mask_type = AttnMaskType.arbitrary if self.window_size is not None else attn_mask_type
            projection_size = config.kv_channels * config.num_attention_heads
            world_size = config.tensor_model_parallel_size
            self.hidden_size_per_partition = divide(projection_size, world_size)
            self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
            self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
            self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
            self.norm_factor = math.sqrt(config.query_pre_attn_scalar)
            self.scale_mask_softmax = FusedScaleMaskSoftmax(
                input_in_fp16=config.fp16, input_in_bf16=config.bf16, attn_mask_type=self.attn_mask_type,
                scaled_masked_softmax_fusion=False, mask_func=attention_mask_func,
                softmax_in_fp32=config.attention_softmax_in_fp32, scale=None,
            )
            self.attention_dropout = torch.nn.Dropout(config.attention_dropout if attention_dropout is None else attention_dropout)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **kwargs):
            if self.num_attention_heads_per_partition // self.num_query_groups_per_partition > 1:
                rep = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
                key = key.repeat_interleave(rep, dim=2)
                value = value.repeat_interleave(rep, dim=2)
            output_size = (query.size(1), query.size(2), query.size(0), key.size(0))
            query = query.reshape(output_size[2], output_size[0] * output_size[1], -1)
            key = key.view(output_size[3], output_size[0] * output_size[1], -1)
            buf = parallel_state.get_global_memory_buffer().get_tensor((output_size[0] * output_size[1], output_size[2], output_size[3]), query.dtype, "mpu")
            scores = torch.baddbmm(buf, query.transpose(0, 1), key.transpose(0, 1).transpose(1, 2), beta=0.0, alpha=(1.0 / self.norm_factor))
            scores = logit_softcapping(scores, self.config.attn_logit_softcapping)
            attention_scores = scores.view(*output_size)
            if self.window_size is not None:
                swa = get_swa(query.size(0), key.size(0), self.window_size)
                attention_mask = swa.unsqueeze(0).unsqueeze(0) if attention_mask is None else swa | attention_mask
            probs = self.scale_mask_softmax(attention_scores, attention_mask)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = self.attention_dropout(probs)
            output_size = (value.size(1), value.size(2), query.size(0), value.size(3))
            value = value.view(value.size(0), output_size[0] * output_size[1], -1)
            probs = probs.view(output_size[0] * output_size[1], output_size[2], -1)
            context = torch.bmm(probs, value.transpose(0, 1)).view(*output_size)
            context = context.permute(2, 0, 1, 3).contiguous()
            return context.view(*context.size()[:-2], self.hidden_size_per_partition)

    return Gemma2DotProductAttention


def gemma2_layer_spec(gemma3=False):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import ModuleSpec, TransformerLayer, TransformerLayerSubmodules
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    row_ln = row_linear_layernorm()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=ZeroCenteredRMSNorm,
            self_attention=ModuleSpec(module=gemma3_self_attention() if gemma3 else SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=gemma2_core_attention(), linear_proj=row_ln,
                                                                         **(dict(q_layernorm=ZeroCenteredRMSNorm, k_layernorm=ZeroCenteredRMSNorm) if gemma3 else {}))),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=ZeroCenteredRMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=row_ln)),
            mlp_bda=get_bias_dropout_add,
            # TE fuses these two norms into the linears that follow them: the checkpoint's names.
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_", "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


def build(h, padded_vocab):
    from megatron.core import parallel_state as ps
    from megatron.core.activations import fast_gelu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    g3 = is_gemma3(h)
    cfg = TransformerConfig(
        num_layers=h.num_hidden_layers, hidden_size=h.hidden_size, num_attention_heads=h.num_attention_heads, qk_layernorm=g3,
        num_query_groups=h.num_key_value_heads, ffn_hidden_size=h.intermediate_size, kv_channels=h.head_dim,
        gated_linear_unit=True, activation_func=fast_gelu, normalization="RMSNorm", layernorm_epsilon=h.rms_norm_eps,
        layernorm_zero_centered_gamma=True, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, masked_softmax_fusion=False,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(), pipeline_dtype=torch.float32,
        window_size=None if g3 else (h.sliding_window - 1, 0),
    )
    # Gemma2ModelProvider's own fields (TransformerConfig has none of them)
    cfg.query_pre_attn_scalar = h.query_pre_attn_scalar
    cfg.attn_logit_softcapping = h.attn_logit_softcapping
    cfg.final_logit_softcapping = h.final_logit_softcapping
    if g3:  # Gemma3ModelProvider's fields
        cfg.interleaved_attn_pattern = (5, 1)
        cfg.gemma3_window = h.sliding_window
    layer = gemma2_layer_spec(g3)
    block = TransformerBlockSubmodules(layer_specs=[layer] * h.num_hidden_layers, layer_norm=ZeroCenteredRMSNorm)
    model = GPTModel(config=cfg, transformer_layer_spec=block, vocab_size=padded_vocab, max_sequence_length=h.max_position_embeddings,
                     pre_process=True, post_process=True, parallel_output=False, share_embeddings_and_output_weights=True,
                     position_embedding_type="rope", rotary_base=(h.rope_parameters or {}).get("rope_theta", 10000.0))
    hidden = h.hidden_size
    if g3:
        rp = h.rope_parameters
        model.rotary_pos_emb = gemma3_rotary(h.head_dim, rp["full_attention"]["rope_theta"], rp["sliding_attention"]["rope_theta"],
                                             rp["full_attention"].get("factor", 1.0) if rp["full_attention"].get("rope_type") == "linear" else 1.0)

    class EmbeddingScalingMixin(torch.nn.Module):
        def forward(self, **kwargs):
            embeddings = super().forward(**kwargs)
            return embeddings * torch.tensor(hidden**0.5, dtype=embeddings.dtype)

    class Gemma2OutputLayer(torch.nn.Module):
        def forward(self, *args, **kwargs):
            output, bias = super().forward(*args, **kwargs)
            return logit_softcapping(output, cfg.final_logit_softcapping), bias

    for obj, mixin in ((model.embedding, EmbeddingScalingMixin), (model.output_layer, Gemma2OutputLayer)):
        base = obj.__class__
        obj.__class__ = type(base.__name__, (mixin, base), {})
    return model.eval()


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    h = AutoConfig.from_pretrained(hf_dir)
    init(0, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    model = build(h, meta["embedding.word_embeddings.weight"].global_shape[0])
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    model.load_state_dict({k: v for k, v in sd.items() if k not in COMMON}, strict=True)
    logits = forward(model)[..., :V]
    ref, _ = hf_logits(hf_dir)
    post = sorted(k for k in meta if "post_layernorm" in k)
    return {"max_abs_diff": (logits - ref).abs().max().item(), "max_abs": ref.abs().max().item(), "post_layernorm_keys": post}


def save_worker(rank, world, init_file, run_dir, tp, gemma3):
    from megatron.core import dist_checkpointing

    init(rank, world, tp, init_file)
    h = hf_config(gemma3)
    model = build(h, 128 * tp)
    shared = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn(p.shape, generator=shared) * 0.5)
            else:
                p.mul_(20.0)
    iter_dir = os.path.join(run_dir, "iter_0000002")
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    logits = forward(model)
    if rank == 0:
        torch.save(logits[..., :V], os.path.join(run_dir, "logits.pt"))
        with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
        h.save_pretrained(os.path.join(run_dir, "hf_ref"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, tp, gemma3):
    import torch.multiprocessing as mp
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(tp, tempfile.mktemp(), run_dir, tp, gemma3), nprocs=tp, join=True)
    return {"ok": True}


def cmd_check_hf(hf_dir, run_dir):
    ref = torch.load(os.path.join(run_dir, "logits.pt"))
    logits, info = hf_logits(hf_dir)
    return {"max_abs_diff": (logits - ref).abs().max().item(), "max_abs": ref.abs().max().item(),
            "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"])}


VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4, vision_use_head=False)


def vl_config():
    from transformers import AutoConfig
    text = dict(KW3, vocab_size=300, rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    text.pop("tie_word_embeddings")
    return AutoConfig.for_model(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=text, vision_config=VISION,
                                mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298, dtype="float32")


def read_all(d):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def cmd_make_vl(hf_dir, native):
    import transformers
    from safetensors.torch import save_file
    torch.manual_seed(7)
    m = transformers.Gemma3ForConditionalGeneration._from_config(vl_config(), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n and "vision" not in n:
                p.copy_(torch.randn_like(p) * 0.5)
            elif n.endswith(".bias") or "layer_norm" in n or "post_layernorm" in n:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if n.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 * 2)
    m.save_pretrained(hf_dir)
    sd = read_all(hf_dir)

    def rename(k):
        if native:
            for a, b in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")):
                if k.startswith(a):
                    return b + k[len(a):]
            return k
        return "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k
    sd = {rename(k): v for k, v in sd.items()}
    for f in os.listdir(hf_dir):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(hf_dir, f))
    save_file(sd, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    return {"tensors": len(sd), "prefixes": sorted({".".join(k.split(".")[:2]) for k in sd})}


def vl_logits(d):
    import transformers
    m, info = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    with torch.no_grad():
        return m.eval()(input_ids=TOKENS).logits, info


def cmd_compare_vl(a, b):
    la, ia = vl_logits(a)
    lb, ib = vl_logits(b)
    return {"max_abs_diff": (la - lb).abs().max().item(), "missing": sorted(ia["missing_keys"]) + sorted(ib["missing_keys"]),
            "unexpected": sorted(ia["unexpected_keys"]) + sorted(ib["unexpected_keys"])}


def cmd_load_vl(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    whole = AutoConfig.from_pretrained(hf_dir)
    h = whole.text_config
    init(0, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    model = build(h, meta["language_model.embedding.word_embeddings.weight"].global_shape[0])
    prefix = "language_model."
    sd, missing, unexpected = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), iter_dir, strict=StrictHandling.RETURN_ALL)
    r = {"missing": sorted(k for k in missing if not k.startswith(("vision_tower.", "multi_modal_projector."))), "unexpected": sorted(unexpected)}
    model.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k not in COMMON and k.startswith(prefix)}, strict=True)
    logits = forward(model)[..., : h.vocab_size]
    ref, _ = vl_logits(hf_dir)
    r["max_abs_diff"] = (logits - ref).abs().max().item()
    hf = read_all(hf_dir)
    exp = {}
    for k, v in hf.items():
        for vp in ("model.vision_tower.", "vision_tower.vision_model.", "vision_tower."):
            if k.startswith(vp):
                exp["vision_tower." + k[len(vp):]] = v
                break
        else:
            if k.endswith("mm_soft_emb_norm.weight"):
                exp["multi_modal_projector.mm_soft_embed_norm.weight"] = v
            elif k.endswith("mm_input_projection_weight"):
                exp["multi_modal_projector.proj.weight"] = v.t().contiguous()
    import qwen35vl_oracle as q35
    r.update(q35.carried_report(iter_dir, exp, ("vision_tower.", "multi_modal_projector.")))
    return r


def main():
    a = sys.argv[1:]
    opt = lambda k, d: int(a[a.index(k) + 1]) if k in a else d  # noqa: E731
    if a[0] == "make":
        r = cmd_make(a[1], "--gemma3" in a)
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    elif a[0] == "save":
        r = cmd_save(a[1], opt("--tp", 1), "--gemma3" in a)
    elif a[0] == "check_hf":
        r = cmd_check_hf(a[1], a[2])
    elif a[0] == "make_vl":
        r = cmd_make_vl(a[1], "--native-names" in a)
    elif a[0] == "load_vl":
        r = cmd_load_vl(a[1], a[2])
    elif a[0] == "compare_vl":
        r = cmd_compare_vl(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
