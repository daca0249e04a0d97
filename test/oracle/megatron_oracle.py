"""Real megatron-core (0.16.1, CPU, gloo) as the oracle for HF <-> Megatron torch_dist.

  load <iter_dir> <hf_dir>
      build the GPTModel that matches the HF config (local, TE-free layer spec), load the
      checkpoint with dist_checkpointing.load in strict mode (RAISE_ALL), run a forward pass and
      compare its logits with transformers' logits of the HF model (JSON: max_abs_diff)
  save <run_dir> <case> [--tp N] [--pp M] [--tied]
      megatron-core saves a randomly initialised GPTModel with dist_checkpointing.save (under TP=N,
      PP=M with N×M gloo ranks) in the Megatron-LM run layout (iter_0000001/ + tracker), writes the logits
      of its forward pass and an equivalent HF config (<run_dir>/hf_ref/config.json)
  save_legacy <run_dir> <case> [--tp N] [--pp M] [--tied]
      the same model saved the way Megatron-LM's save_checkpoint writes --ckpt-format torch:
      iter_0000005/mp_rank_TT[_PPP]/model_optim_rng.pt per rank with the model's
      state_dict_for_save_checkpoint() (its TP shard, local layer numbers), args, checkpoint_version,
      iteration and RNG state (python, numpy, torch) — plus logits and hf_ref as for save
  load_legacy <run_dir> <hf_dir> [--tp N] [--pp M]
      real megatron-core loads shardshift's legacy per-rank files strictly (load_state_dict) into the
      GPTModel of each rank and runs the pipeline; its logits must equal transformers' (JSON)
  check_hf <hf_dir> <run_dir>
      AutoModelForCausalLM.from_pretrained(hf_dir) loads with no missing or unexpected keys and
      its logits equal the saved megatron-core logits (JSON)

The CPU shims are the ones docs/research/megatron-cpu.md explains (megatron-core hard-codes CUDA
in rotary embeddings, the checkpoint writer and the RNG tracker).
"""
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

TOKENS = torch.tensor([[1, 5, 9, 13, 2, 96, 40, 7], [3, 3, 80, 11, 0, 64, 22, 95]])
FAMILY_CASES = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], qk=False, bias=False),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], qk=False, bias=True),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], qk=True, bias=False),
}


def shims():
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *a, **k: None


def init(rank, world, tp, init_file, pp=1):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    shims()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    torch.manual_seed(1234)


def build(c, padded_vocab, extra=None, block_spec=None):
    """GPTModel for a config dict with keys as below (local spec, fp32); `extra` adds
    TransformerConfig fields, `block_spec(config)` replaces the layer spec (e.g. MoE blocks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cfg = TransformerConfig(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"],
        num_query_groups=c["groups"], ffn_hidden_size=c["ffn"], kv_channels=c["head_dim"],
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        layernorm_epsilon=c["eps"], add_bias_linear=False, add_qkv_bias=c.get("bias", False), qk_layernorm=c["qk"],
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        **(extra or {}),
    )
    # Tied embeddings with PP>1: GPTModel moves the last stage's copy with .cuda(); keep it on CPU.
    orig_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        model = GPTModel(
        config=cfg,
        transformer_layer_spec=block_spec(cfg) if block_spec else get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=c["qk"]),
        vocab_size=padded_vocab, max_sequence_length=c["max_pos"], pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), parallel_output=False, share_embeddings_and_output_weights=c["tied"],
        position_embedding_type="rope", rotary_base=c["rope_theta"],
        )
    finally:
        torch.Tensor.cuda = orig_cuda
    return model.eval()


def forward(model):
    """Logits on the last pipeline stage (None elsewhere); stages pass activations by send/recv."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    B, S = TOKENS.shape
    pos = torch.arange(S).unsqueeze(0).expand_as(TOKENS)
    mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)
    pp = ps.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if pp == 1:
            return model(TOKENS, pos, attention_mask=mask)
        stage = ps.get_pipeline_model_parallel_rank()
        if stage > 0:
            buf = torch.empty((S, B, model.config.hidden_size), dtype=torch.float32)
            dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        out = model(TOKENS, pos, attention_mask=mask)
        if stage < pp - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return out


def cfg_from_hf(hf_dir):
    from transformers import AutoConfig
    h = AutoConfig.from_pretrained(hf_dir)
    rp = getattr(h, "rope_parameters", None) or {}
    fam = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[h.model_type]
    return dict(
        layers=h.num_hidden_layers, hidden=h.hidden_size, heads=h.num_attention_heads,
        groups=h.num_key_value_heads, ffn=h.intermediate_size,
        head_dim=getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads,
        eps=h.rms_norm_eps, bias=FAMILY_CASES[fam]["bias"], qk=FAMILY_CASES[fam]["qk"],
        tied=bool(h.tie_word_embeddings), max_pos=h.max_position_embeddings,
        rope_theta=rp.get("rope_theta", getattr(h, "rope_theta", 10000.0)), vocab=h.vocab_size,
    )


def hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM
    m, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return m.eval()(TOKENS).logits, info


def cmd_load(iter_dir, hf_dir):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    c = cfg_from_hf(hf_dir)
    init(0, 1, 1, tempfile.mktemp())
    emb_rows = json.load(open(os.path.join(iter_dir, "..", "padded_vocab.json")))["rows"] if os.path.exists(os.path.join(iter_dir, "..", "padded_vocab.json")) else None
    padded = emb_rows or ((c["vocab"] + 127) // 128) * 128
    model = build(c, padded)
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    # dist_checkpointing.load merges common.pt (args, iteration ...) into the state dict, as
    # Megatron-LM's load_checkpoint then separates: keep the model's keys, strictly.
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k: v for k, v in sd.items() if k not in common}, strict=True)
    logits = forward(model)[..., : c["vocab"]]
    ref, _ = hf_logits(hf_dir)
    return {"max_abs_diff": (logits - ref).abs().max().item(), "shape": list(logits.shape)}


def save_worker(rank, world, init_file, run_dir, case, tied, tp, pp):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    init(rank, world, tp, init_file, pp)
    fam = FAMILY_CASES[case]
    c = dict(layers=2, hidden=64, heads=4, groups=2, ffn=96, head_dim=16 if fam["qk"] else 16, eps=1e-6,
             bias=fam["bias"], qk=fam["qk"], tied=tied, max_pos=64, rope_theta=10000.0, vocab=100)
    model = build(c, 128)
    with torch.no_grad():  # random norms and biases, so a misplaced one shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
        for n, p in model.named_parameters():  # keep TP replicas of replicated params consistent
            if "norm" in n or (n.endswith("bias") and "linear_qkv" not in n):
                torch.distributed.broadcast(p, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
        if tied and pp > 1:  # the last stage's copy of the tied embedding equals the first stage's
            w = model.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(w, group=ps.get_embedding_group())
            w.div_(2)
    iter_dir = os.path.join(run_dir, "iter_0000001")
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    logits = forward(model)
    last = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if last:
        torch.save(logits[..., :100], os.path.join(run_dir, "logits.pt"))
    if rank == 0:
        with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")
        hf = AutoConfig.for_model(
            model_type=fam["model_type"], architectures=fam["architectures"], vocab_size=100, hidden_size=64,
            intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied,
        )
        hf.save_pretrained(os.path.join(run_dir, "hf_ref"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, case, tp, pp, tied):
    import torch.multiprocessing as mp
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(tp * pp, tempfile.mktemp(), run_dir, case, tied, tp, pp), nprocs=tp * pp, join=True)


def legacy_worker(rank, world, init_file, run_dir, case, tied, tp, pp):
    import argparse
    import random
    import numpy as np
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    init(rank, world, tp, init_file, pp)
    fam = FAMILY_CASES[case]
    c = dict(layers=4, hidden=64, heads=4, groups=2, ffn=96, head_dim=16, eps=1e-6,
             bias=fam["bias"], qk=fam["qk"], tied=tied, max_pos=64, rope_theta=10000.0, vocab=100)
    model = build(c, 128)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
        for n, p in model.named_parameters():
            if "norm" in n or (n.endswith("bias") and "linear_qkv" not in n):
                torch.distributed.broadcast(p, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
        if tied and pp > 1:
            w = model.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(w, group=ps.get_embedding_group())
            w.div_(2)
    t, s_ = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{t:02d}" + (f"_{s_:03d}" if pp > 1 else "")
    d = os.path.join(run_dir, "iter_0000005", name)
    os.makedirs(d, exist_ok=True)
    args = argparse.Namespace(
        num_layers=c["layers"], hidden_size=c["hidden"], ffn_hidden_size=c["ffn"], num_attention_heads=c["heads"],
        group_query_attention=True, num_query_groups=c["groups"], kv_channels=c["head_dim"], padded_vocab_size=128,
        vocab_size=100, make_vocab_size_divisible_by=64, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        swiglu=True, normalization="RMSNorm", untie_embeddings_and_output_weights=not tied, add_qkv_bias=c["bias"],
        qk_layernorm=c["qk"], params_dtype=torch.float32, ckpt_format="torch", iteration=5,
        # The model-shape fields Megatron-LM's argparse always records (verify --logits reads them).
        norm_epsilon=c["eps"], position_embedding_type="rope", rotary_base=int(c["rope_theta"]), rotary_percent=1.0,
    )
    state = {
        "args": args, "checkpoint_version": 3.0, "iteration": 5,
        "model": model.state_dict_for_save_checkpoint(),
        "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None, "rng_tracker_states": None}],
        "num_floating_point_operations_so_far": 0,
    }
    torch.save(state, os.path.join(d, "model_optim_rng.pt"))
    logits = forward(model)
    if ps.is_pipeline_last_stage() and t == 0:
        torch.save(logits[..., :100], os.path.join(run_dir, "logits.pt"))
    if rank == 0:
        with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("5")
        hf = AutoConfig.for_model(
            model_type=fam["model_type"], architectures=fam["architectures"], vocab_size=100, hidden_size=64,
            intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied,
        )
        hf.save_pretrained(os.path.join(run_dir, "hf_ref"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def load_legacy_worker(rank, world, init_file, run_dir, hf_dir, tp, pp, out_file):
    from megatron.core import parallel_state as ps
    init(rank, world, tp, init_file, pp)
    c = cfg_from_hf(hf_dir)
    padded = ((c["vocab"] + 128 * tp - 1) // (128 * tp)) * 128 * tp
    model = build(c, padded)
    t, s_ = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    iters = sorted(d for d in os.listdir(run_dir) if d.startswith("iter_"))
    name = f"mp_rank_{t:02d}" + (f"_{s_:03d}" if pp > 1 else "")
    state = torch.load(os.path.join(run_dir, iters[-1], name, "model_optim_rng.pt"), weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    logits = forward(model)
    if ps.is_pipeline_last_stage() and t == 0:
        torch.save(logits[..., : c["vocab"]], out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_load_legacy(run_dir, hf_dir, tp, pp):
    import torch.multiprocessing as mp
    out_file = tempfile.mktemp(suffix=".pt")
    mp.spawn(load_legacy_worker, args=(tp * pp, tempfile.mktemp(), run_dir, hf_dir, tp, pp, out_file), nprocs=tp * pp, join=True)
    logits = torch.load(out_file)
    ref, _ = hf_logits(hf_dir)
    return {"max_abs_diff": (logits - ref).abs().max().item(), "shape": list(logits.shape)}


def cmd_check_hf(hf_dir, run_dir):
    logits, info = hf_logits(hf_dir)
    ref = torch.load(os.path.join(run_dir, "logits.pt"))
    return {
        "max_abs_diff": (logits - ref).abs().max().item(),
        "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
    }


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "load":
        print(json.dumps(cmd_load(sys.argv[2], sys.argv[3])))
    elif cmd == "save":
        args = sys.argv[2:]
        tp = int(args[args.index("--tp") + 1]) if "--tp" in args else 1
        pp = int(args[args.index("--pp") + 1]) if "--pp" in args else 1
        cmd_save(args[0], args[1], tp, pp, "--tied" in args)
    elif cmd in ("save_legacy", "load_legacy"):
        args = sys.argv[2:]
        tp = int(args[args.index("--tp") + 1]) if "--tp" in args else 1
        pp = int(args[args.index("--pp") + 1]) if "--pp" in args else 1
        import torch.multiprocessing as mp
        if cmd == "save_legacy":
            os.makedirs(args[0], exist_ok=True)
            mp.spawn(legacy_worker, args=(tp * pp, tempfile.mktemp(), args[0], args[1], "--tied" in args, tp, pp), nprocs=tp * pp, join=True)
        else:
            print(json.dumps(cmd_load_legacy(args[0], args[1], tp, pp)))
    elif cmd == "check_hf":
        print(json.dumps(cmd_check_hf(sys.argv[2], sys.argv[3])))
    else:
        raise SystemExit(f"unknown command {cmd}")
    sys.stdout.flush()
    os._exit(0)  # megatron-core leaves helper processes behind; do not wait for them
