"""The peft side of the LoRA interop tests (peft + transformers + torch).

  make_base <dir> <arch> <dtype>       tiny random HF model (llama | llama_tied | llama_wide | qwen2 |
                                       gpt2) saved with save_pretrained in dtype (float32 | bfloat16 |
                                       float16)
  make_adapter <base_dir> <adapter_dir> <variant> [adapter_dtype]
                                       a LoRA (or IA3) adapter made by peft on that base
                                       (get_peft_model with the variant's config), every trainable
                                       parameter randomised (B non-zero), saved with save_pretrained;
                                       adapter_dtype (default float32) is the dtype it is saved in
  merge <base_dir> <adapter_dir> <out_dir> [--safe] [--dtype D]
                                       the reference: AutoModelForCausalLM.from_pretrained(base) +
                                       PeftModel.from_pretrained(adapter) + merge_and_unload() +
                                       save_pretrained(out)
  cases <root> <cases.json>            all of the above for a list of cases in one process:
                                       [{name, arch, dtype, variant, adapter_dtype?, safe?, load_dtype?}]
                                       → <root>/base-<arch>-<dtype>, <root>/<name>/adapter, <root>/<name>/ref
  compare <ref_dir> <ours_dir>         per tensor: elements, how many differ, the largest distance in
                                       ulps of the tensor's dtype (JSON); both loaded by safetensors
  compare_many <pairs.json>            compare for a list of [ref_dir, ours_dir] pairs
  logits_compare <base_dir> <adapter_dir> <merged_dir>
                                       fp32 logits of the base with the adapter applied by peft
                                       (unmerged) against those of a merged model directory
  make_mb <hf_dir> <run_dir> <dim> <alpha> <targets,comma-separated> [dtype]
                                       a Megatron-Bridge LoRA adapter checkpoint for the HF model's
                                       shape, saved by real megatron-core (dist_checkpointing.save of
                                       the ShardedTensors ParallelLinearAdapter produces: stacked
                                       `decoder.layers.<linear>.adapter.linear_in/linear_out.weight`,
                                       `_extra_state` objects) with run_config.yaml's peft section
  mb_to_peft <hf_dir> <run_dir> <out_dir>
                                       the same adapter as a PEFT adapter, split the way
                                       Megatron-Bridge's save_hf_adapter does (split_qkv_weights on
                                       linear_out with the rank as feature dim, torch.chunk for fc1,
                                       A shared), written independently of shardshift
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ARCHS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    # a Llama whose widths differ from "llama" (for the shape-mismatch test)
    "llama_wide": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=97, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=97, hidden_size=64, intermediate_size=80,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                 n_positions=64),
}

TOKENS = torch.tensor([[1, 5, 9, 13, 2, 96, 40, 7], [3, 3, 80, 11, 0, 64, 22, 95]])

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# variant: LoraConfig kwargs (bias, modules_to_save ... included)
VARIANTS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_ALL),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"], layers_to_transform=[0, 2],
                     rank_pattern={"layers.2.self_attn.q_proj": 4, "down_proj": 3}, alpha_pattern={"v_proj": 5, "up_proj": 7}),
    "regex": dict(r=6, lora_alpha=9, target_modules=r".*\.layers\.[01]\.(self_attn\.(q|k)_proj|mlp\.up_proj)"),
    "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "bias_all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all"),
    "bias_lora_only": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], bias="lora_only"),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
    "fifo": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "fifo_dora": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True),
    "ia3": None,  # made with IA3Config (unsupported tuner type)
    "pissa": dict(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"),
    # ranks above 384: MKL sums B @ A in two halves (see src/lora/fp32.ts)
    "big_rank": dict(r=500, lora_alpha=16, target_modules=["q_proj", "down_proj"]),
}


def make_base(d, arch, dtype):
    cfg = AutoConfig.for_model(**ARCHS[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias") or ".ln_" in n:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if n.endswith("weight") else 0.0))
    model = model.to(DTYPES[dtype])
    model.save_pretrained(d)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128, "note": "carried as a side file"}, f)


def make_adapter(base_dir, out, variant, adapter_dtype="float32"):
    from peft import get_peft_model, LoraConfig, IA3Config
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    if variant == "ia3":
        cfg = IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **VARIANTS[variant])
    pm = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            # every trainable parameter: LoRA factors, DoRA magnitudes, modules_to_save copies, biases
            if "lora_magnitude_vector" in n:
                p.copy_((p.float() * (1 + 0.2 * torch.rand(p.shape, generator=gen))).to(p.dtype))
            else:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.2).to(p.dtype))
    if adapter_dtype != "float32":
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.data = p.data.to(DTYPES[adapter_dtype])
    pm.save_pretrained(out)


def merge(base_dir, adapter_dir, out, safe=False, load_dtype=None):
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=DTYPES[load_dtype] if load_dtype else "auto")
    pm = PeftModel.from_pretrained(model, adapter_dir)
    merged = pm.merge_and_unload(safe_merge=safe)
    merged.save_pretrained(out)


def cases(root, spec):
    for c in spec:
        base = os.path.join(root, f"base-{c['arch']}-{c['dtype']}")
        if not os.path.exists(base):
            make_base(base, c["arch"], c["dtype"])
        d = os.path.join(root, c["name"])
        os.makedirs(d, exist_ok=True)
        make_adapter(base, os.path.join(d, "adapter"), c["variant"], c.get("adapter_dtype", "float32"))
        if c.get("ref", True):
            merge(base, os.path.join(d, "adapter"), os.path.join(d, "ref"), safe=c.get("safe", False), load_dtype=c.get("load_dtype"))


def ordered_bits(t):
    """Integer keys whose differences count ulps (sign-magnitude folded to a monotone scale)."""
    if t.dtype == torch.float32:
        i = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    i = t.contiguous().view(torch.int16).to(torch.int64)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def compare(a_dir, b_dir):
    from safetensors.torch import load_file
    def load(d):
        sd = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(d, f)))
        return sd
    a, b = load(a_dir), load(b_dir)
    out = {"only_ref": sorted(set(a) - set(b)), "only_ours": sorted(set(b) - set(a)), "tensors": {}}
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            out["tensors"][k] = {"mismatch": f"{x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"}
            continue
        if x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            d = (ordered_bits(x) - ordered_bits(y)).abs()
            out["tensors"][k] = {"n": x.numel(), "diff": int((d != 0).sum()), "max_ulp": int(d.max()) if d.numel() else 0}
        else:
            out["tensors"][k] = {"n": x.numel(), "diff": int((x != y).sum()), "max_ulp": 0}
    return out


def logits_peft(base_dir, adapter_dir):
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter_dir)
    pm.eval()
    with torch.no_grad():
        return pm(TOKENS).logits


def logits_hf(d):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


MB_TARGETS = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}


def mb_shapes(cfg):
    H = cfg.hidden_size
    hn = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    q = cfg.num_attention_heads * hn
    kv = cfg.num_key_value_heads * hn
    F = cfg.intermediate_size
    return {"linear_qkv": (q + 2 * kv, H), "linear_proj": (H, q), "linear_fc1": (2 * F, H), "linear_fc2": (H, F)}


def make_mb(hf_dir, run_dir, dim, alpha, targets, dtype="bfloat16"):
    import tempfile
    sys.path.insert(0, os.path.dirname(__file__))
    import megatron_oracle as mo
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor, ShardedObject
    cfg = AutoConfig.from_pretrained(hf_dir)
    mo.init(0, 1, 1, tempfile.mktemp())
    L = cfg.num_hidden_layers
    shapes = mb_shapes(cfg)
    gen = torch.Generator().manual_seed(99)
    sd = {}
    for t in targets:
        out_rows, in_cols = shapes[t]
        for which, shape in (("linear_in", (dim, in_cols)), ("linear_out", (out_rows, dim))):
            key = f"decoder.layers.{MB_TARGETS[t]}.adapter.{which}.weight"
            for layer in range(L):
                data = (torch.randn(shape, generator=gen) * 0.3).to(DTYPES[dtype])
                sd[f"{key}.{layer}"] = ShardedTensor.from_rank_offsets(key, data, (0, layer, L), replica_id=0, prepend_axis_num=1)
            ek = f"decoder.layers.{MB_TARGETS[t]}.adapter.{which}._extra_state"
            for layer in range(L):
                sd[f"{ek}.{layer}"] = ShardedObject(ek, None, (L,), (layer,), replica_id=0)
    iter_dir = os.path.join(run_dir, "iter_0000010")
    os.makedirs(iter_dir, exist_ok=True)
    dist_checkpointing.save({"model": sd, "checkpoint_version": 3.0, "iteration": 10}, iter_dir)
    with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")
    with open(os.path.join(iter_dir, "run_config.yaml"), "w") as f:
        f.write("model:\n  _target_: megatron.bridge.models.llama.llama_provider.LlamaModelProvider\n"
                f"  num_layers: {L}\n  hidden_size: {cfg.hidden_size}\n"
                "peft:\n  _target_: megatron.bridge.peft.lora.LoRA\n"
                f"  target_modules:\n" + "".join(f"  - {t}\n" for t in targets) +
                f"  dim: {dim}\n  alpha: {alpha}\n  dropout: 0.0\n  dropout_position: pre\n"
                "  lora_A_init_method: xavier\n  lora_B_init_method: zero\n  a2a_experimental: false\n  lora_dtype: null\n"
                "checkpoint:\n  save: /tmp/unused\n")
    torch.distributed.destroy_process_group()


def mb_to_peft(hf_dir, run_dir, out):
    """Independent of shardshift: torch.distributed.checkpoint reads the adapter, MB's split."""
    import yaml
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from safetensors.torch import save_file
    import tempfile
    it = open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")).read().strip()
    iter_dir = os.path.join(run_dir, f"iter_{int(it):07d}")
    peft_cfg = yaml.safe_load(open(os.path.join(iter_dir, "run_config.yaml")))["peft"]
    with tempfile.TemporaryDirectory() as t:
        dcp_to_torch_save(iter_dir, os.path.join(t, "x.pt"))
        sd = torch.load(os.path.join(t, "x.pt"), weights_only=False)
    cfg = AutoConfig.from_pretrained(hf_dir)
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    hn = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per = heads // groups
    out_sd = {}
    for t, meg in MB_TARGETS.items():
        kin = f"decoder.layers.{meg}.adapter.linear_in.weight"
        if kin not in sd:
            continue
        A_all = sd[kin].float()
        B_all = sd[f"decoder.layers.{meg}.adapter.linear_out.weight"].float()
        for layer in range(A_all.shape[0]):
            A, B = A_all[layer], B_all[layer]
            r = B.shape[1]
            if t == "linear_qkv":
                x = B.reshape(groups, per + 2, hn, r)
                parts = {"self_attn.q_proj": x[:, :per].reshape(-1, r), "self_attn.k_proj": x[:, per].reshape(-1, r),
                         "self_attn.v_proj": x[:, per + 1].reshape(-1, r)}
            elif t == "linear_fc1":
                g, u = torch.chunk(B, 2, dim=0)
                parts = {"mlp.gate_proj": g, "mlp.up_proj": u}
            else:
                parts = {"self_attn.o_proj" if t == "linear_proj" else "mlp.down_proj": B}
            for name, b in parts.items():
                p = f"base_model.model.model.layers.{layer}.{name}"
                out_sd[f"{p}.lora_A.weight"] = A.clone().contiguous()
                out_sd[f"{p}.lora_B.weight"] = b.clone().contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(out_sd, os.path.join(out, "adapter_model.safetensors"))
    mods = sorted({k.split(".")[-3] for k in out_sd})
    config = {"peft_type": "LORA", "auto_mapping": None, "base_model_name_or_path": hf_dir, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "lora_alpha": peft_cfg["alpha"],
              "lora_dropout": float(peft_cfg.get("dropout", 0.0)), "modules_to_save": None, "r": peft_cfg["dim"],
              "rank_pattern": {}, "alpha_pattern": {}, "target_modules": mods, "task_type": "CAUSAL_LM",
              "use_dora": False, "use_rslora": False}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make_base":
        make_base(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "make_adapter":
        make_adapter(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "float32")
    elif cmd == "merge":
        dt = sys.argv[sys.argv.index("--dtype") + 1] if "--dtype" in sys.argv else None
        merge(sys.argv[2], sys.argv[3], sys.argv[4], safe="--safe" in sys.argv, load_dtype=dt)
    elif cmd == "cases":
        with open(sys.argv[3]) as f:
            cases(sys.argv[2], json.load(f))
    elif cmd == "compare":
        print(json.dumps(compare(sys.argv[2], sys.argv[3])))
    elif cmd == "compare_many":
        with open(sys.argv[2]) as f:
            print(json.dumps([compare(a, b) for a, b in json.load(f)]))
    elif cmd == "logits_compare":
        # logits_compare <base_dir> <adapter_dir> <merged_dir>: peft-applied adapter vs a merged model
        a = logits_peft(sys.argv[2], sys.argv[3])
        b = logits_hf(sys.argv[4])
        print(json.dumps({"max_abs_diff": (a - b).abs().max().item(), "max_abs": a.abs().max().item()}))
    elif cmd == "make_mb":
        make_mb(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6].split(","), sys.argv[7] if len(sys.argv) > 7 else "bfloat16")
    elif cmd == "mb_to_peft":
        mb_to_peft(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "version":
        import peft
        print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}))
    else:
        raise SystemExit(f"unknown command {cmd}")
