"""The peft side of the LoRA interop tests (peft + transformers + torch).

  make_base <dir> <arch> <dtype>       tiny random HF model (llama | llama_tied | qwen2 | gpt2) saved
                                       with save_pretrained in dtype (float32 | bfloat16 | float16)
  make_adapter <base_dir> <adapter_dir> <variant> [adapter_dtype]
                                       a LoRA adapter made by peft on that base (get_peft_model with
                                       the variant's LoraConfig), every adapter parameter randomised
                                       (B non-zero), saved with save_pretrained; adapter_dtype
                                       (default float32) is the dtype the adapter tensors are saved in
  merge <base_dir> <adapter_dir> <out_dir> [--safe] [--no-autocast]
                                       the reference: AutoModelForCausalLM.from_pretrained(base) +
                                       PeftModel.from_pretrained(adapter) + merge_and_unload() +
                                       save_pretrained(out)
  compare <ref_dir> <ours_dir>         per tensor: elements, how many differ, the largest distance in
                                       ulps of the tensor's dtype (JSON); both loaded by safetensors
  logits_peft <base_dir> <adapter_dir> logits of the base with the adapter applied by peft (unmerged)
  logits_hf <dir>                      logits of an HF model directory
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
    "big_rank": dict(r=300, lora_alpha=16, target_modules=["q_proj", "down_proj"]),
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


def merge(base_dir, adapter_dir, out, safe=False, autocast=True):
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    pm = PeftModel.from_pretrained(model, adapter_dir, autocast_adapter_dtype=autocast)
    merged = pm.merge_and_unload(safe_merge=safe)
    merged.save_pretrained(out)


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


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make_base":
        make_base(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "make_adapter":
        make_adapter(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "float32")
    elif cmd == "merge":
        merge(sys.argv[2], sys.argv[3], sys.argv[4], safe="--safe" in sys.argv, autocast="--no-autocast" not in sys.argv)
    elif cmd == "compare":
        print(json.dumps(compare(sys.argv[2], sys.argv[3])))
    elif cmd == "logits_compare":
        # logits_compare <base_dir> <adapter_dir> <merged_dir>: peft-applied adapter vs a merged model
        a = logits_peft(sys.argv[2], sys.argv[3])
        b = logits_hf(sys.argv[4])
        print(json.dumps({"max_abs_diff": (a - b).abs().max().item(), "max_abs": a.abs().max().item()}))
    elif cmd == "version":
        import peft
        print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}))
    else:
        raise SystemExit(f"unknown command {cmd}")
