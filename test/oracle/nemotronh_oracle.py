"""Real megatron-core (0.16.1, CPU, gloo) and transformers 5 as oracles for Nemotron-H.

  make <hf_dir> [pattern]
      a tiny random NemotronHForCausalLM (fp32; Mamba-2, attention, MLP and MoE layers from the
      hybrid pattern, random norms / biases so a misplaced one shows) saved with save_pretrained
  make_bf16 <hf_dir>
      the same model as published checkpoints are saved: re-loaded with dtype=bfloat16 and saved,
      the router (gate.weight, e_score_correction_bias) float32 by _keep_in_fp32_modules_strict
  load_bf16 <iter_dir> <hf_dir>
      megatron-core's MambaModel in bf16 loads shardshift's bf16 conversion strictly; its router
      expert_bias buffers are float32 and equal the source's float32 biases bit for bit (JSON)
  load <iter_dir> <hf_dir>
      megatron-core's own MambaModel (MambaStack, MambaLayer/MambaMixer, TransformerLayer, MLPLayer,
      MoETransformerLayer) built for the HF config loads the torch_dist checkpoint with
      dist_checkpointing.load(strict=RAISE_ALL); its logits are compared with transformers' (JSON)
  save <run_dir> [--tp N]
      megatron-core saves a random MambaModel of the same shape under TP=N (N gloo ranks) with
      dist_checkpointing.save (iter_0000003 + tracker), with its logits and the HF config (hf_ref/)
  check_hf <hf_dir> <run_dir>
      from_pretrained(hf_dir) loads with no missing/unexpected keys; logits vs megatron-core's (JSON)

megatron-core's Mamba mixer needs CUDA-only packages (mamba_ssm, causal_conv1d, triton) and
TransformerEngine; none is installed, so this oracle supplies CPU stand-ins, all outside the
checkpoint path:
- megatron-core's triton inference helpers (tensor_ops; dynamic batching only, never called here):
  an empty module;
- `einops.rearrange/repeat`: a small exact implementation of the patterns the mixer uses;
- `mamba_ssm` RMSNormGated: the gated group RMSNorm (norm after gate: rms(y · silu(z)) per group × w);
- `mamba_chunk_scan_combined`: the Mamba-2 SSM recurrence as a plain per-step scan (the chunked
  kernel computes the same sum); megatron-core's mixer runs its non-fused path
  (use_mamba_mem_eff_path=False: nn.Conv1d, then the scan, then the gated norm);
- TENorm (the final norm): megatron-core's own WrappedTorchNorm; linears: its local
  Column/RowParallelLinear with the TE key names via sharded_state_dict_keys_map, as its GPT local
  spec does.
Everything that names, shapes, splits or loads the parameters is megatron-core's own code.
"""
import json
import math
import os
import sys
import tempfile
import types
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import TOKENS, forward, shims  # noqa: E402

H, HEADS, GROUPS, HD, FFN, V = 64, 4, 2, 16, 96, 100
M_HEADS, M_HEAD_DIM, M_GROUPS, M_STATE, K = 8, 16, 2, 16, 4
E, TOPK, MOE_FFN, SHARED = 4, 2, 32, 48
PATTERN = "M*-EME"


# --- CPU stand-ins for CUDA-only packages -------------------------------------------------------

def _groups(side):
    toks = side.replace("(", " ( ").replace(")", " ) ").split()
    out, cur = [], None
    for t in toks:
        if t == "(":
            cur = []
        elif t == ")":
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(t)
        else:
            out.append([] if t == "1" else [t])
    return out


def rearrange(x, pattern, **sizes):
    left, right = pattern.split("->")
    L, R = _groups(left), _groups(right)
    sizes = dict(sizes)
    for g, d in zip(L, x.shape):
        known = math.prod(sizes[n] for n in g if n in sizes)
        for n in g:
            if n not in sizes:
                sizes[n] = d // known
    elem = [n for g in L for n in g]
    x = x.reshape([sizes[n] for n in elem])
    order = [n for g in R for n in g]
    x = x.permute([elem.index(n) for n in order if n in elem])
    if any(n not in elem for n in order):  # repeat: new axes broadcast
        for k, n in enumerate(order):
            if n not in elem:
                x = x.unsqueeze(k)
        x = x.expand([sizes[n] for n in order])
    return x.reshape([math.prod(sizes[n] for n in g) for g in R])


class RMSNormGated(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.eps, self.group_size, self.norm_before_gate = eps, group_size or hidden_size, norm_before_gate

    def forward(self, x, z=None):
        dtype = x.dtype
        x = x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        g = x.view(*x.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        x = g.view(*x.shape)
        if z is not None and self.norm_before_gate:
            x = x * F.silu(z.float())
        return (x * self.weight.float()).to(dtype)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                              return_final_states=False, **_):
    """x [b l h p], dt [b l h], A [h], B/C [b l g n]: h_t = exp(dt·A) h_{t-1} + dt·x_t ⊗ B_t, y_t = C_t·h_t + D x_t."""
    assert z is None
    b, l, h, p = x.shape
    rep = h // B.shape[2]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    if dt_softplus:
        dt = F.softplus(dt)
    Bh, Ch = B.float().repeat_interleave(rep, dim=2), C.float().repeat_interleave(rep, dim=2)
    state = torch.zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        state = state * torch.exp(dt[:, t] * A.float())[..., None, None] + dt[:, t, :, None, None] * x[:, t, :, :, None].float() * Bh[:, t, :, None, :]
        y = (state * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + (D.float()[:, None] if D.dim() == 1 else D.float()) * x[:, t].float()
        ys.append(y)
    y = torch.stack(ys, 1).to(x.dtype)
    return (y, state) if return_final_states else y


def cpu_stubs():
    ops = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"
    if ops not in sys.modules:
        try:
            __import__(ops)
        except ImportError:  # needs triton; its helpers serve dynamic-batching inference only
            m = types.ModuleType(ops)
            m.tensor_get_slice_after = m.tensor_masked_update = m.tensor_merge = None
            sys.modules[ops] = m
    try:
        import einops  # noqa: F401
    except ImportError:
        ein = types.ModuleType("einops")
        ein.rearrange, ein.repeat = rearrange, rearrange
        sys.modules["einops"] = ein
    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.layernorm_gated",
             "mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update"]
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        for n in names:
            sys.modules[n] = types.ModuleType(n)
        sys.modules["mamba_ssm.ops.triton.layernorm_gated"].RMSNorm = RMSNormGated
        sys.modules["mamba_ssm.ops.triton.ssd_combined"].mamba_chunk_scan_combined = mamba_chunk_scan_combined
        sys.modules["mamba_ssm.ops.triton.ssd_combined"].mamba_split_conv1d_scan_combined = None
        sys.modules["mamba_ssm.ops.triton.selective_state_update"].selective_state_update = None
    import megatron.core.ssm.mamba_block as mb
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    mb.TENorm = WrappedTorchNorm
    import megatron.core.transformer.moe.moe_utils as mu
    if not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


# --- models -------------------------------------------------------------------------------------

def hf_config(pattern=PATTERN):
    from transformers import AutoConfig
    return AutoConfig.for_model(
        model_type="nemotron_h", architectures=["NemotronHForCausalLM"], vocab_size=V, hidden_size=H,
        hybrid_override_pattern=pattern, num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HD,
        intermediate_size=FFN, mamba_num_heads=M_HEADS, mamba_head_dim=M_HEAD_DIM, n_groups=M_GROUPS,
        ssm_state_size=M_STATE, conv_kernel=K, chunk_size=4, n_routed_experts=E, num_experts_per_tok=TOPK,
        moe_intermediate_size=MOE_FFN, moe_shared_expert_intermediate_size=SHARED, routed_scaling_factor=1.5,
        norm_topk_prob=True, layer_norm_epsilon=1e-5, tie_word_embeddings=False, max_position_embeddings=64,
        dtype="float32",
    )


def cmd_make_bf16(hf_dir):
    """The fp32 model re-loaded with dtype=bfloat16 and saved, as published checkpoints are: the
    router's gate.weight and e_score_correction_bias stay float32 (_keep_in_fp32_modules_strict)."""
    from transformers import AutoModelForCausalLM
    tmp = tempfile.mkdtemp()
    cmd_make(tmp)
    m = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16)
    m.save_pretrained(hf_dir)
    sd = m.state_dict()
    return {"ok": True, "f32": sorted(k for k, v in sd.items() if v.dtype == torch.float32)}


def cmd_make(hf_dir, pattern=PATTERN):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(11)
    m = AutoModelForCausalLM.from_config(hf_config(pattern), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith("norm_f.weight"):
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif "gate.weight" in n:  # a router with real preferences
                p.copy_(torch.randn_like(p))
            elif n.endswith("conv1d.bias") or n.endswith(".D") or n.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    m.save_pretrained(hf_dir)
    return {"ok": True, "params": sum(p.numel() for p in m.parameters())}


def build(h, padded_vocab, dtype=torch.float32):
    from megatron.core.activations import squared_relu
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.models.mamba.mamba_model import MambaModel
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer, TransformerLayerSubmodules

    pattern = h.hybrid_override_pattern
    cfg = TransformerConfig(
        num_layers=len(pattern), hidden_size=h.hidden_size, num_attention_heads=h.num_attention_heads,
        num_query_groups=h.num_key_value_heads, kv_channels=h.head_dim, ffn_hidden_size=h.intermediate_size,
        gated_linear_unit=False, activation_func=squared_relu, normalization="RMSNorm",
        layernorm_epsilon=h.layer_norm_epsilon, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        mamba_state_dim=h.ssm_state_size, mamba_head_dim=h.mamba_head_dim, mamba_num_groups=h.n_groups,
        mamba_num_heads=h.mamba_num_heads, use_mamba_mem_eff_path=False,
        num_moe_experts=h.n_routed_experts, moe_router_topk=h.num_experts_per_tok,
        moe_ffn_hidden_size=h.moe_intermediate_size, moe_shared_expert_intermediate_size=h.moe_shared_expert_intermediate_size,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(h.routed_scaling_factor), moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
    )
    norm_key = lambda old, new: {old: new}  # noqa: E731  (local modules under the TE names)
    spec = ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
                norm=WrappedTorchNorm,
                mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
                mamba_bda=get_bias_dropout_add, sharded_state_dict_keys_map=norm_key("norm.", "mixer.in_proj.layer_norm_"))),
            attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
                input_layernorm=WrappedTorchNorm,
                self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                          submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention, linear_proj=RowParallelLinear)),
                self_attn_bda=get_bias_dropout_add,
                sharded_state_dict_keys_map=norm_key("input_layernorm.", "self_attention.linear_qkv.layer_norm_"))),
            mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=WrappedTorchNorm,
                mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
                mlp_bda=get_bias_dropout_add, sharded_state_dict_keys_map=norm_key("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))),
            moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=WrappedTorchNorm,
                mlp=get_moe_module_spec(use_te=False, num_experts=h.n_routed_experts, moe_grouped_gemm=False),
                mlp_bda=get_bias_dropout_add)),
        ),
    )
    model = MambaModel(
        config=cfg, mamba_stack_spec=spec, vocab_size=padded_vocab, max_sequence_length=h.max_position_embeddings,
        hybrid_override_pattern=pattern, position_embedding_type="none", share_embeddings_and_output_weights=False,
        parallel_output=False,
    )
    return model.eval()


def init(rank=0, world=1, tp=1, init_file=None):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    shims()
    cpu_stubs()
    dist.init_process_group("gloo", init_method=f"file://{init_file or tempfile.mktemp()}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    torch.manual_seed(1234)


def cmd_load_bf16(iter_dir, hf_dir):
    """megatron-core MambaModel in bf16 (`--bf16`) loads the bf16 conversion strictly: its router
    expert_bias buffers stay float32 and hold the source's float32 bias bit for bit; logits are
    compared with transformers' bf16 model (max |Δ| and top-1 agreement)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    h = AutoConfig.from_pretrained(hf_dir)
    init()
    model = build(h, ((h.vocab_size + 127) // 128) * 128, torch.bfloat16)
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k: v for k, v in sd.items() if k not in common}, strict=True)
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    src = load_file(os.path.join(hf_dir, "model.safetensors"))
    biases, wrong = 0, []
    for i, layer in enumerate(model.decoder.layers):
        r = getattr(getattr(layer, "mlp", None), "router", None)
        if r is None or getattr(r, "expert_bias", None) is None:
            continue
        biases += 1
        want = src[f"backbone.layers.{i}.mixer.gate.e_score_correction_bias"]
        if r.expert_bias.dtype != torch.float32 or want.dtype != torch.float32 or not torch.equal(r.expert_bias, want):
            wrong.append(i)
    stored = {k: str(v.dtype) for k, v in meta.items() if "router" in k}
    logits = forward(model)[..., : h.vocab_size].float()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = hf(TOKENS).logits.float()
    return {"expert_biases": biases, "bias_wrong_layers": wrong, "stored_router_dtypes": stored,
            "max_abs_diff": (logits - ref).abs().max().item(), "max_abs": ref.abs().max().item(),
            "top1_agree": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig, AutoModelForCausalLM
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    h = AutoConfig.from_pretrained(hf_dir)
    init()
    model = build(h, ((h.vocab_size + 127) // 128) * 128)
    sharded = model.sharded_state_dict()
    sd = dist_checkpointing.load(sharded, iter_dir, strict=StrictHandling.RAISE_ALL)
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k: v for k, v in sd.items() if k not in common}, strict=True)
    keys = sorted(dist_checkpointing.load_tensors_metadata(iter_dir).keys())
    logits = forward(model)[..., : h.vocab_size]
    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        ref = hf.eval()(TOKENS).logits
    return {
        "max_abs_diff": (logits - ref).abs().max().item(), "max_abs": ref.abs().max().item(),
        "layer_types": list(model.decoder.layer_type_list), "stored_keys": len(keys),
        "split_keys": [k for k in keys if k.split(".")[-1] in ("z", "x", "B", "C", "dt")],
        "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
    }


def save_worker(rank, world, init_file, run_dir, tp):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    init(rank, world, tp, init_file)
    h = hf_config()
    model = build(h, 128)
    # Replicated parameters (layer norms, final norm, routers, expert biases) get the same random
    # values on every rank; TP-sharded Mamba parameters their own per rank (they are shards).
    shared = torch.Generator().manual_seed(99)
    own = torch.Generator().manual_seed(500 + ps.get_tensor_model_parallel_rank())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(n.endswith(x) for x in ("mixer.norm.weight", "mixer.D", "mixer.conv1d.bias", "mixer.dt_bias")):
                p.copy_(torch.randn(p.shape, generator=own) * 0.5 + (1.0 if "norm" in n else 0.0))
            elif "norm" in n:
                p.copy_(torch.randn(p.shape, generator=shared) * 0.5 + 1.0)
            elif "router" in n:
                p.copy_(torch.randn(p.shape, generator=shared))
        for n, b in model.named_buffers():
            if n.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=shared) * 0.3)
    iter_dir = os.path.join(run_dir, "iter_0000003")
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    logits = forward(model)
    if rank == 0:
        torch.save(logits[..., :V], os.path.join(run_dir, "logits.pt"))
        with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3")
        h.save_pretrained(os.path.join(run_dir, "hf_ref"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, tp):
    import torch.multiprocessing as mp
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(tp, tempfile.mktemp(), run_dir, tp), nprocs=tp, join=True)
    return {"ok": True}


def cmd_check_hf(hf_dir, run_dir):
    from transformers import AutoModelForCausalLM
    ref = torch.load(os.path.join(run_dir, "logits.pt"))
    m, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        logits = m.eval()(TOKENS).logits
    return {"max_abs_diff": (logits - ref).abs().max().item(), "max_abs": ref.abs().max().item(),
            "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"])}


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1], *(a[2:3]))
    elif a[0] == "make_bf16":
        r = cmd_make_bf16(a[1])
    elif a[0] == "load_bf16":
        r = cmd_load_bf16(a[1], a[2])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    elif a[0] == "save":
        r = cmd_save(a[1], int(a[a.index("--tp") + 1]) if "--tp" in a else 1)
    elif a[0] == "check_hf":
        r = cmd_check_hf(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
