"""Megatron-FSDP fsdp_dtensor checkpoints for the interop tests, written by this harness following
Megatron-LM's source (fsdp_dtensor_checkpoint.py / preprocess_fsdp_dtensor_state_dict): Megatron-FSDP
itself needs CUDA, so the layout is reproduced with real torch.distributed.checkpoint and DTensors.

  make <run_dir> <hf_dir>
      from the HF model: the Megatron GPT global tensors (per-query-group QKV, TE-fused norm names),
      one key per layer under the prefix model.module., SwiGLU fc1 split into weight_w / weight_v,
      every tensor a DTensor row-sharded unevenly over 2 gloo ranks (Shard(0)), plus
      checkpoint_version and iteration; iter_0000001/ and latest_checkpointed_iteration.txt
  expected <hf_dir> <out.pt>
      the same model state dict (what a correct fsdp_dtensor checkpoint must hold), torch.save'd
  dump <iter_dir> <out.pt>
      dcp_to_torch_save of a checkpoint (to compare shardshift's output with `expected`)
"""
import os
import sys
import tempfile

import torch
import torch.distributed.checkpoint as dcp


def megatron_state(hf_dir):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(hf_dir)
    sd = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    nq, ng = cfg.num_attention_heads, cfg.num_key_value_heads
    hn = getattr(cfg, "head_dim", None) or H // nq
    r = nq // ng
    vocab = cfg.vocab_size
    padded = ((vocab + 127) // 128) * 128
    pad = lambda w: torch.cat([w, torch.zeros(padded - vocab, w.shape[1], dtype=w.dtype)])
    out = {"module.embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"])}
    for i in range(L):
        p, m = f"model.layers.{i}.", f"module.decoder.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(ng, r * hn, H)
        k = sd[p + "self_attn.k_proj.weight"].view(ng, hn, H)
        v = sd[p + "self_attn.v_proj.weight"].view(ng, hn, H)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, H)
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = sd[p + "input_layernorm.weight"]
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[m + "mlp.linear_fc1.layer_norm_weight"] = sd[p + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight_w"] = sd[p + "mlp.gate_proj.weight"]
        out[m + "mlp.linear_fc1.weight_v"] = sd[p + "mlp.up_proj.weight"]
        out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    out["module.decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["module.output_layer.weight"] = pad(sd["lm_head.weight"])
    return out


def worker(rank, world, init_file, run_dir, hf_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard, Replicate
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    state = megatron_state(hf_dir)
    model = {k: distribute_tensor(v, mesh, [Shard(0)] if v.shape[0] > 1 else [Replicate()]) for k, v in state.items()}
    iter_dir = os.path.join(run_dir, "iter_0000001")
    dcp.save({"model": model, "checkpoint_version": 3.0, "iteration": 1}, checkpoint_id=iter_dir)
    if rank == 0:
        with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("1")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        import torch.multiprocessing as mp
        os.makedirs(sys.argv[2], exist_ok=True)
        mp.spawn(worker, args=(2, tempfile.mktemp(), sys.argv[2], sys.argv[3]), nprocs=2, join=True)
    elif cmd == "expected":
        torch.save({"model": megatron_state(sys.argv[2])}, sys.argv[3])
    elif cmd == "dump":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown command {cmd}")
