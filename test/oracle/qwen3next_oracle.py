"""Real megatron-core (0.16.1, CPU, gloo) and transformers 5 as oracles for Qwen3-Next.

  make <hf_dir> [case]
      a tiny random model (fp32; linear- and full-attention layers, random norms) saved with
      save_pretrained; cases: qwen3_next (Qwen3NextForCausalLM, 4 experts + gated shared expert),
      qwen3_5 (dense Qwen3_5ForCausalLM), qwen3_5_moe (Qwen3_5MoeForCausalLM)
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel with the layer stack Megatron-Bridge builds for Qwen3-Next
      (GatedDeltaNet / gated SelfAttention per layer_types, MoE with shared expert, zero-centred
      RMSNorm) loads the torch_dist checkpoint with dist_checkpointing.load(strict=RAISE_ALL); its
      logits are compared with transformers' (JSON)

megatron-core's own block spec for this stack (experimental_attention_variant_module_specs) only
builds with TransformerEngine, which has no CPU build. The stack here is the same modules with
CPU stand-ins for TE's pieces, named as TE names them: a fused RMSNorm + ColumnParallelLinear
(`layer_norm_weight`, as TELayerNormColumnParallelLinear) for `linear_qkv` and GDN `in_proj`, and
a zero-centred RMSNorm module for the other norms. GatedDeltaNet runs its pure-torch path
(`deterministic_mode`: torch conv1d and torch_chunk_gated_delta_rule). It refuses to construct
without `fla` (HAVE_FLA), absent here: the flag is set, and the one fla function the torch path
still calls, the q/k L2 norm, is shimmed with fla's formula (x * rsqrt(sum x² + 1e-6)).
"""
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import TOKENS, forward  # noqa: E402
from moe_oracle import init  # noqa: E402

H, HEADS, GROUPS, HD, V, E, TOPK, MOE_FFN, SHARED = 64, 4, 2, 16, 100, 4, 2, 32, 48
TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


CASES = {
    "qwen3_next": ("qwen3_next", "Qwen3NextForCausalLM"),
    "qwen3_5": ("qwen3_5_text", "Qwen3_5ForCausalLM"),
    "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
}


def hf_config(case="qwen3_next"):
    from transformers import AutoConfig
    mt, arch = CASES[case]
    moe = {} if case == "qwen3_5" else dict(
        num_experts=E, num_experts_per_tok=TOPK, moe_intermediate_size=MOE_FFN, shared_expert_intermediate_size=SHARED,
        norm_topk_prob=True, **({"decoder_sparse_step": 1, "mlp_only_layers": []} if case == "qwen3_next" else {}),
    )
    return AutoConfig.for_model(
        model_type=mt, architectures=[arch], vocab_size=V, hidden_size=H,
        num_hidden_layers=len(TYPES), layer_types=TYPES, num_attention_heads=HEADS, num_key_value_heads=GROUPS,
        head_dim=HD, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        intermediate_size=96, **moe,
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2,
        linear_num_value_heads=4, partial_rotary_factor=0.25, dtype="float32",
    )


def cmd_make(hf_dir, case):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(7)
    m = AutoModelForCausalLM.from_config(hf_config(case), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("linear_attn.norm.weight"):
                # HF's plain RMSNorm weight becomes weight − 1 in Megatron; in [0.5, 2] that is exact.
                p.copy_(torch.rand_like(p) * 1.4 + 0.55)
            elif "norm" in n:
                p.copy_(torch.randn_like(p) * 0.3)  # zero-centred: 1 + w
            elif n.endswith("mlp.gate.weight") or "shared_expert_gate" in n or "A_log" in n or "dt_bias" in n:
                p.copy_(torch.randn_like(p))
    m.save_pretrained(hf_dir)
    return {"ok": True}


class ZcRMSNorm(torch.nn.Module):
    """Zero-centred RMSNorm (megatron-core's layernorm_zero_centered_gamma): x̂ · (1 + w)."""

    def __init__(self, config=None, hidden_size=None, eps=1e-6, **kw):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def ln_linear():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    class LayerNormColumnParallelLinear(ColumnParallelLinear):
        """CPU stand-in for TELayerNormColumnParallelLinear: zero-centred RMSNorm fused in front."""

        def __init__(self, input_size, output_size, *, config, **kw):
            kw.pop("is_expert", None)
            kw.pop("tp_comm_buffer_name", None)
            super().__init__(input_size, output_size, config=config, **kw)
            self.layer_norm_weight = torch.nn.Parameter(torch.zeros(input_size))
            self.eps = config.layernorm_epsilon

        def forward(self, x, **kw):
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.layer_norm_weight.float())).to(x.dtype)
            return super().forward(y)

    return LayerNormColumnParallelLinear


def build(h, padded_vocab):
    import megatron.core.ssm.gated_delta_net as gdn_mod
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
    import copy

    # fla's l2norm (GPU kernel package, absent): the same formula in torch.
    # GatedDeltaNet refuses to construct without fla; the kernels it would use are not called in
    # deterministic_mode (torch conv1d, torch_chunk_gated_delta_rule) except l2norm, shimmed here.
    gdn_mod.HAVE_FLA = True
    gdn_mod.l2norm = lambda x: (x.float() * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)

    freq = [1 if t == "linear_attention" else 0 for t in h.layer_types]
    moe_fields = dict(
        num_moe_experts=h.num_experts, moe_router_topk=h.num_experts_per_tok, moe_ffn_hidden_size=h.moe_intermediate_size,
        moe_shared_expert_intermediate_size=h.shared_expert_intermediate_size, moe_shared_expert_gate=True,
        moe_router_pre_softmax=False, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
    ) if getattr(h, "num_experts", None) is not None else {}
    cfg = TransformerConfig(
        num_layers=h.num_hidden_layers, hidden_size=h.hidden_size, num_attention_heads=h.num_attention_heads,
        num_query_groups=h.num_key_value_heads, ffn_hidden_size=h.intermediate_size, kv_channels=h.head_dim,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=h.rms_norm_eps, add_bias_linear=False, qk_layernorm=True, layernorm_zero_centered_gamma=True,
        attention_output_gate=True, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32, sequence_parallel=False, deterministic_mode=True,
        **moe_fields,
        experimental_attention_variant="gated_delta_net", linear_attention_freq=freq,
        linear_conv_kernel_dim=h.linear_conv_kernel_dim, linear_key_head_dim=h.linear_key_head_dim,
        linear_value_head_dim=h.linear_value_head_dim, linear_num_key_heads=h.linear_num_key_heads,
        linear_num_value_heads=h.linear_num_value_heads,
    )
    LNLinear = ln_linear()
    local = get_gpt_layer_local_spec(num_experts=getattr(h, "num_experts", None), moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm")
    is_moe = getattr(h, "num_experts", None) is not None
    if is_moe:
        mlp, pre_mlp_norm = copy.deepcopy(local.submodules.mlp), ZcRMSNorm
    else:  # dense: the pre-MLP norm fused into linear_fc1, as TE's spec does
        mlp = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp)
        mlp.submodules.linear_fc1 = LNLinear
        pre_mlp_norm = IdentityOp
    attn = copy.deepcopy(local.submodules.self_attention)
    attn.submodules.linear_qkv = LNLinear
    attn.submodules.q_layernorm = ZcRMSNorm
    attn.submodules.k_layernorm = ZcRMSNorm
    gdn = ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(in_proj=LNLinear, out_norm=ZcRMSNorm, out_proj=RowParallelLinear))
    layers = [
        ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp, self_attention=gdn if f else attn, self_attn_bda=local.submodules.self_attn_bda,
            pre_mlp_layernorm=pre_mlp_norm, mlp=mlp, mlp_bda=local.submodules.mlp_bda))
        for f in freq
    ]
    spec = TransformerBlockSubmodules(layer_specs=layers, layer_norm=ZcRMSNorm)
    rp = getattr(h, "rope_parameters", None) or {}
    rope, partial = rp.get("rope_theta", 10000.0), rp.get("partial_rotary_factor", 1.0)
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=padded_vocab, max_sequence_length=h.max_position_embeddings,
        pre_process=True, post_process=True, parallel_output=False, share_embeddings_and_output_weights=bool(getattr(h, "tie_word_embeddings", False)),
        position_embedding_type="rope", rotary_percent=partial, rotary_base=rope,
    )
    return model.eval()


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig, AutoModelForCausalLM
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    h = AutoConfig.from_pretrained(hf_dir)
    init(0, 1, 1, 1, tempfile.mktemp())
    model = build(h, ((h.vocab_size + 127) // 128) * 128)
    ssd = model.sharded_state_dict()
    sd = dist_checkpointing.load(ssd, iter_dir, strict=StrictHandling.RAISE_ALL)
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k: v for k, v in sd.items() if k not in common}, strict=True)
    r = {"params": sum(1 for _ in model.named_parameters())}
    try:
        logits = forward(model)[..., : h.vocab_size]
    except Exception as e:  # noqa: BLE001
        r["forward_error"] = f"{type(e).__name__}: {e}"
        return r
    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = m.eval()(TOKENS).logits
    r.update({"max_abs_diff": (logits - ref).abs().max().item(), "max_abs": ref.abs().max().item()})
    return r


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1], a[2] if len(a) > 2 else "qwen3_next")
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
