"""Oracles for `verify --logits` (test/interop/logits.test.ts).

  make <hf_dir> <case>
      a tiny random HF model (fp32) whose layers matter: projections drawn with std 1/sqrt(fan-in)
      (not transformers' 0.02, under which the residual stream is nearly the embedding and a
      scrambled layer hardly moves the logits), random norms and biases, a router with real
      preferences; cases: llama, llama31, mistral, qwen2, qwen3, mixtral, qwen3_moe, qwen3_moe_nonorm
  hf_logits <hf_dir> <tokens-json>
      transformers' fp32 logits of AutoModelForCausalLM for one sequence (JSON [T][V])
  saved_logits <logits.pt> <row>
      one row of the logits a megatron-core forward saved (megatron_oracle / moe_oracle `save`)
  break <run_dir> <kind> <out_run_dir> [--hf <hf_dir>]
      a copy of a torch_dist run whose weights carry a mapping mistake that a converter applying
      it on both import and export would round-trip byte-identically:
        qkv_plain    linear_qkv as cat([q, k, v]) instead of per-query-group (needs --hf)
        gate_up      linear_fc1 as [up; gate] instead of [gate; up]
        experts      the experts of every MoE layer in reverse order
        rotary       q and k rows of every head in interleaved (Meta) order instead of rotate-half
      The DCP files are rewritten with torch.distributed.checkpoint; common.pt, metadata.json and
      the tracker are copied.
  fp8 <hf_dir> <out_hf_dir>
      the model with its linear weights block-quantized to FP8 as DeepSeek-V3's hub stores them
      (Megatron-Bridge's quantizer as deepseek_oracle.py copies it, 128x128 blocks,
      `weight_scale_inv`; every q/k/v/o and MLP projection) and the config's
      `quantization_config` saying so
  leak <hf_dir> <run_dir> <out_hf_dir>
      the HF export of <run_dir> with the vocab-padding off-by-one: lm_head = output_layer rows
      1 … V (so the last real row is a Megatron padding row and every other row is shifted)
"""
import json
import os
import shutil
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402


BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, num_local_experts=8, num_experts=8, moe_intermediate_size=48)
CASES = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "llama_tok": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=320),
    "llama31": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], **MOE),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], norm_topk_prob=True, **MOE),
    "qwen3_moe_nonorm": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], norm_topk_prob=False, **MOE),
}


def make(d, case):
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(BASE, **CASES[case])
    if kw["model_type"] == "mixtral":
        kw["intermediate_size"] = kw.pop("moe_intermediate_size")
        kw.pop("num_experts")
    cfg = AutoConfig.for_model(**kw)
    torch.manual_seed(11)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "embed_tokens" in n:
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.dim() >= 2:  # transformers 5 holds experts fused, [E, out, in]
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    m.save_pretrained(d)
    return {"ok": True}


def hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].tolist()


def load_dcp(iter_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as t:
        dcp_to_torch_save(iter_dir, os.path.join(t, "x.pt"))
        return torch.load(os.path.join(t, "x.pt"), weights_only=False)


def iter_dir_of(run):
    with open(os.path.join(run, "latest_checkpointed_iteration.txt")) as f:
        it = f.read().strip()
    return os.path.join(run, f"iter_{int(it):07d}")


def interleave_rows(w, hd):
    """Rows of each head from rotate-half order (0..hd/2-1 | hd/2..hd-1) to pairs (0, hd/2, 1, ...)."""
    idx = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], dim=1).reshape(-1)
    return w.view(-1, hd, *w.shape[1:])[:, idx].reshape(w.shape)


def break_run(run, kind, out, hf_dir=None):
    import torch.distributed.checkpoint as dcp
    src_iter = iter_dir_of(run)
    sd = {k: v for k, v in load_dcp(src_iter).items() if isinstance(v, torch.Tensor)}
    args = torch.load(os.path.join(src_iter, "common.pt"), weights_only=False)["args"]
    heads, groups = args.num_attention_heads, args.num_query_groups if args.group_query_attention else args.num_attention_heads
    hd = args.kv_channels
    r = heads // groups
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    if kind == "qkv_plain":
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
        for i in range(sd[qkv].shape[0]):
            p = f"model.layers.{i}.self_attn."
            sd[qkv][i] = torch.cat([hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"]]).to(sd[qkv].dtype)
    elif kind == "gate_up":
        w = sd["decoder.layers.mlp.linear_fc1.weight"]
        half = w.shape[1] // 2
        sd["decoder.layers.mlp.linear_fc1.weight"] = torch.cat([w[:, half:], w[:, :half]], dim=1).contiguous()
    elif kind == "experts":
        for n in ("decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.experts.experts.linear_fc2.weight"):
            sd[n] = sd[n].flip(1).contiguous()
    elif kind == "rotary":
        w = sd[qkv]
        for i in range(w.shape[0]):
            g = w[i].view(groups, r + 2, hd, -1)
            g[:, : r + 1] = interleave_rows(g[:, : r + 1].reshape(-1, g.shape[-1]), hd).view(groups, r + 1, hd, -1)
    else:
        raise SystemExit(f"unknown break {kind}")
    out_iter = os.path.join(out, os.path.basename(src_iter))
    os.makedirs(out_iter)
    dcp.save(sd, checkpoint_id=out_iter, no_dist=True)
    for f in ("common.pt", "metadata.json"):
        shutil.copy(os.path.join(src_iter, f), os.path.join(out_iter, f))
    if os.path.isdir(os.path.join(src_iter, "hf")):
        shutil.copytree(os.path.join(src_iter, "hf"), os.path.join(out_iter, "hf"))
    shutil.copy(os.path.join(run, "latest_checkpointed_iteration.txt"), out)
    return {"ok": True}


def leak(hf_dir, run, out):
    from safetensors.torch import load_file, save_file
    sd = load_dcp(iter_dir_of(run))
    shutil.copytree(hf_dir, out)
    f = os.path.join(out, "model.safetensors")
    w = load_file(f)
    V = w["lm_head.weight"].shape[0]
    w["lm_head.weight"] = sd["output_layer.weight"][1:V + 1].to(w["lm_head.weight"].dtype).contiguous()
    os.remove(f)
    save_file(w, f, metadata={"format": "pt"})
    return {"ok": True, "rows": V}


def fp8(hf_dir, out):
    import re
    from safetensors.torch import load_file, save_file
    sys.path.insert(0, os.path.dirname(__file__))
    from deepseek_oracle import quantize_fp8_2d_blocks
    linear = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
    sd, res, n = load_file(os.path.join(hf_dir, "model.safetensors")), {}, 0
    for k, v in sd.items():
        if linear.search(k):
            res[k], res[k + "_scale_inv"] = quantize_fp8_2d_blocks(v)
            n += 1
        else:
            res[k] = v
    os.makedirs(out, exist_ok=True)
    save_file(res, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    r = {"ok": True, "quantized": n}
    for f in os.listdir(hf_dir):
        if f.endswith(".json"):
            shutil.copy(os.path.join(hf_dir, f), os.path.join(out, f))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return r


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        print(json.dumps(make(sys.argv[2], sys.argv[3])))
    elif cmd == "hf_logits":
        print(json.dumps(hf_logits(sys.argv[2], json.loads(sys.argv[3]))))
    elif cmd == "saved_logits":
        print(json.dumps(torch.load(sys.argv[2])[int(sys.argv[3])].tolist()))
    elif cmd == "break":
        a = sys.argv[2:]
        hf = a[a.index("--hf") + 1] if "--hf" in a else None
        print(json.dumps(break_run(a[0], a[1], a[2], hf)))
    elif cmd == "fp8":
        print(json.dumps(fp8(sys.argv[2], sys.argv[3])))
    elif cmd == "leak":
        print(json.dumps(leak(sys.argv[2], sys.argv[3], sys.argv[4])))
    else:
        raise SystemExit(f"unknown command {cmd}")
