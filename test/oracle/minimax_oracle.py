"""Real megatron-core (0.16.1, CPU, gloo) and transformers as oracles for MiniMax-M2 (MiniMaxM2ForCausalLM).

  make <hf_dir> [--fp8]
      a tiny random MiniMaxM2ForCausalLM saved with save_pretrained (the hub names:
      block_sparse_moe.gate / e_score_correction_bias / experts.<e>.w1|w2|w3), random full-width q/k
      norms and other norms, a router with real preferences and a non-zero e_score_correction_bias;
      --fp8 stores the attention and expert linears as the hub does (float8_e4m3fn + 128x128
      weight_scale_inv, quantization_config as published; hidden 192 so blocks are ragged) and writes
      <hf_dir>.ref/, the bf16 reference dequantisation (Megatron-Bridge's dequantize_fp8_blockwise)
  load <iter_dir> <hf_dir>
      megatron-core's MoE GPTModel (local spec, SequentialMLP) with Megatron-Bridge's FullDimQNorm /
      FullDimKNorm (below) as q/k layernorms, rotary_percent, sigmoid router with expert bias, loads the
      torch_dist checkpoint with dist_checkpointing.load(strict=RAISE_ALL); logits vs transformers'
  save <run_dir> [--tp M] [--ep N]
      megatron-core saves that model under TP=M x EP=N (gloo ranks; the full-width norms sharded over
      TP and all-reduced), with its logits, an equivalent HF config (hf_ref/) and expert fingerprints
  load_legacy <run_dir> <hf_dir> [--tp M] [--ep N]
      every rank loads shardshift's legacy rank file (its heads' rows of the q/k norms) with
      load_state_dict(strict=True); logits vs transformers'
  check_hf <hf_dir> <run_dir>
      moe_oracle's check_hf (clean load, logits vs megatron-core's, expert placement)
  compare <hf_a> <hf_b>
      transformers' logits of both and their missing / unexpected keys (JSON)

_FullDimRMSNorm, FullDimQNorm, FullDimKNorm and _get_k_norm_layout are Megatron-Bridge's
(src/megatron/bridge/models/minimax_m2/minimax_m2_provider.py at NVIDIA-NeMo/Megatron-Bridge
067f987d), copied so the oracle needs no Bridge install.
"""
import json
import os
import shutil
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import forward  # noqa: E402
from megatron_oracle import build as megatron_build  # noqa: E402
import moe_oracle  # noqa: E402
import deepseek_oracle as ds  # noqa: E402

V = 100
KW = dict(
    vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rotary_dim=8, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False, use_qk_norm=True,
    qk_norm_type="per_layer", use_routing_bias=True, scoring_func="sigmoid",
)
FP8_QC = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
          "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}


def hf_config(fp8=False):
    from transformers import AutoConfig
    kw = dict(KW, **(dict(hidden_size=192, intermediate_size=160) if fp8 else {}))
    return AutoConfig.for_model(model_type="minimax_m2", architectures=["MiniMaxM2ForCausalLM"], dtype="float32",
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": kw["rotary_dim"] / kw["head_dim"]}, **kw)


def cmd_make(hf_dir, fp8):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    m = AutoModelForCausalLM.from_config(hf_config(fp8), dtype=torch.float32)
    with torch.no_grad():
        for n, p in list(m.named_parameters()) + list(m.named_buffers()):
            if "rotary_emb" in n:
                continue
            p.copy_(ds._randomize_hf(n, tuple(p.shape), gen) if not n.endswith("gate.weight") else torch.randn(p.shape, generator=gen))
    m.save_pretrained(hf_dir)
    sd = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(hf_dir, f)))
    out = {"ok": True, "names": sorted(sd)}
    if fp8:
        import re
        fp8_re = re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|block_sparse_moe\.experts\.\d+\.(w1|w2|w3))\.weight$")
        q, ref = {}, {}
        for k in sorted(sd):
            t = sd[k]
            if fp8_re.search(k):
                w, s = ds.quantize_fp8_2d_blocks(t)
                q[k], q[k + "_scale_inv"] = w, s
                ref[k] = ds.dequantize_fp8_blockwise(w, s)
            elif k.endswith("e_score_correction_bias") or k.endswith("gate.weight"):
                q[k] = ref[k] = t.to(torch.float32)
            else:
                q[k] = ref[k] = t.to(torch.bfloat16)
        ds._write_single(hf_dir, q)
        cfg_path = os.path.join(hf_dir, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["dtype"] = "bfloat16"
        cfg["quantization_config"] = FP8_QC
        json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
        ref_dir = hf_dir.rstrip("/") + ".ref"
        os.makedirs(ref_dir, exist_ok=True)
        for f in os.listdir(hf_dir):
            if f.endswith(".json"):
                shutil.copy(os.path.join(hf_dir, f), ref_dir)
        rcfg = dict(cfg)
        del rcfg["quantization_config"]
        json.dump(rcfg, open(os.path.join(ref_dir, "config.json"), "w"), indent=2, sort_keys=True)
        save_file(ref, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
        out["fp8"] = sum(1 for k in q if k.endswith("_scale_inv"))
    return out


def cmd_compare(a, b):
    ra, ia, _ = moe_oracle.hf_logits(a)
    rb, ib, _ = moe_oracle.hf_logits(b)
    return {"max_abs_diff": (ra - rb).abs().max().item(), "missing_a": list(ia["missing_keys"]), "unexpected_a": list(ia["unexpected_keys"]),
            "missing_b": list(ib["missing_keys"]), "unexpected_b": list(ib["unexpected_keys"])}


# ---------------------------------------------------------------------------------------------------
# Megatron-Bridge's full-dimension q/k norms (copied, see the module docstring)


class _FullDimRMSNorm(nn.Module):
    def __init__(self, local_dim, global_dim, shard_world_size, tp_group_getter, eps=1e-6, dtype=None):
        super().__init__()
        self.local_dim = local_dim
        self.global_dim = global_dim
        self.shard_world_size = shard_world_size
        self._tp_group_getter = tp_group_getter
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(local_dim, dtype=dtype))

    def forward(self, x):
        orig_shape = x.shape
        x = x.reshape(*orig_shape[:2], -1)
        dtype = x.dtype
        x_fp32 = x.to(torch.float32)
        local_ss = x_fp32.pow(2).sum(-1, keepdim=True)
        tp_group = self._tp_group_getter()
        if tp_group is not None:
            tp_world = dist.get_world_size(tp_group)
            dist.all_reduce(local_ss, op=dist.ReduceOp.SUM, group=tp_group)
            replicas = tp_world // self.shard_world_size
            local_ss = local_ss / replicas
        variance = local_ss / self.global_dim
        x = x_fp32 * torch.rsqrt(variance + self.eps)
        return (self.weight * x.to(dtype)).reshape(orig_shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
        from megatron.core.utils import get_pg_rank, get_pg_size
        state_dict = self.state_dict(prefix="", keep_vars=True)
        tp_group = self._tp_group_getter()
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        dp_cp_group = metadata["dp_cp_group"]
        tp_world = get_pg_size(tp_group)
        tp_rank = get_pg_rank(tp_group)
        dp_rank = get_pg_rank(dp_cp_group)
        replicas = tp_world // self.shard_world_size
        shard_rank = tp_rank // replicas
        replica_rank = tp_rank % replicas
        weight_key = f"{prefix}weight"
        prepend_axis_num = len(sharded_offsets)
        sharded_weight = ShardedTensor.from_rank_offsets(
            weight_key, state_dict["weight"], *sharded_offsets, (prepend_axis_num, shard_rank, self.shard_world_size),
            replica_id=(0, replica_rank, dp_rank), prepend_axis_num=prepend_axis_num,
        )
        return {weight_key: sharded_weight}


def _get_k_norm_layout(num_kv_heads, hidden_size, tp):
    if num_kv_heads >= tp:
        assert num_kv_heads % tp == 0
        shard_world_size = tp
    else:
        assert tp % num_kv_heads == 0
        shard_world_size = num_kv_heads
    global_dim = num_kv_heads * hidden_size
    return global_dim // shard_world_size, global_dim, shard_world_size


def _get_tp_group():
    from megatron.core.parallel_state import get_tensor_model_parallel_group
    return get_tensor_model_parallel_group(check_initialized=False)


class FullDimQNorm:
    def __new__(cls, hidden_size, config, eps=1e-6):
        tp = config.tensor_model_parallel_size
        num_heads = config.num_attention_heads
        return _FullDimRMSNorm((num_heads // tp) * hidden_size, num_heads * hidden_size, tp, _get_tp_group, eps, dtype=config.params_dtype)


class FullDimKNorm:
    def __new__(cls, hidden_size, config, eps=1e-6):
        tp = config.tensor_model_parallel_size
        num_kv_heads = config.num_query_groups or config.num_attention_heads
        local_dim, global_dim, shard_world_size = _get_k_norm_layout(num_kv_heads, hidden_size, tp)
        return _FullDimRMSNorm(local_dim, global_dim, shard_world_size, _get_tp_group, eps, dtype=config.params_dtype)


# ---------------------------------------------------------------------------------------------------


def mcore_cfg(h):
    rp = getattr(h, "rope_parameters", None) or {}
    return dict(
        layers=h.num_hidden_layers, hidden=h.hidden_size, heads=h.num_attention_heads, groups=h.num_key_value_heads,
        head_dim=h.head_dim, eps=h.rms_norm_eps, qk=True, tied=False, max_pos=h.max_position_embeddings,
        rope_theta=rp.get("rope_theta", 10000.0), rotary_percent=rp.get("partial_rotary_factor", 1.0), vocab=h.vocab_size,
        experts=h.num_local_experts, topk=h.num_experts_per_tok, moe_ffn=h.intermediate_size, ffn=h.intermediate_size,
    )


def build(c, padded_vocab):
    import dataclasses
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"], num_query_groups=c["groups"],
        ffn_hidden_size=c["ffn"], kv_channels=c["head_dim"], gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", layernorm_epsilon=c["eps"], add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(), pipeline_dtype=torch.float32,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(), sequence_parallel=False,
        num_moe_experts=c["experts"], moe_router_topk=c["topk"], moe_ffn_hidden_size=c["moe_ffn"],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_pre_softmax=False,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
    )
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    layers = []
    for s in block.layer_specs:
        sub = dataclasses.replace(s.submodules.self_attention.submodules, q_layernorm=FullDimQNorm, k_layernorm=FullDimKNorm)
        sa = dataclasses.replace(s.submodules.self_attention, submodules=sub)
        layers.append(dataclasses.replace(s, submodules=dataclasses.replace(s.submodules, self_attention=sa)))
    spec = dataclasses.replace(block, layer_specs=layers)
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=padded_vocab, max_sequence_length=c["max_pos"],
        pre_process=True, post_process=True, parallel_output=False, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_percent=c["rotary_percent"], rotary_base=c["rope_theta"],
    )
    return model.eval()


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    moe_oracle.init(0, 1, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    model = build(c, meta["embedding.word_embeddings.weight"].global_shape[0])
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    model.load_state_dict({k: v for k, v in sd.items() if k not in ds.COMMON}, strict=True)
    logits = forward(model)[..., : c["vocab"]]
    ref, _, _ = moe_oracle.hf_logits(hf_dir)
    shapes = {k: list(meta[k].global_shape) for k in meta if k.endswith(("q_layernorm.weight", "k_layernorm.weight"))}
    return {"max_abs_diff": (logits - ref).abs().max().item(), "norm_shapes": shapes}


def save_worker(rank, world, init_file, run_dir, tp, ep):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    moe_oracle.init(rank, world, tp, ep, init_file)
    h = hf_config()
    c = mcore_cfg(h)
    model = build(c, 128 * tp)
    shared = torch.Generator().manual_seed(99)
    own = torch.Generator().manual_seed(1000 + 10 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())
    # the q/k norms are TP shards: each TP rank draws its own rows (replicas across EP agree)
    tp_gen = torch.Generator().manual_seed(500 + ps.get_tensor_model_parallel_rank())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "local_experts" in n:
                p.copy_(torch.randn(p.shape, generator=own) * 0.1)
            elif n.endswith(("q_layernorm.weight", "k_layernorm.weight")):
                p.copy_(torch.randn(p.shape, generator=tp_gen) * 0.5 + 1.0)
            elif "norm" in n:
                p.copy_(torch.randn(p.shape, generator=shared) * 0.5 + 1.0)
            elif "router" in n:
                p.copy_(torch.randn(p.shape, generator=shared))
            else:
                p.mul_(5.0)
        for n, b in model.named_buffers():
            if n.endswith("router.expert_bias"):
                b.copy_(torch.randn(b.shape, generator=shared) * 0.1)
    iter_dir = os.path.join(run_dir, "iter_0000002")
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    logits = forward(model)
    prints = moe_oracle.expert_fingerprints(model, c["layers"], c["experts"], ep)
    if rank == 0:
        moe_oracle.write_saved_run(run_dir, prints, logits, V, h)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, tp, ep):
    import torch.multiprocessing as mp
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(tp * ep, tempfile.mktemp(), run_dir, tp, ep), nprocs=tp * ep, join=True)
    return {"ok": True}


def load_legacy_worker(rank, world, init_file, run_dir, hf_dir, tp, ep, out_file):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    moe_oracle.init(rank, world, tp, ep, init_file)
    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    it = open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")).read().strip()
    t, e = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    d = os.path.join(run_dir, f"iter_{int(it):07d}", f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else ""), "model_optim_rng.pt")
    sd = torch.load(d, map_location="cpu", weights_only=False)["model"]
    model = build(c, sd["embedding.word_embeddings.weight"].shape[0] * tp)
    model.load_state_dict(sd, strict=True)
    logits = forward(model)
    if rank == 0:
        ref, _, _ = moe_oracle.hf_logits(hf_dir)
        q = sd["decoder.layers.0.self_attention.q_layernorm.weight"]
        json.dump({"max_abs_diff": (logits[..., : c["vocab"]] - ref).abs().max().item(), "q_norm_rows_per_rank": q.shape[0]}, open(out_file, "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_load_legacy(run_dir, hf_dir, tp, ep):
    import torch.multiprocessing as mp
    out = tempfile.mktemp()
    mp.spawn(load_legacy_worker, args=(tp * ep, tempfile.mktemp(), run_dir, hf_dir, tp, ep, out), nprocs=tp * ep, join=True)
    return json.load(open(out))


def main():
    a = sys.argv[1:]
    opt = lambda k, d: int(a[a.index(k) + 1]) if k in a else d  # noqa: E731
    if a[0] == "make":
        r = cmd_make(a[1], "--fp8" in a)
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    elif a[0] == "save":
        r = cmd_save(a[1], opt("--tp", 1), opt("--ep", 1))
    elif a[0] == "load_legacy":
        r = cmd_load_legacy(a[1], a[2], opt("--tp", 1), opt("--ep", 1))
    elif a[0] == "check_hf":
        r = moe_oracle.cmd_check_hf(a[1], a[2])
    elif a[0] == "compare":
        r = cmd_compare(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
