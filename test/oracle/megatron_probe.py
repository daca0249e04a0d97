"""Megatron-Core on CPU: build a tiny GPTModel, run it, save/load a torch_dist checkpoint, and
describe exactly what lands on disk.  A starting point for shardshift's Megatron oracle.

Environment (Python 3.11, CPU only; all pins verified on a 2-core machine with no GPU):

    pip install torch==2.13.0 megatron-core==0.16.1 psutil==7.2.2 numpy==2.4.6 packaging==26.3
    pip install transformers==5.24.0      # optional: only for --hf-check (logits vs LlamaForCausalLM)

  * megatron-core 0.16.1 is the newest release that installs on Python 3.11 (0.17.0+ need >=3.12).
  * Its declared deps are only torch, numpy, packaging.  psutil is an UNDECLARED runtime dep of
    dist_checkpointing.save (filesystem_async._process_memory); without it the writer subprocess
    raises and the parent blocks forever in count_queue.join() -- always run under a timeout.
  * No TransformerEngine, apex, einops, tensorstore or flash-attn is needed (the local layer spec).

CPU shims (see apply_cpu_shims): megatron-core hard-codes CUDA in three places that this run hits:
  1. RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device()  -> patch current_device
  2. FileSystemWriterAsync.preload_tensors calls torch.cuda.synchronize()   -> patch synchronize
  3. model_parallel_cuda_manual_seed's default tracker reads the CUDA RNG    -> inference_rng_tracker
  (4. tied embeddings + PP>1 only: GPTModel.__init__ calls tensor.cuda()    -> no-op during build)
and forward() must get an explicit causal attention_mask (the default mask is built on "cuda").
Also: dist_checkpointing.save spawns a multiprocessing Manager ("spawn" context), so the caller's
main module must be import-safe (`if __name__ == "__main__":`).

Usage:
    python megatron_probe.py [--tp 1] [--pp 1] [--tied] [--bf16] [--hf-check] [--training-layout]
                             [--ckpt-dir DIR] [--json OUT.json] [--brief]
  --tp/--pp > 1   world_size = tp*pp gloo ranks via torch.multiprocessing.spawn (2-4 procs is fine
                  on 2 cores: ~8 s for 2 ranks, ~16 s for 4).
  --bf16          params in bfloat16 (+ model.bfloat16(), as Megatron-LM's Float16Module does).
  --training-layout  wrap the save like megatron/training/checkpointing.py:
                  <dir>/iter_0000010/ + <dir>/latest_checkpointed_iteration.txt, common.pt with args,
                  checkpoint_version, iteration, ..., and an rng_state ShardedObject.
Prints one JSON summary: versions, per-rank checks (forward logits vs HF Llama, strict-load
round trip, a converter-style plain-DCP checkpoint loading strictly), timings, and the on-disk
layout (files, metadata.json, common.pt, .metadata entries with chunks, pickle globals).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickletools
import shutil
import sys
import tempfile
import time
import warnings
import zipfile

warnings.filterwarnings("ignore")  # mcore warns loudly about missing TE/apex

import torch  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Tiny model definition (HF Llama-style: RMSNorm, SwiGLU, RoPE, GQA, no biases)
# ---------------------------------------------------------------------------------------------
CFG = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=100,
    max_seq=32,
    eps=1e-5,
    rope_base=10000,
)
HEAD_DIM = CFG["hidden_size"] // CFG["num_attention_heads"]
SEQ = 8
ITERATION = 10


def apply_cpu_shims():
    """The minimal monkeypatches that let megatron-core 0.16.1 run forward + dist ckpt on CPU."""
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu  # rotary inv_freq .to(current_device())
    torch.cuda.synchronize = lambda *a, **k: None  # dist_checkpointing preload_tensors


def init_parallel(rank: int, world: int, tp: int, pp: int, init_file: str):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # The normal tracker calls torch.cuda.get_rng_state(); the inference tracker's add/fork are
    # no-ops (fine: dropout is 0 and we run eval). torch.cuda.manual_seed is lazily queued on CPU.
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    torch.manual_seed(1234)


def build_model(tied: bool, dtype=torch.float32):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = TransformerConfig(
        num_layers=CFG["num_layers"],
        hidden_size=CFG["hidden_size"],
        num_attention_heads=CFG["num_attention_heads"],
        num_query_groups=CFG["num_query_groups"],
        ffn_hidden_size=CFG["ffn_hidden_size"],
        kv_channels=HEAD_DIM,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        layernorm_epsilon=CFG["eps"],
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,  # weights built on CPU (master weight then TP split)
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
    )
    # Tied embeddings with PP>1: LanguageModule.setup_embeddings_and_output_layer does
    # `weight.data = weight.data.cuda()` before all-reducing the copy on the last stage.
    orig_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=CFG["vocab_size"],
            max_sequence_length=CFG["max_seq"],
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            parallel_output=False,  # gather vocab-parallel logits
            share_embeddings_and_output_weights=tied,
            position_embedding_type="rope",
            rotary_base=CFG["rope_base"],
        )
    finally:
        torch.Tensor.cuda = orig_cuda
    if dtype == torch.bfloat16:
        # Megatron-LM training wraps the model in Float16Module, which is module.bfloat16(); without
        # it the local-spec RMSNorm weights stay float32 (they ignore params_dtype).
        model = model.bfloat16()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Reference weights in HF Llama naming, and the HF -> Megatron mapping (what the oracle checks)
# ---------------------------------------------------------------------------------------------
def reference_hf_state_dict(tied: bool, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(42)
    h, ffn, V = CFG["hidden_size"], CFG["ffn_hidden_size"], CFG["vocab_size"]
    nq, nkv = CFG["num_attention_heads"], CFG["num_query_groups"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"model.embed_tokens.weight": r(V, h)}
    for i in range(CFG["num_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1.0 + r(h)
        sd[p + "self_attn.q_proj.weight"] = r(nq * HEAD_DIM, h)
        sd[p + "self_attn.k_proj.weight"] = r(nkv * HEAD_DIM, h)
        sd[p + "self_attn.v_proj.weight"] = r(nkv * HEAD_DIM, h)
        sd[p + "self_attn.o_proj.weight"] = r(h, nq * HEAD_DIM)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + r(h)
        sd[p + "mlp.gate_proj.weight"] = r(ffn, h)
        sd[p + "mlp.up_proj.weight"] = r(ffn, h)
        sd[p + "mlp.down_proj.weight"] = r(h, ffn)
    sd["model.norm.weight"] = 1.0 + r(h)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if tied else r(V, h)
    return {k: v.to(dtype) for k, v in sd.items()}


def interleave_qkv(q, k, v):
    """Megatron linear_qkv row order: for each query group g: [q heads of g; k_g; v_g]."""
    nq, nkv = CFG["num_attention_heads"], CFG["num_query_groups"]
    per = nq // nkv
    h = q.shape[1]
    q = q.view(nkv, per * HEAD_DIM, h)
    k = k.view(nkv, HEAD_DIM, h)
    v = v.view(nkv, HEAD_DIM, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def expected_global(hf: dict, tied: bool) -> dict:
    """The global (unsharded) tensors Megatron should write, keyed by DCP key (layers stacked)."""
    L = CFG["num_layers"]

    def stack(fn):
        return torch.stack([fn(f"model.layers.{i}.") for i in range(L)])

    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": stack(
            lambda p: hf[p + "input_layernorm.weight"]
        ),
        "decoder.layers.self_attention.linear_qkv.weight": stack(
            lambda p: interleave_qkv(
                hf[p + "self_attn.q_proj.weight"],
                hf[p + "self_attn.k_proj.weight"],
                hf[p + "self_attn.v_proj.weight"],
            )
        ),
        "decoder.layers.self_attention.linear_proj.weight": stack(
            lambda p: hf[p + "self_attn.o_proj.weight"]
        ),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": stack(
            lambda p: hf[p + "post_attention_layernorm.weight"]
        ),
        "decoder.layers.mlp.linear_fc1.weight": stack(
            lambda p: torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        ),
        "decoder.layers.mlp.linear_fc2.weight": stack(lambda p: hf[p + "mlp.down_proj.weight"]),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not tied:
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def load_reference_into_model(model, hf: dict, tied: bool):
    """Slice the reference weights for this rank (TP shard, PP stage) and load them strictly."""
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    glob = expected_global(hf, tied)

    def rows(t):  # ColumnParallel: shard dim 0
        n = t.shape[0] // tp
        return t[r * n : (r + 1) * n]

    def cols(t):  # RowParallel: shard dim 1
        n = t.shape[1] // tp
        return t[:, r * n : (r + 1) * n]

    ffn = CFG["ffn_hidden_size"]
    local = {}
    for name in model.state_dict().keys():
        if name.endswith("_extra_state"):
            continue
        if name == "embedding.word_embeddings.weight":
            local[name] = rows(glob[name])
        elif name == "output_layer.weight":
            local[name] = rows(hf["lm_head.weight"])  # also the PP>1 tied copy on the last stage
        elif name == "decoder.final_layernorm.weight":
            local[name] = glob[name]
        elif name.startswith("decoder.layers."):
            li = int(name.split(".")[2])  # local layer index
            gi = model.decoder.layers[li].layer_number - 1  # layer_number: 1-based, global
            sub = name.split(".", 3)[3]
            if sub == "input_layernorm.weight":
                local[name] = glob["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][gi]
            elif sub == "pre_mlp_layernorm.weight":
                local[name] = glob["decoder.layers.mlp.linear_fc1.layer_norm_weight"][gi]
            elif sub == "self_attention.linear_qkv.weight":
                local[name] = rows(glob["decoder.layers.self_attention.linear_qkv.weight"][gi])
            elif sub == "self_attention.linear_proj.weight":
                local[name] = cols(glob["decoder.layers.self_attention.linear_proj.weight"][gi])
            elif sub == "mlp.linear_fc1.weight":
                w = glob["decoder.layers.mlp.linear_fc1.weight"][gi]
                local[name] = torch.cat([rows(w[:ffn]), rows(w[ffn:])])  # local = [gate_r; up_r]
            elif sub == "mlp.linear_fc2.weight":
                local[name] = cols(glob["decoder.layers.mlp.linear_fc2.weight"][gi])
            else:
                raise KeyError(name)
        else:
            raise KeyError(name)
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


# ---------------------------------------------------------------------------------------------
# Forward (handles PP=2 by a manual send/recv of the hidden state)
# ---------------------------------------------------------------------------------------------
def run_forward(model):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ids = torch.arange(SEQ).unsqueeze(0) * 7 % CFG["vocab_size"]
    pos = torch.arange(SEQ).unsqueeze(0)
    # True = masked out. Passing it explicitly avoids get_default_causal_mask(device="cuda").
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    pp = ps.get_pipeline_model_parallel_world_size()
    with torch.no_grad():
        if pp == 1:
            return model(ids, pos, attention_mask=mask), ids
        stage = ps.get_pipeline_model_parallel_rank()
        shape = (SEQ, 1, CFG["hidden_size"])  # [s, b, h] between stages
        if stage > 0:
            buf = torch.empty(shape, dtype=model.config.params_dtype)
            dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(buf)
        out = model(ids, pos, attention_mask=mask)
        if stage < pp - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None, ids
        return out, ids


def hf_logits(hf: dict, tied: bool, ids, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=CFG["vocab_size"],
        hidden_size=CFG["hidden_size"],
        intermediate_size=CFG["ffn_hidden_size"],
        num_hidden_layers=CFG["num_layers"],
        num_attention_heads=CFG["num_attention_heads"],
        num_key_value_heads=CFG["num_query_groups"],
        head_dim=HEAD_DIM,
        max_position_embeddings=CFG["max_seq"],
        rms_norm_eps=CFG["eps"],
        rope_theta=CFG["rope_base"],
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    m = LlamaForCausalLM(cfg).to(dtype).eval()
    m.load_state_dict(hf, strict=True)
    with torch.no_grad():
        return m(ids).logits


# ---------------------------------------------------------------------------------------------
# On-disk inspection (no megatron needed; only torch for unpickling DCP classes)
# ---------------------------------------------------------------------------------------------
def pickle_globals(data: bytes) -> list:
    """Every GLOBAL / STACK_GLOBAL (module.name) a pickle references, first-seen order."""
    memo, strs, out, last = {}, [], [], None
    for op, arg, _ in pickletools.genops(data):
        n = op.name
        if n in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strs.append(arg)
            last = arg
        elif n == "MEMOIZE":
            memo[len(memo)] = last
        elif n in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
        elif n in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(arg)
            strs.append(last)
        elif n == "GLOBAL":
            out.append(arg.replace(" ", "."))
        elif n == "STACK_GLOBAL":
            out.append(f"{strs[-2]}.{strs[-1]}")
        else:
            last = None
    seen = []
    for x in out:
        if x not in seen:
            seen.append(x)
    return seen


def torch_zip_summary(blob: bytes) -> dict:
    z = zipfile.ZipFile(io.BytesIO(blob))
    pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    return {"entries": z.namelist(), "globals": pickle_globals(z.read(pkl))}


def short(obj, n=300):
    s = repr(obj)
    return s if len(s) <= n else s[:n] + "..."


def describe_checkpoint(ckpt: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    files = sorted(
        (os.path.relpath(os.path.join(d, f), ckpt), os.path.getsize(os.path.join(d, f)))
        for d, _, fs in os.walk(ckpt)
        for f in fs
    )
    out = {"files": [{"name": n, "bytes": s} for n, s in files]}
    with open(os.path.join(ckpt, "metadata.json")) as f:
        out["metadata.json"] = json.load(f)

    common_blob = open(os.path.join(ckpt, "common.pt"), "rb").read()
    common = torch.load(io.BytesIO(common_blob), weights_only=False)
    out["common.pt"] = {
        **torch_zip_summary(common_blob),
        "top_level_keys": sorted(common.keys()),
        "value": short(common, 600),
    }

    meta_blob = open(os.path.join(ckpt, ".metadata"), "rb").read()
    md = FileSystemReader(ckpt).read_metadata()
    sdm = {}
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            sdm[k] = {
                "kind": "tensor",
                "global_shape": list(v.size),
                "dtype": str(v.properties.dtype),
                "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in v.chunks],
            }
        elif isinstance(v, BytesStorageMetadata):
            sdm[k] = {"kind": "bytes"}
    storage = {}
    for idx, info in md.storage_data.items():
        storage.setdefault(idx.fqn, []).append(
            {
                "offset": list(idx.offset) if idx.offset is not None else None,
                "file": info.relative_path,
                "byte_offset": info.offset,
                "length": info.length,
            }
        )
    # decode the bytes items (ShardedObjects: _extra_state, rng_state, ...)
    for k, ent in sdm.items():
        if ent["kind"] != "bytes":
            continue
        (loc,) = storage[k]
        with open(os.path.join(ckpt, loc["file"]), "rb") as f:
            f.seek(loc["byte_offset"])
            blob = f.read(loc["length"])
        ent["storage"] = loc
        ent["torch_save_zip"] = blob[:4] == b"PK\x03\x04"
        ent["decoded"] = short(torch.load(io.BytesIO(blob), weights_only=False), 200)
        ent["globals"] = torch_zip_summary(blob)["globals"]
    # one tensor item, to show how tensor payloads are stored
    some = next(k for k, v in sdm.items() if v["kind"] == "tensor")
    loc = storage[some][0]
    with open(os.path.join(ckpt, loc["file"]), "rb") as f:
        f.seek(loc["byte_offset"])
        blob = f.read(loc["length"])
    out[".metadata"] = {
        "class": f"{type(md).__module__}.{type(md).__qualname__}",
        "attributes": sorted(vars(md).keys()),
        "version": getattr(md, "version", None),
        "planner_data": short(md.planner_data),
        "storage_meta": short(md.storage_meta),
        "mcore_data": short(getattr(md, "mcore_data", "<absent>")),
        "all_local_plans": (
            f"list of {len(md.all_local_plans)} SavePlan (one per rank)"
            if hasattr(md, "all_local_plans")
            else "<absent>"
        ),
        "pickle_globals": pickle_globals(meta_blob),
        "state_dict_metadata": sdm,
        "storage_data": storage,
        "tensor_item_example": {
            "key": some,
            **loc,
            "torch_save_zip": blob[:4] == b"PK\x03\x04",
            **torch_zip_summary(blob),
        },
    }
    return out


def read_global_tensors(ckpt: str) -> dict:
    """Reassemble every tensor in the DCP checkpoint without megatron (plain torch DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(ckpt)
    md = reader.read_metadata()
    sd = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def write_plain_dcp(ckpt: str, hf: dict, tied: bool):
    """A torch_dist checkpoint written WITHOUT megatron (what a converter produces): one chunk per
    global tensor, the layer-stacked keys, `_extra_state/shard_<l>_<L>` bytes items holding
    torch.save([None]), an empty common.pt and metadata.json. Megatron loads this strictly."""
    import torch.distributed.checkpoint as dcp

    sd = dict(expected_global(hf, tied))
    L = CFG["num_layers"]
    for i in range(L):
        for mod in (
            "self_attention.linear_qkv",
            "self_attention.linear_proj",
            "mlp.linear_fc1",
            "mlp.linear_fc2",
        ):
            # Plain DCP torch.save()s non-tensor values, which is exactly the bytes megatron writes.
            # (Passing an io.BytesIO would pickle the BytesIO object itself: megatron can't read that.)
            sd[f"decoder.layers.{mod}._extra_state/shard_{i}_{L}"] = [None]
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(ckpt), no_dist=True)
    torch.save({}, os.path.join(ckpt, "common.pt"))
    with open(os.path.join(ckpt, "metadata.json"), "w") as f:
        json.dump(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            },
            f,
        )


def plain_dcp_roundtrip(hf: dict, tied: bool, dtype, ref_logits) -> bool:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt = tempfile.mkdtemp(prefix="plain-dcp-")
    try:
        write_plain_dcp(ckpt, hf, tied)
        m = build_model(tied, dtype)
        m.load_state_dict(
            dist_checkpointing.load(m.sharded_state_dict(), ckpt, strict=StrictHandling.RAISE_ALL)
        )
        return bool(torch.equal(run_forward(m)[0], ref_logits))
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Training-style wrapper (what megatron/training/checkpointing.py adds around dist_ckpt.save)
# ---------------------------------------------------------------------------------------------
def training_state_dict(model, tied: bool) -> dict:
    """Mimics generate_state_dict() for ckpt_format=torch_dist without an optimizer.
    `args` is an argparse.Namespace in real checkpoints (hundreds of fields); only the ones
    load_args_from_checkpoint() reads for the architecture are filled here."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    args = argparse.Namespace(
        num_layers=CFG["num_layers"],
        hidden_size=CFG["hidden_size"],
        ffn_hidden_size=CFG["ffn_hidden_size"],
        num_attention_heads=CFG["num_attention_heads"],
        group_query_attention=True,
        num_query_groups=CFG["num_query_groups"],
        kv_channels=HEAD_DIM,
        max_position_embeddings=CFG["max_seq"],
        seq_length=SEQ,
        position_embedding_type="rope",
        rotary_base=CFG["rope_base"],
        rotary_percent=1.0,
        rotary_interleaved=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        swiglu=True,
        untie_embeddings_and_output_weights=not tied,
        normalization="RMSNorm",
        norm_epsilon=CFG["eps"],
        padded_vocab_size=CFG["vocab_size"],
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=model.config.params_dtype,
        bf16=model.config.params_dtype == torch.bfloat16,
        fp16=False,
        ckpt_format="torch_dist",
        iteration=ITERATION,
    )
    # get_rng_state(): on GPU 'cuda_rng_state' is torch.cuda.get_rng_state(); CPU stand-in here.
    rng = [
        {
            "random_rng_state": __import__("random").getstate(),
            "np_rng_state": __import__("numpy").random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {},
        }
    ]
    rng_obj = ShardedObject(
        "rng_state",
        rng,
        (pp, tp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )
    meta = {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
    }
    return {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "model": model.sharded_state_dict(metadata=meta),
        "rng_state": rng_obj,
        "num_floating_point_operations_so_far": 0,
    }, {k: v for k, v in meta.items() if k != "dp_cp_group"}


# ---------------------------------------------------------------------------------------------
def worker(rank: int, world: int, opts, init_file: str, result_file: str):
    import torch.distributed as dist

    apply_cpu_shims()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    T = {}
    t = time.time()
    init_parallel(rank, world, opts.tp, opts.pp, init_file)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    model = build_model(opts.tied, dtype)
    hf = reference_hf_state_dict(opts.tied, dtype)
    load_reference_into_model(model, hf, opts.tied)
    T["build_s"] = time.time() - t

    t = time.time()
    logits, ids = run_forward(model)
    T["forward_s"] = time.time() - t
    res = {"rank": rank}
    if logits is not None:
        res["logits_shape"] = list(logits.shape)
        if opts.hf_check:
            ref = hf_logits(hf, opts.tied, ids, dtype)
            res["hf_logits_max_abs_diff"] = (logits.float() - ref.float()).abs().max().item()

    # ---- save
    if opts.training_layout:
        ckpt = os.path.join(opts.ckpt_dir, f"iter_{ITERATION:07d}")
        sd, content_meta = training_state_dict(model, opts.tied)
    else:
        ckpt = opts.ckpt_dir
        sd, content_meta = model.sharded_state_dict(), None
    if rank == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()
    t = time.time()
    dist_checkpointing.save(sd, ckpt, content_metadata=content_meta)
    if opts.training_layout and rank == 0:
        with open(os.path.join(opts.ckpt_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))
    dist.barrier()
    T["save_s"] = time.time() - t

    # ---- strict load into a fresh, differently-initialised model
    t = time.time()
    torch.manual_seed(999)
    fresh = build_model(opts.tied, dtype)
    if opts.training_layout:
        # RAISE_ALL: every key in the checkpoint must be requested, including rng_state.
        full, _ = training_state_dict(fresh, opts.tied)
        req = {"model": full["model"], "rng_state": full["rng_state"]}
    else:
        req = fresh.sharded_state_dict()
    loaded = dist_checkpointing.load(req, ckpt, strict=StrictHandling.RAISE_ALL)
    if opts.training_layout:
        res["loaded_common_keys"] = sorted(k for k in loaded.keys() if k != "model")
        loaded = loaded["model"]
    fresh.load_state_dict(loaded, strict=True)
    T["load_s"] = time.time() - t
    a, b = model.state_dict(), fresh.state_dict()
    res["roundtrip_equal"] = all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    logits2, _ = run_forward(fresh)
    if logits is not None:
        res["reload_logits_equal"] = bool(torch.equal(logits, logits2))
    if world == 1 and not opts.training_layout:
        res["plain_dcp_checkpoint_loads_strict"] = plain_dcp_roundtrip(hf, opts.tied, dtype, logits)
    res["timings"] = T
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump({"ranks": gathered, "ckpt": ckpt}, f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="params_dtype=bfloat16 (default float32)")
    ap.add_argument("--hf-check", action="store_true")
    ap.add_argument("--training-layout", action="store_true")
    ap.add_argument("--ckpt-dir")
    ap.add_argument("--json", help="write the summary here instead of stdout")
    ap.add_argument("--brief", action="store_true", help="omit storage_data and per-bytes details")
    opts = ap.parse_args()

    t0 = time.time()
    scratch = tempfile.mkdtemp(prefix="mcore-probe-")
    if opts.ckpt_dir is None:
        opts.ckpt_dir = os.path.join(scratch, "ckpt")
    shutil.rmtree(opts.ckpt_dir, ignore_errors=True)
    os.makedirs(opts.ckpt_dir)
    init_file, result_file = os.path.join(scratch, "pg"), os.path.join(scratch, "result.json")
    world = opts.tp * opts.pp
    if world == 1:
        worker(0, 1, opts, init_file, result_file)
    else:
        torch.multiprocessing.spawn(worker, args=(world, opts, init_file, result_file), nprocs=world)
    with open(result_file) as f:
        run = json.load(f)

    import megatron.core

    ckpt = run["ckpt"]
    summary = {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "megatron.core": megatron.core.__version__,
        },
        "parallel": {"tp": opts.tp, "pp": opts.pp, "tied": opts.tied, "bf16": opts.bf16},
        "model": CFG,
        "ranks": run["ranks"],
        "layout": describe_checkpoint(ckpt),
    }
    if opts.training_layout:
        summary["training_dir"] = sorted(os.listdir(opts.ckpt_dir))
        with open(os.path.join(opts.ckpt_dir, "latest_checkpointed_iteration.txt")) as f:
            summary["latest_checkpointed_iteration.txt"] = f.read()

    # The tensors on disk must equal the reference weights in the expected stacked layout.
    on_disk = read_global_tensors(ckpt)
    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    exp = expected_global(reference_hf_state_dict(opts.tied, dtype), opts.tied)
    summary["on_disk_matches_expected_layout"] = sorted(on_disk) == sorted(exp) and all(
        on_disk[k].dtype == exp[k].dtype and torch.equal(on_disk[k], exp[k]) for k in exp
    )
    if opts.brief:
        summary["layout"][".metadata"].pop("storage_data")
    summary["total_s"] = time.time() - t0
    text = json.dumps(summary, indent=1, default=str)
    if opts.json:
        with open(opts.json, "w") as f:
            f.write(text)
    else:
        print(text)
    if opts.ckpt_dir.startswith(scratch):
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
