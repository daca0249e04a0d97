"""Real megatron-core (0.16.1, CPU, gloo) and transformers as oracles for GLM-4.5 (Glm4MoeForCausalLM).

  make <hf_dir> <case>
      a tiny random Glm4MoeForCausalLM saved with save_pretrained, rewritten to the hub layout (experts
      per expert, mlp.experts.<e>.{gate,up,down}_proj.weight) with random norms, a router with real
      preferences, a non-zero e_score_correction_bias, q/k/v biases; with num_nextn_predict_layers > 0
      the MTP layer under the hub names (model.layers.<L+k>.*, incl. the copies embed_tokens /
      shared_head.head). Cases: glm45 (as the published GLM-4.5: attention_bias, no q/k norm, partial
      rotary 0.5, 1 dense layer, 1 shared expert, MTP 1), glm_qk (use_qk_norm, 2 dense layers, 2 shared
      experts, no MTP)
  compare <hf_a> <hf_b>
      deepseek_oracle's compare: transformers' logits (and its generic MtpModel's) of both (JSON)
  load <iter_dir> <hf_dir> [--mtp]
      megatron-core's GPTModel configured as Megatron-Bridge's GLM-4.5 bridge configures it (GQA with
      QKV bias, rotary_percent, sigmoid router with expert bias, group-limited top-k and scaling,
      shared experts, moe_layer_freq, local spec, SequentialMLP; --mtp adds the MTP block) loads the
      torch_dist checkpoint with dist_checkpointing.load(strict=RAISE_ALL) + load_state_dict(strict=True);
      logits (and MTP logits) vs transformers' (JSON)
  save <run_dir> <case> [--ep N] [--tp M] [--mtp]
      megatron-core saves a random model of that case's shape under EP=N x TP=M (gloo ranks), with its
      logits (and MTP logits), an equivalent HF config (hf_ref/) and per global expert a fingerprint
  load_legacy <run_dir> <hf_dir> --ep N --tp M [--mtp]
      every rank of an EP=N x TP=M megatron-core model loads shardshift's legacy rank file
      mp_rank_TT[_EEE]/model_optim_rng.pt with load_state_dict(strict=True); logits vs transformers'
  check_hf <hf_dir> <run_dir>
      deepseek_oracle's check_hf: clean from_pretrained, logits (and MTP logits) vs megatron-core's,
      expert placement by fingerprint (JSON)

The megatron-core side needs only the MoE CPU shims (moe_oracle.init); partial rotary is the
unfused torch RoPE on the first rotary_percent x head_dim dims, as transformers' Glm4Moe applies it.
"""
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import forward  # noqa: E402
from moe_oracle import init  # noqa: E402
import moe_oracle  # noqa: E402
import deepseek_oracle as ds  # noqa: E402

V = 100
BASE = dict(
    vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, n_group=2, topk_group=1,
    first_k_dense_replace=1, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=False,
    num_nextn_predict_layers=1, max_position_embeddings=64, rms_norm_eps=1e-6,
)
CASES = {
    "glm45": {},
    "glm_qk": dict(use_qk_norm=True, num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2,
                   num_nextn_predict_layers=0, n_group=1, topk_group=1),
}
COMMON = ds.COMMON


def hf_config(case, mtp=None):
    from transformers import AutoConfig
    kw = dict(BASE, **CASES[case])
    if mtp is not None:
        kw["num_nextn_predict_layers"] = mtp
    return AutoConfig.for_model(
        model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": kw["partial_rotary_factor"]},
        dtype="float32", **kw,
    )


def cmd_make(hf_dir, case):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM as A

    cfg = hf_config(case)
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    m = A.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in list(m.named_parameters()) + list(m.named_buffers()):
            if "rotary_emb" in n:
                continue
            if n.endswith(".bias") and "self_attn" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(ds._randomize_hf(n, tuple(p.shape), gen))
    m.save_pretrained(hf_dir)
    sd = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(hf_dir, f)))
    fused_on_disk = any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    sd = ds._per_expert(sd)
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    for k in range(cfg.num_nextn_predict_layers):
        src = f"model.layers.{L - 1}."
        for name in [n for n in sd if n.startswith(src)]:
            new = f"model.layers.{L + k}." + name[len(src):]
            sd[new] = ds._randomize_hf(new, tuple(sd[name].shape), gen) if not new.endswith(".bias") else torch.randn(sd[name].shape, generator=gen) * 0.2
        p = f"model.layers.{L + k}."
        sd[p + "enorm.weight"] = ds._randomize_hf("enorm.weight", (H,), gen)
        sd[p + "hnorm.weight"] = ds._randomize_hf("hnorm.weight", (H,), gen)
        sd[p + "eh_proj.weight"] = ds._randomize_hf("eh_proj.weight", (H, 2 * H), gen)
        sd[p + "shared_head.norm.weight"] = ds._randomize_hf("shared_head.norm.weight", (H,), gen)
        sd[p + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[p + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    ds._write_single(hf_dir, sd)
    _, info = A.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    unexpected = sorted(info["unexpected_keys"])
    out = {"ok": True, "experts_on_disk": "fused" if fused_on_disk else "per_expert", "missing": sorted(info["missing_keys"])}
    out["unexpected"] = [u for u in unexpected if u not in ds._mtp_keys(unexpected, L)]
    from safetensors import safe_open
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
        out["tensors"] = {k: [f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()] for k in f.keys()}
    return out


def mcore_cfg(h):
    """The TransformerConfig fields of an HF Glm4Moe config (as Megatron-Bridge's GLM-4.5 bridge)."""
    assert h.norm_topk_prob, "megatron-core's sigmoid router always renormalises the top-k (norm_topk_prob=True)"
    rp = getattr(h, "rope_parameters", None) or {}
    L, fk = h.num_hidden_layers, h.first_k_dense_replace
    return dict(
        layers=L, hidden=h.hidden_size, heads=h.num_attention_heads, groups=h.num_key_value_heads,
        head_dim=h.head_dim, ffn=h.intermediate_size, eps=h.rms_norm_eps, max_pos=h.max_position_embeddings,
        rope_theta=rp.get("rope_theta", 10000.0), rotary_percent=rp.get("partial_rotary_factor", getattr(h, "partial_rotary_factor", 1.0)),
        vocab=h.vocab_size, bias=bool(h.attention_bias), qk=bool(h.use_qk_norm),
        experts=h.n_routed_experts, topk=h.num_experts_per_tok, moe_ffn=h.moe_intermediate_size,
        shared=h.moe_intermediate_size * h.n_shared_experts if h.n_shared_experts else None,
        freq=[0] * fk + [1] * (L - fk), groups_r=h.n_group, group_topk=h.topk_group, scaling=h.routed_scaling_factor,
        mtp=h.num_nextn_predict_layers or 0,
    )


def build(c, padded_vocab, mtp=False):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"], num_query_groups=c["groups"],
        ffn_hidden_size=c["ffn"], kv_channels=c["head_dim"], normalization="RMSNorm", layernorm_epsilon=c["eps"],
        add_qkv_bias=c["bias"], qk_layernorm=c["qk"], gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_dtype=torch.float32, expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        sequence_parallel=False, num_moe_experts=c["experts"], moe_router_topk=c["topk"], moe_ffn_hidden_size=c["moe_ffn"],
        moe_shared_expert_intermediate_size=c["shared"], moe_layer_freq=c["freq"],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_dtype="fp32",
        moe_router_topk_scaling_factor=c["scaling"], moe_router_num_groups=c["groups_r"],
        moe_router_group_topk=c["group_topk"], moe_router_pre_softmax=False,  # as the bridge
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,  # alltoall needs CUDA streams
        mtp_num_layers=c["mtp"] if mtp else None,
    )
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    mtp_spec = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False) if mtp else None
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=padded_vocab, max_sequence_length=c["max_pos"],
        pre_process=True, post_process=True, parallel_output=False, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_percent=c["rotary_percent"], rotary_base=c["rope_theta"],
        mtp_block_spec=mtp_spec,
    )
    return model.eval()


def _compare(c, logits, mtp_logits, ref, mtp):
    out = {"max_abs_diff": (logits[..., : c["vocab"]] - ref["logits"]).abs().max().item(), "max_abs": ref["logits"].abs().max().item()}
    if mtp:
        out["mtp_max_abs_diff"] = max((a[..., : c["vocab"]] - b).abs().max().item() for a, b in zip(mtp_logits, ref["mtp_logits"])) if ref["mtp_logits"] else None
    return out


def cmd_load(iter_dir, hf_dir, mtp=False):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from transformers import AutoConfig

    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    init(0, 1, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    padded = meta["embedding.word_embeddings.weight"].global_shape[0]
    model = build(c, padded, mtp=mtp)
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    model.load_state_dict({k: v for k, v in sd.items() if k not in COMMON}, strict=True)
    logits, mtp_logits = ds.forward_mtp(model) if mtp else (forward(model), [])
    return {"padded_vocab": padded, "keys": len(meta), **_compare(c, logits, mtp_logits, ds.hf_outputs(hf_dir), mtp)}


def save_worker(rank, world, init_file, run_dir, case, tp, ep, mtp):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    init(rank, world, tp, ep, init_file)
    h = hf_config(case, mtp=(1 if mtp else 0))
    c = mcore_cfg(h)
    model = build(c, 128 * tp, mtp=mtp)
    shared = torch.Generator().manual_seed(99)
    own = torch.Generator().manual_seed(1000 + 10 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())
    tp_gen = torch.Generator().manual_seed(500 + ps.get_tensor_model_parallel_rank())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "local_experts" in n:
                p.copy_(torch.randn(p.shape, generator=own) * 0.1)
            elif "norm" in n:
                p.copy_(torch.randn(p.shape, generator=shared) * 0.5 + 1.0)
            elif "router" in n:
                p.copy_(torch.randn(p.shape, generator=shared))
            elif n.endswith("linear_qkv.bias"):
                # each TP rank holds its own slice of the one global bias (replicas across EP agree)
                p.copy_(torch.randn(p.shape, generator=tp_gen) * 0.2)
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
    logits, mtp_logits = ds.forward_mtp(model) if mtp else (forward(model), [])
    prints = moe_oracle.expert_fingerprints(model, c["layers"], c["experts"], ep)
    if rank == 0:
        moe_oracle.write_saved_run(run_dir, prints, logits, V, h, mtp_logits)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, case, tp, ep, mtp):
    import torch.multiprocessing as mp
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(tp * ep, tempfile.mktemp(), run_dir, case, tp, ep, mtp), nprocs=tp * ep, join=True)
    return {"ok": True}


def load_legacy_worker(rank, world, init_file, run_dir, hf_dir, tp, ep, mtp, out_file):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    init(rank, world, tp, ep, init_file)
    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    it = open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")).read().strip()
    t, e = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    d = os.path.join(run_dir, f"iter_{int(it):07d}", f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else ""), "model_optim_rng.pt")
    sd = torch.load(d, map_location="cpu", weights_only=False)["model"]
    model = build(c, sd["embedding.word_embeddings.weight"].shape[0] * tp, mtp=mtp)
    model.load_state_dict(sd, strict=True)
    logits, mtp_logits = ds.forward_mtp(model) if mtp else (forward(model), [])
    if rank == 0:
        json.dump({"keys": len(sd), **_compare(c, logits, mtp_logits, ds.hf_outputs(hf_dir), mtp)}, open(out_file, "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_load_legacy(run_dir, hf_dir, tp, ep, mtp):
    import torch.multiprocessing as mp
    out = tempfile.mktemp()
    mp.spawn(load_legacy_worker, args=(tp * ep, tempfile.mktemp(), run_dir, hf_dir, tp, ep, mtp, out), nprocs=tp * ep, join=True)
    return json.load(open(out))


def main():
    a = sys.argv[1:]
    opt = lambda k, d: int(a[a.index(k) + 1]) if k in a else d  # noqa: E731
    if a[0] == "make":
        r = cmd_make(a[1], a[2])
    elif a[0] == "compare":
        r = ds.cmd_compare(a[1], a[2])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2], "--mtp" in a)
    elif a[0] == "save":
        r = cmd_save(a[1], a[2], opt("--tp", 1), opt("--ep", 1), "--mtp" in a)
    elif a[0] == "load_legacy":
        r = cmd_load_legacy(a[1], a[2], opt("--tp", 1), opt("--ep", 1), "--mtp" in a)
    elif a[0] == "check_hf":
        r = ds.cmd_check_hf(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
