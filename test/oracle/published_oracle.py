"""The published-checkpoint harness's oracle: the exact tensor list (name, dtype, shape, in save
order) of a hub model, derived from transformers 5.24 itself, never typed by hand.

    python published_oracle.py names  < jobs.json        # [{"config": path, "hub": {...}, "out": path}, ...]

For each job:

1. The model class named by the config's `architectures` is built on the meta device with
   `_from_config(cfg, dtype=bfloat16)` — the init context `from_pretrained` uses, so parameters a
   model creates with an explicit dtype (Nemotron-H's router `gate.weight` and
   `e_score_correction_bias` are created float32) keep it — then `_get_dtype_plan(bfloat16)`
   applies `_keep_in_fp32_modules(_strict)` as `from_pretrained` does (modeling_utils.py
   `_get_dtype_plan`, matched as core_model_loading.py does: an unanchored regex search).
2. Names are what `save_pretrained` writes: `state_dict()` minus tied aliases
   (`remove_tied_weights_from_state_dict`) and `_keys_to_ignore_on_save`, then
   `revert_weight_conversion` exactly as `save_pretrained` calls it. A model loaded from an
   already-fused checkpoint re-saves fused names (`hub.fusedExperts`: only conversions used at load
   are reverted, and none were), otherwise the per-expert names.
3. Hub-only tensors the published repos carry and transformers does not save (`hub`):
   - `mxfp4`: GPT-OSS experts as `X_blocks` U8 [E, R, G, 16] / `X_scales` U8 [E, R, G]
     (R = output rows of the output-major weight, G = in/32), in place of the bf16 `X`;
   - `mtp: n`: n multi-token-prediction layers `mtp.*` (Qwen3-Next, Qwen3.5): `mtp.fc` [H, 2H],
     `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.norm` [H], and `mtp.layers.<k>.*`
     = the names of the model's last full-attention decoder layer (vLLM and Megatron-Bridge build
     the MTP layer as a full-attention layer), per-expert as the hub stores them;
   - `f32`: regexes of tensors the hub stores as F32 though transformers would save the load dtype
     (Qwen3.5's GatedDeltaNet `A_log` and `linear_attn.norm.weight`, vLLM #51836);
   - `bf16`: regexes of tensors the hub stores as BF16 though transformers keeps them float32
     (DeepSeek-V3's router `mlp.gate.weight`: DeepSeek's own `Gate` holds it in the model dtype,
     only its score-correction bias in float32);
   - `deepseekMtp: n`: DeepSeek-V3's n MTP layers at `model.layers.<L + k>` (L =
     num_hidden_layers; transformers builds none): the last decoder layer's names plus `enorm`,
     `hnorm`, `eh_proj` [H, 2H], `shared_head.norm`, and the layer's own `embed_tokens` and
     `shared_head.head` [V, H] — the layout DeepSeek's and vLLM's MTP loaders read (GLM-4.5 too);
   - `mtpCopies: false`: those MTP layers without the embedding / head copies (GLM-4.6 and 4.7
     dropped them: vLLM #27597);
   - `fp8Block: [br, bc]`: DeepSeek-V3's FP8 layout — every linear weight of attention and MLP
     (not embeddings, head, norms, router, `eh_proj`) as F8_E4M3, each followed by its
     `<name>_scale_inv` F32 [ceil(R/br), ceil(C/bc)];
   - `fp8Tensors`: the regex of the weights stored FP8 where DeepSeek-V3's list does not apply
     (MiniMax-M2: attention q/k/v/o and the experts' w1/w2/w3);
   - `expertsInputMajor`: the fused experts stored input-major, `experts.gate_up_proj` [E, H, 2F] and
     `experts.down_proj` [E, F, H] (Qwen3-VL-MoE's hub files; transformers 5 transposes them on load);
   - `rename`: [[regex, replacement], …] applied to the names, for hub layouts transformers 5 no longer
     saves (Gemma 3's `vision_tower.vision_model.*`, which transformers 5 writes flattened);
   - `modelType`: the transformers model_type to read the config as (Kimi K2's config says
     `kimi_k2`, remote code over DeepseekV3's architecture).

The TypeScript harness (test/helpers/published.ts) writes sparse checkpoints with these lists.
"""
import json
import os
import re
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from transformers.core_model_loading import build_glob_alternation, revert_weight_conversion  # noqa: E402
from transformers.modeling_utils import remove_tied_weights_from_state_dict  # noqa: E402

SAFE_DTYPE = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def load_config(path, model_type=None):
    with open(path) as f:
        raw = json.load(f)
    raw.pop("auto_map", None)  # the native transformers class, never remote code
    if model_type:
        raw["model_type"] = model_type
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    return AutoConfig.from_pretrained(d), raw


def saved_names(cls, cfg, fused):
    """[(name, shape, dtype)] in save order, as save_pretrained writes them after from_pretrained(dtype=bf16)."""
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = cls._from_config(cfg, dtype=dtype)
    sd = model.state_dict()
    dtypes = {k: v.dtype for k, v in sd.items()}
    plan = model._get_dtype_plan(dtype)
    if plan:
        alt, by_group, _ = build_glob_alternation(list(plan.keys()))
        for k in sd:
            m = alt.search(k)
            if m is not None:
                dtypes[k] = plan[by_group[m.lastgroup]]
    sd = remove_tied_weights_from_state_dict(sd, model)
    for k in list(model._keys_to_ignore_on_save or []):
        sd.pop(k, None)
    sd = {k: v.to(dtypes[k]) for k, v in sd.items()}
    if fused:
        model._weight_conversions = []  # loaded from a checkpoint that needed no conversion
    out = revert_weight_conversion(model, sd)
    return [(k, list(v.shape), SAFE_DTYPE[v.dtype]) for k, v in out.items()]


def text_config(raw):
    return raw.get("text_config", raw)


def mxfp4(tensors):
    out = []
    for name, shape, dt in tensors:
        m = re.match(r"^(.*\.mlp\.experts\.(gate_up_proj|down_proj))$", name)
        if not m:
            out.append((name, shape, dt))
            continue
        E, inp, outp = shape  # transformers' input-major [E, in, out]
        out.append((name + "_blocks", [E, outp, inp // 32, 16], "U8"))
        out.append((name + "_scales", [E, outp, inp // 32], "U8"))
    return out


def mtp(tensors, raw, n):
    """The hub's `mtp.*` tensors: head tensors plus the last full-attention layer's names per MTP layer."""
    t = text_config(raw)
    H = t["hidden_size"]
    L = t["num_hidden_layers"]
    types = t.get("layer_types") or [("full_attention" if (i + 1) % t.get("full_attention_interval", 4) == 0 else "linear_attention") for i in range(L)]
    last_full = max(i for i, k in enumerate(types) if k == "full_attention")
    pat = re.compile(r"^(?:model\.language_model|model)\.layers\.%d\.(.+)$" % last_full)
    layer = [(m.group(1), shape, dt) for name, shape, dt in tensors for m in [pat.match(name)] if m]
    out = [("mtp.fc.weight", [H, 2 * H], "BF16")]
    for k in range(n):
        out += [(f"mtp.layers.{k}.{rest}", shape, dt) for rest, shape, dt in layer]
    out += [("mtp.norm.weight", [H], "BF16"), ("mtp.pre_fc_norm_embedding.weight", [H], "BF16"), ("mtp.pre_fc_norm_hidden.weight", [H], "BF16")]
    return out


def deepseek_mtp(tensors, raw, n, copies=True):
    """DeepSeek-V3's MTP layers model.layers.<L + k>: the last decoder layer's names and the MTP head tensors."""
    t = text_config(raw)
    H, L, V = t["hidden_size"], t["num_hidden_layers"], t["vocab_size"]
    pat = re.compile(r"^model\.layers\.%d\.(.+)$" % (L - 1))
    layer = [(m.group(1), shape, dt) for name, shape, dt in tensors for m in [pat.match(name)] if m]
    out = []
    for k in range(n):
        p = f"model.layers.{L + k}"
        out += [(f"{p}.embed_tokens.weight", [V, H], "BF16")] if copies else []
        out += [(f"{p}.enorm.weight", [H], "BF16"), (f"{p}.hnorm.weight", [H], "BF16"), (f"{p}.eh_proj.weight", [H, 2 * H], "BF16")]
        out += [(f"{p}.{rest}", shape, dt) for rest, shape, dt in layer]
        out += [(f"{p}.shared_head.norm.weight", [H], "BF16")]
        out += [(f"{p}.shared_head.head.weight", [V, H], "BF16")] if copies else []
    return out


FP8_LINEAR = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj))\.weight$")


def fp8_block(tensors, block, pattern=None):
    br, bc = block
    linear = re.compile(pattern) if pattern else FP8_LINEAR
    out = []
    for name, shape, dt in tensors:
        if linear.search(name) and len(shape) == 2:
            out.append((name, shape, "F8_E4M3"))
            out.append((name + "_scale_inv", [-(-shape[0] // br), -(-shape[1] // bc)], "F32"))
        else:
            out.append((name, shape, dt))
    return out


def names(job):
    hub = job.get("hub", {})
    cfg, raw = load_config(job["config"], hub.get("modelType"))
    cls = getattr(transformers, raw["architectures"][0])
    tensors = saved_names(cls, cfg, hub.get("fusedExperts", False))
    if hub.get("mtp"):
        # MTP layers as the hub stores them: per-expert, whatever the main decoder's layout.
        per_expert = saved_names(cls, cfg, False) if hub.get("fusedExperts") else tensors
        tensors = tensors + mtp(per_expert, raw, hub["mtp"])
    if hub.get("deepseekMtp"):
        tensors = tensors + deepseek_mtp(tensors, raw, hub["deepseekMtp"], hub.get("mtpCopies", True))
    for rx, to in hub.get("rename", []):
        r = re.compile(rx)
        tensors = [(r.sub(to, n), s, d) for n, s, d in tensors]
    if hub.get("expertsInputMajor"):
        tensors = [(n, (s[:-2] + [s[-1], s[-2]]) if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) else s, d) for n, s, d in tensors]
    if hub.get("mxfp4"):
        tensors = mxfp4(tensors)
    for rx in hub.get("f32", []):
        r = re.compile(rx)
        tensors = [(n, s, "F32" if r.search(n) else d) for n, s, d in tensors]
    for rx in hub.get("bf16", []):
        r = re.compile(rx)
        tensors = [(n, s, "BF16" if r.search(n) else d) for n, s, d in tensors]
    if hub.get("fp8Block"):
        tensors = fp8_block(tensors, hub["fp8Block"], hub.get("fp8Tensors"))
    return {"transformers": transformers.__version__, "architecture": raw["architectures"][0], "tensors": [[n, d, s] for n, s, d in tensors]}


def main():
    if sys.argv[1:] != ["names"]:
        raise SystemExit("usage: published_oracle.py names < jobs.json")
    for job in json.load(sys.stdin):
        r = names(job)
        with open(job["out"], "w") as f:
            json.dump(r, f)
        print(f"{job['out']}: {len(r['tensors'])} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
