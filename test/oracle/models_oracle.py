"""The model side of the HF <-> Megatron interop tests (transformers + torch).

  make <dir> <case>              tiny random HF model saved with save_pretrained (fp32)
  hf_logits <hf_dir>             logits of AutoModelForCausalLM on a fixed batch (JSON)
  megatron_logits <iter_dir> <hf_dir> [--layout interleaved|naive]
                                 logits of an independent pure-torch forward of the Megatron
                                 GPT layout (per-query-group QKV, [gate; up] fc1, TE-style norm
                                 names, padded vocab) loaded from the torch_dist checkpoint
  naive <iter_dir> <hf_dir> <out_iter_dir>
                                 the same checkpoint with linear_qkv rewritten as the classic
                                 bug, cat([q, k, v]), to show the check catches it
"""
import json
import math
import os
import shutil
import sys
import tempfile

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

CASES = {
    # name: (config class kwargs)
    "llama_gqa": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "llama_mha_tied": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama31_rope": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None),
    "qwen2_bias": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama_mha_4l": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, num_hidden_layers=4),
    "qwen3_qknorm": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
}

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)

TOKENS = torch.tensor([[1, 5, 9, 13, 2, 96, 40, 7], [3, 3, 80, 11, 0, 64, 22, 95]])


def make(d, case):
    kw = dict(BASE, **CASES[case])
    cfg = AutoConfig.for_model(**kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        # Random norms and biases too, so that a misplaced one changes the logits.
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if n.endswith("norm.weight") else 0.0))
    model.save_pretrained(d)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128, "note": "carried as a side file"}, f)


def hf_logits(d):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


def load_dcp(iter_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as t:
        dcp_to_torch_save(iter_dir, os.path.join(t, "x.pt"))
        return torch.load(os.path.join(t, "x.pt"), weights_only=False)


def rms(x, w, eps):
    v = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(v + eps) * w


def rope_inv_freq(cfg, hn):
    # transformers' own rope init (default / llama3 scaling) for the reference config.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rp = getattr(cfg, "rope_parameters", None) or {}
    rtype = rp.get("rope_type", "default")
    if rtype == "default":
        base = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    inv, _ = ROPE_INIT_FUNCTIONS[rtype](cfg, "cpu")
    return inv


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def megatron_logits(iter_dir, hf_dir, layout="interleaved"):
    """Independent forward of Megatron's GPT layout, from Megatron-LM's semantics."""
    sd = load_dcp(iter_dir)
    cfg = AutoConfig.from_pretrained(hf_dir)
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    npH, ng = cfg.num_attention_heads, cfg.num_key_value_heads
    hn = getattr(cfg, "head_dim", None) or H // npH
    r = npH // ng
    eps = cfg.rms_norm_eps
    f32 = lambda t: t.to(torch.float32)
    emb = f32(sd["embedding.word_embeddings.weight"])
    x = emb[TOKENS]
    B, S = TOKENS.shape
    inv = rope_inv_freq(cfg, hn)
    pos = torch.arange(S, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    mask = torch.full((S, S), float("-inf")).triu(1)
    for i in range(L):
        g = lambda k: f32(sd[f"decoder.layers.{k}"][i])
        h = rms(x, g("self_attention.linear_qkv.layer_norm_weight"), eps)
        qkv = h @ g("self_attention.linear_qkv.weight").T
        if "decoder.layers.self_attention.linear_qkv.bias" in sd:
            qkv = qkv + g("self_attention.linear_qkv.bias")
        if layout == "interleaved":
            qkv = qkv.view(B, S, ng, r + 2, hn)
            q = qkv[:, :, :, :r].reshape(B, S, npH, hn)
            k = qkv[:, :, :, r:r + 1].reshape(B, S, ng, hn)
            v = qkv[:, :, :, r + 1:].reshape(B, S, ng, hn)
        else:  # what a naive cat([q, k, v]) checkpoint would mean
            q, k, v = qkv.split([npH * hn, ng * hn, ng * hn], dim=-1)
            q, k, v = q.view(B, S, npH, hn), k.view(B, S, ng, hn), v.view(B, S, ng, hn)
        if "decoder.layers.self_attention.q_layernorm.weight" in sd:
            q = rms(q, g("self_attention.q_layernorm.weight"), eps)
            k = rms(k, g("self_attention.k_layernorm.weight"), eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(r, dim=1)
        v = v.repeat_interleave(r, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hn) + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, S, npH * hn)
        x = x + o @ g("self_attention.linear_proj.weight").T
        h = rms(x, g("mlp.linear_fc1.layer_norm_weight"), eps)
        gate, up = (h @ g("mlp.linear_fc1.weight").T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ g("mlp.linear_fc2.weight").T
    x = rms(x, f32(sd["decoder.final_layernorm.weight"]), eps)
    out_w = f32(sd["output_layer.weight"]) if "output_layer.weight" in sd else emb
    return (x @ out_w.T)[:, :, : cfg.vocab_size]


def naive(iter_dir, hf_dir, out_dir):
    """Rewrite linear_qkv as cat([q, k, v]) per layer (the classic converter bug)."""
    import torch.distributed.checkpoint as dcp
    sd = load_dcp(iter_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    w = sd["decoder.layers.self_attention.linear_qkv.weight"]
    for i in range(w.shape[0]):
        p = f"model.layers.{i}.self_attn."
        w[i] = torch.cat([hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"]]).to(w.dtype)
    dcp.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, checkpoint_id=out_dir, no_dist=True)


def compare(a, b):
    d = (a - b).abs().max().item()
    return {"max_abs_diff": d, "shape": list(a.shape)}


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3])
    elif cmd == "compare_hf":
        print(json.dumps(compare(hf_logits(sys.argv[2]), hf_logits(sys.argv[3]))))
    elif cmd == "compare_megatron":
        layout = sys.argv[4] if len(sys.argv) > 4 else "interleaved"
        print(json.dumps(compare(megatron_logits(sys.argv[2], sys.argv[3], layout), hf_logits(sys.argv[3]))))
    elif cmd == "naive":
        naive(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "version":
        print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}))
    else:
        raise SystemExit(f"unknown command {cmd}")
