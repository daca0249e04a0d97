"""Real megatron-core (0.16.1, CPU, gloo) and transformers as oracles for MoE models.

  make <hf_dir> <case>
      a tiny random HF MoE model (fp32, random norms so misplaced ones show) saved with
      save_pretrained; cases: mixtral, qwen3_moe, qwen3_moe_mixed (mlp_only_layers = [1])
  load <iter_dir> <hf_dir>
      the GPTModel with MoE layers (local spec, SequentialMLP) matching the HF config loads the
      torch_dist checkpoint with dist_checkpointing.load(strict=RAISE_ALL); its logits are compared
      with transformers' (JSON: max_abs_diff)
  save <run_dir> <case> [--ep N] [--tp M] [--legacy]
      megatron-core saves a random MoE GPTModel under EP=N, TP=M (N×M gloo ranks) with
      dist_checkpointing.save; writes its logits, an equivalent HF config (hf_ref/) and, per global
      expert, a fingerprint (the expert's fc2 weight sum) so expert placement can be checked;
      --legacy writes Megatron-LM's --ckpt-format torch files instead (mp_rank_TT[_EEE]/
      model_optim_rng.pt with state_dict_for_save_checkpoint(): local experts, TP shards)
  load_legacy <run_dir> <hf_dir> --ep N --tp M
      every rank of an EP=N × TP=M megatron-core model loads shardshift's legacy rank file strictly
      (load_state_dict(strict=True)); the logits must equal transformers' (JSON)
  check_hf <hf_dir> <run_dir>
      from_pretrained(hf_dir) loads with no missing/unexpected keys; logits vs megatron-core's and
      each HF expert's fingerprint vs the saved one (JSON)
"""
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import TOKENS, forward, shims  # noqa: E402
from megatron_oracle import build as megatron_build  # noqa: E402

CASES = {
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], qk=False),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], qk=True),
    "qwen3_moe_mixed": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], qk=True, mlp_only=[1]),
}
E, TOPK, H, HEADS, GROUPS, HD, FFN, MOE_FFN, V, LAYERS = 8, 2, 64, 4, 2, 16, 96, 48, 100, 3


def hf_config(case, tied=False):
    from transformers import AutoConfig
    c = CASES[case]
    kw = dict(
        model_type=c["model_type"], architectures=c["architectures"], vocab_size=V, hidden_size=H,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HD,
        max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied,
        num_experts_per_tok=TOPK, dtype="float32",
    )
    if c["model_type"] == "mixtral":
        kw.update(num_local_experts=E, intermediate_size=MOE_FFN)
    else:
        kw.update(num_experts=E, moe_intermediate_size=MOE_FFN, intermediate_size=FFN, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=c.get("mlp_only", []))
    return AutoConfig.for_model(**kw)


def cmd_make(hf_dir, case):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(7)
    m = AutoModelForCausalLM.from_config(hf_config(case), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif "gate.weight" in n:  # a router with real preferences
                p.copy_(torch.randn_like(p))
    m.save_pretrained(hf_dir)
    return {"ok": True}


def mcore_cfg(h):
    """The TransformerConfig fields of an HF MoE config."""
    mt = h.model_type
    only = list(getattr(h, "mlp_only_layers", []) or [])
    freq = [0 if i in only else 1 for i in range(h.num_hidden_layers)]
    return dict(
        layers=h.num_hidden_layers, hidden=h.hidden_size, heads=h.num_attention_heads, groups=h.num_key_value_heads,
        head_dim=getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads, eps=h.rms_norm_eps,
        qk=mt == "qwen3_moe", tied=bool(h.tie_word_embeddings), max_pos=h.max_position_embeddings,
        rope_theta=(getattr(h, "rope_parameters", None) or {}).get("rope_theta", 10000.0), vocab=h.vocab_size,
        experts=h.num_local_experts if mt == "mixtral" else h.num_experts, topk=h.num_experts_per_tok,
        moe_ffn=h.intermediate_size if mt == "mixtral" else h.moe_intermediate_size,
        ffn=h.intermediate_size, freq=freq if 0 in freq else 1,
        pre_softmax=mt == "qwen3_moe" and not getattr(h, "norm_topk_prob", True),
    )


def build(c, padded_vocab):
    """megatron_oracle's GPTModel with MoE layers (SequentialMLP, local spec, dropless)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    extra = dict(
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(), sequence_parallel=False,
        num_moe_experts=c["experts"], moe_router_topk=c["topk"], moe_ffn_hidden_size=c["moe_ffn"],
        moe_layer_freq=c["freq"], moe_router_pre_softmax=c["pre_softmax"], moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",  # alltoall needs CUDA streams
        moe_grouped_gemm=False,
    )
    spec = lambda cfg: get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")  # noqa: E731
    return megatron_build(c, padded_vocab, extra=extra, block_spec=spec)


def moe_shims():
    """megatron-core 0.16.1's router GEMM names te_general_gemm, only defined when TE imports."""
    import megatron.core.transformer.moe.moe_utils as mu
    if not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


def init(rank, world, tp, ep, init_file):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    shims()
    moe_shims()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    torch.manual_seed(1234)


def hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM
    m, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return m.eval()(TOKENS).logits, info, m


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    init(0, 1, 1, 1, tempfile.mktemp())
    model = build(c, ((c["vocab"] + 127) // 128) * 128)
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k: v for k, v in sd.items() if k not in common}, strict=True)
    logits = forward(model)[..., : c["vocab"]]
    ref, _, _ = hf_logits(hf_dir)
    return {"max_abs_diff": (logits - ref).abs().max().item(), "max_abs": ref.abs().max().item()}


def save_worker(rank, world, init_file, run_dir, case, tp, ep, legacy=False):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    init(rank, world, tp, ep, init_file)
    c = mcore_cfg(hf_config(case))
    model = build(c, 128)
    # CPU initialisation draws full weights from the same seed on every rank and slices them, so
    # TP shards and replicas agree; then norms and routers get random values (same on all ranks)
    # and each expert shard its own, so experts differ across EP ranks and a misplaced one shows.
    shared = torch.Generator().manual_seed(99)
    own = torch.Generator().manual_seed(1000 + 10 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "local_experts" in n:
                p.copy_(torch.randn(p.shape, generator=own) * 0.05)
            elif "norm" in n:
                p.copy_(torch.randn(p.shape, generator=shared) * 0.5 + 1.0)
            elif "router" in n:
                p.copy_(torch.randn(p.shape, generator=shared))
    iter_dir = os.path.join(run_dir, "iter_0000002")
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    torch.distributed.barrier()
    if legacy:
        import argparse
        t, e = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
        d = os.path.join(iter_dir, f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else ""))
        os.makedirs(d, exist_ok=True)
        args = argparse.Namespace(
            num_layers=c["layers"], hidden_size=c["hidden"], ffn_hidden_size=c["ffn"], num_attention_heads=c["heads"],
            group_query_attention=True, num_query_groups=c["groups"], kv_channels=c["head_dim"], padded_vocab_size=128,
            vocab_size=V, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, expert_model_parallel_size=ep,
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(), num_experts=c["experts"],
            swiglu=True, normalization="RMSNorm", untie_embeddings_and_output_weights=True, qk_layernorm=c["qk"],
            ckpt_format="torch", iteration=2,
        )
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 2, "model": model.state_dict_for_save_checkpoint()},
                   os.path.join(d, "model_optim_rng.pt"))
    else:
        dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    logits = forward(model)
    # Fingerprints of the experts this rank holds, by global index.
    ep_rank = ps.get_expert_model_parallel_rank()
    prints = {}
    for n, p in model.named_parameters():
        if "local_experts" in n and n.endswith("linear_fc2.weight"):
            layer = int(n.split("decoder.layers.")[1].split(".")[0])
            local = int(n.split("local_experts.")[1].split(".")[0])
            g = ep_rank * (c["experts"] // ep) + local
            full = p.detach().clone()
            if ps.get_expert_tensor_parallel_world_size() > 1:
                parts = [torch.empty_like(full) for _ in range(ps.get_expert_tensor_parallel_world_size())]
                torch.distributed.all_gather(parts, full, group=ps.get_expert_tensor_parallel_group())
                full = torch.cat(parts, dim=1)
            prints[f"{layer}.{g}"] = full.double().sum().item()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, prints)
    if rank == 0:
        merged = {}
        for g in gathered:
            merged.update(g)
        json.dump(merged, open(os.path.join(run_dir, "experts.json"), "w"))
        torch.save(logits[..., :V], os.path.join(run_dir, "logits.pt"))
        with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
        hf_config(case).save_pretrained(os.path.join(run_dir, "hf_ref"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, case, tp, ep, legacy=False):
    import torch.multiprocessing as mp
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(tp * ep, tempfile.mktemp(), run_dir, case, tp, ep, legacy), nprocs=tp * ep, join=True)
    return {"ok": True}


def load_legacy_worker(rank, world, init_file, run_dir, hf_dir, tp, ep, out_file):
    from transformers import AutoConfig
    from megatron.core import parallel_state as ps

    init(rank, world, tp, ep, init_file)
    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    model = build(c, -(-c["vocab"] // (128 * tp)) * 128 * tp)  # shardshift pads to 128 × tp
    it = open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")).read().strip()
    t, e = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
    d = os.path.join(run_dir, f"iter_{int(it):07d}", f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else ""), "model_optim_rng.pt")
    sd = torch.load(d, map_location="cpu", weights_only=False)["model"]
    model.load_state_dict(sd, strict=True)
    logits = forward(model)
    if rank == 0:
        ref, _, _ = hf_logits(hf_dir)
        json.dump({"max_abs_diff": (logits[..., : c["vocab"]] - ref).abs().max().item()}, open(out_file, "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_load_legacy(run_dir, hf_dir, tp, ep):
    import torch.multiprocessing as mp
    out = tempfile.mktemp()
    mp.spawn(load_legacy_worker, args=(tp * ep, tempfile.mktemp(), run_dir, hf_dir, tp, ep, out), nprocs=tp * ep, join=True)
    return json.load(open(out))


def expert_fingerprints(model, num_layers, num_experts, ep):
    """Every global expert's fingerprint (its fc2 weight sum, gathered over expert-TP), keyed
    "<HF layer>.<global expert>" — the MTP block's layer k as HF layer num_layers + k — merged over
    all ranks. Called on every rank (collectives)."""
    from megatron.core import parallel_state as ps
    ep_rank = ps.get_expert_model_parallel_rank()
    prints = {}
    for n, p in model.named_parameters():
        if "local_experts" in n and n.endswith("linear_fc2.weight"):
            layer = num_layers + int(n.split("mtp.layers.")[1].split(".")[0]) if n.startswith("mtp.") else int(n.split("decoder.layers.")[1].split(".")[0])
            g = ep_rank * (num_experts // ep) + int(n.split("local_experts.")[1].split(".")[0])
            full = p.detach().clone()
            if ps.get_expert_tensor_parallel_world_size() > 1:
                parts = [torch.empty_like(full) for _ in range(ps.get_expert_tensor_parallel_world_size())]
                torch.distributed.all_gather(parts, full, group=ps.get_expert_tensor_parallel_group())
                full = torch.cat(parts, dim=1)
            prints[f"{layer}.{g}"] = full.double().sum().item()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, prints)
    merged = {}
    for g in gathered:
        merged.update(g)
    return merged


def write_saved_run(run_dir, prints, logits, vocab, hf_config, mtp_logits=None):
    """Rank 0's record of a megatron-core save: expert fingerprints, logits (and MTP logits), the
    tracker file for iteration 2 and the equivalent HF config (hf_ref/) check_hf compares against."""
    json.dump(prints, open(os.path.join(run_dir, "experts.json"), "w"))
    torch.save(logits[..., :vocab], os.path.join(run_dir, "logits.pt"))
    if mtp_logits:
        torch.save([x[..., :vocab] for x in mtp_logits], os.path.join(run_dir, "mtp_logits.pt"))
    with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2")
    hf_config.save_pretrained(os.path.join(run_dir, "hf_ref"))


def cmd_check_hf(hf_dir, run_dir):
    ref = torch.load(os.path.join(run_dir, "logits.pt"))
    logits, info, m = hf_logits(hf_dir)
    prints = json.load(open(os.path.join(run_dir, "experts.json")))
    wrong = []
    sd = m.state_dict()
    for key, want in prints.items():
        layer, g = map(int, key.split("."))
        down = sd[f"model.layers.{layer}.mlp.experts.down_proj"][g]  # transformers 5 fuses experts in memory
        got = down.double().sum().item()
        if abs(got - want) > 1e-9 * max(1.0, abs(want)):
            wrong.append(key)
    return {
        "max_abs_diff": (logits - ref).abs().max().item(),
        "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"]),
        "experts_checked": len(prints), "experts_misplaced": wrong,
    }


def main():
    a = sys.argv[1:]
    opt = lambda k, d: int(a[a.index(k) + 1]) if k in a else d  # noqa: E731
    if a[0] == "make":
        r = cmd_make(a[1], a[2])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    elif a[0] == "save":
        r = cmd_save(a[1], a[2], opt("--tp", 1), opt("--ep", 1), "--legacy" in a)
    elif a[0] == "load_legacy":
        r = cmd_load_legacy(a[1], a[2], opt("--tp", 1), opt("--ep", 1))
    elif a[0] == "check_hf":
        r = cmd_check_hf(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
