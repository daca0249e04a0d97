"""Real megatron-core (0.16.1, CPU, gloo) and transformers as oracles for OLMoE (OlmoeForCausalLM).

  make <hf_dir>
      a tiny random OlmoeForCausalLM (fp32; random full-width q/k norms and other norms, a router
      with real preferences) saved with save_pretrained
  load <iter_dir> <hf_dir>
      megatron-core's MoE GPTModel (local spec, SequentialMLP) with Megatron-Bridge's OLMoE attention
      (full-width q/k layernorms, below) loads the torch_dist checkpoint with dist_checkpointing.load
      (strict=RAISE_ALL); logits vs transformers' (JSON)
  save <run_dir> [--ep N]
      megatron-core saves that model at EP=N (TP=1: the OLMoE attention normalises all heads, which a
      TP shard does not hold), with its logits, an equivalent HF config (hf_ref/) and per global
      expert a fingerprint (experts.json)
  check_hf <hf_dir> <run_dir>
      moe_oracle's check_hf: clean from_pretrained, logits vs megatron-core's, expert placement

OLMoESelfAttention is Megatron-Bridge's (src/megatron/bridge/models/olmoe/olmoe_provider.py at
NVIDIA-NeMo/Megatron-Bridge 067f987d), copied so the oracle needs no Bridge install; only the TE
SplitAlongDim branch is left out (no TE here: torch.split, as the Bridge does without TE).
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
from megatron_oracle import build as megatron_build  # noqa: E402
import moe_oracle  # noqa: E402

V = 100
KW = dict(
    vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=None,
    max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def hf_config():
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type="olmoe", architectures=["OlmoeForCausalLM"], dtype="float32",
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **KW)


def cmd_make(hf_dir):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(7)
    m = AutoModelForCausalLM.from_config(hf_config(), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif "gate.weight" in n:
                p.copy_(torch.randn_like(p))
    m.save_pretrained(hf_dir)
    return {"ok": True}


def olmoe_attention():
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.spec_utils import build_module

    class OLMoESelfAttention(SelfAttention):
        """Megatron-Bridge's: q/k layernorms over hidden_size_per_attention_head x num_attention_heads."""

        def __init__(self, config, submodules, layer_number, attn_mask_type=None, cp_comm_type=None, pg_collection=None, **kwargs):
            from megatron.core.transformer.enums import AttnMaskType
            super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                             attn_mask_type=attn_mask_type or AttnMaskType.padding, cp_comm_type=cp_comm_type,
                             pg_collection=pg_collection)
            self.q_layernorm = build_module(submodules.q_layernorm, hidden_size=self.hidden_size_per_attention_head * self.config.num_attention_heads,
                                            config=self.config, eps=self.config.layernorm_epsilon)
            self.k_layernorm = build_module(submodules.k_layernorm, hidden_size=self.hidden_size_per_attention_head * self.config.num_attention_heads,
                                            config=self.config, eps=self.config.layernorm_epsilon)

        def get_query_key_value_tensors(self, hidden_states, key_value_states=None, **kwargs):
            mixed_qkv, _ = self.linear_qkv(hidden_states)
            new_tensor_shape = mixed_qkv.size()[:-1] + (
                self.num_query_groups_per_partition,
                (self.num_attention_heads_per_partition // self.num_query_groups_per_partition + 2) * self.hidden_size_per_attention_head,
            )
            mixed_qkv = mixed_qkv.view(*new_tensor_shape)
            split_arg_list = [
                self.num_attention_heads_per_partition // self.num_query_groups_per_partition * self.hidden_size_per_attention_head,
                self.hidden_size_per_attention_head,
                self.hidden_size_per_attention_head,
            ]
            (query, key, value) = torch.split(mixed_qkv, split_arg_list, dim=3)
            query = query.reshape(query.size(0), query.size(1), -1, self.hidden_size_per_attention_head)
            query = query.reshape(query.size(0), query.size(1), -1)
            key = key.reshape(key.size(0), key.size(1), -1)
            query = self.q_layernorm(query)
            key = self.k_layernorm(key)
            query = query.view(query.size(0), query.size(1), -1, self.hidden_size_per_attention_head)
            key = key.view(key.size(0), key.size(1), -1, self.hidden_size_per_attention_head)
            return query, key, value

    return OLMoESelfAttention


def mcore_cfg(h):
    return dict(
        layers=h.num_hidden_layers, hidden=h.hidden_size, heads=h.num_attention_heads, groups=h.num_key_value_heads,
        head_dim=h.hidden_size // h.num_attention_heads, eps=h.rms_norm_eps, qk=True, tied=False,
        max_pos=h.max_position_embeddings, rope_theta=(getattr(h, "rope_parameters", None) or {}).get("rope_theta", 10000.0),
        vocab=h.vocab_size, experts=h.num_experts, topk=h.num_experts_per_tok, moe_ffn=h.intermediate_size,
        ffn=h.intermediate_size, pre_softmax=not h.norm_topk_prob,
    )


def build(c, padded_vocab):
    import dataclasses
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    attn = olmoe_attention()

    def spec(cfg):
        block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
        layers = []
        for s in block.layer_specs:
            sa = dataclasses.replace(s.submodules.self_attention, module=attn)
            layers.append(dataclasses.replace(s, submodules=dataclasses.replace(s.submodules, self_attention=sa)))
        return dataclasses.replace(block, layer_specs=layers)

    extra = dict(
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(), sequence_parallel=False,
        num_moe_experts=c["experts"], moe_router_topk=c["topk"], moe_ffn_hidden_size=c["moe_ffn"],
        moe_router_pre_softmax=c["pre_softmax"], moe_router_score_function="softmax", moe_router_dtype="fp32",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
    )
    return megatron_build(c, padded_vocab, extra=extra, block_spec=spec)


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    moe_oracle.init(0, 1, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    model = build(c, meta["embedding.word_embeddings.weight"].global_shape[0])
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k: v for k, v in sd.items() if k not in common}, strict=True)
    logits = forward(model)[..., : c["vocab"]]
    ref, _, _ = moe_oracle.hf_logits(hf_dir)
    q = [k for k in meta if k.endswith("q_layernorm.weight")]
    return {"max_abs_diff": (logits - ref).abs().max().item(), "q_layernorm_shape": list(meta[q[0]].global_shape) if q else None}


def save_worker(rank, world, init_file, run_dir, ep):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    moe_oracle.init(rank, world, 1, ep, init_file)
    h = hf_config()
    c = mcore_cfg(h)
    model = build(c, 128)
    shared = torch.Generator().manual_seed(99)
    own = torch.Generator().manual_seed(1000 + ps.get_expert_model_parallel_rank())
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
    dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    logits = forward(model)
    prints = moe_oracle.expert_fingerprints(model, c["layers"], c["experts"], ep)
    if rank == 0:
        moe_oracle.write_saved_run(run_dir, prints, logits, V, h)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, ep):
    import torch.multiprocessing as mp
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(ep, tempfile.mktemp(), run_dir, ep), nprocs=ep, join=True)
    return {"ok": True}


def main():
    a = sys.argv[1:]
    opt = lambda k, d: int(a[a.index(k) + 1]) if k in a else d  # noqa: E731
    if a[0] == "make":
        r = cmd_make(a[1])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    elif a[0] == "save":
        r = cmd_save(a[1], opt("--ep", 1))
    elif a[0] == "check_hf":
        r = moe_oracle.cmd_check_hf(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
