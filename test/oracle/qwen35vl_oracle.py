"""transformers 5.24 and megatron-core 0.16.1 (CPU, gloo) as oracles for the published Qwen3.5
layouts (vision-language wrappers, fused experts) and the hub's multi-token-prediction layers.

  make <hf_dir> <case>
      a tiny random checkpoint laid out as the hub repos are, saved with save_pretrained plus the
      hub-only `mtp.*` tensors transformers does not save (random, one MTP layer named as the last
      full-attention decoder layer, per expert): cases
        qwen3_5_vl      Qwen3_5ForConditionalGeneration (dense, tied embeddings, vision tower)
        qwen3_5_moe_vl  Qwen3_5MoeForConditionalGeneration (MoE; the decoder's experts fused as the
                        hub stores them: save_pretrained(save_original_format=False))
        qwen3_next_mtp  Qwen3NextForCausalLM with its MTP layer
  check_hf <exported_dir> <hf_dir>
      the exported directory loads in transformers with no missing or unexpected keys and gives
      the original's logits (JSON)
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel with the text stack (CPU stand-ins as in qwen3next_oracle.py) and
      its MultiTokenPredictionBlock (`mtp_num_layers=1`, the MTP layer built from the last layer's
      spec, as get_gpt_mtp_block_spec does) loads the torch_dist checkpoint with
      dist_checkpointing.load — keys under `language_model.` for the VL wrappers, as Megatron-Bridge's
      Qwen3VLModel holds its language model — with nothing missing and nothing unexpected but the
      vision tower; its logits equal transformers'; every MTP parameter equals the value the
      Megatron-Bridge mapping gives from the hub tensors; and the vision tower's torch_dist
      tensors equal Megatron-Bridge's Qwen3.5-VL mapping of `model.visual.*` (JSON)
"""
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import TOKENS, forward  # noqa: E402
from moe_oracle import init  # noqa: E402
import qwen3next_oracle as qn  # noqa: E402

VISION = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=qn.H, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_position_embeddings=16,
              deepstack_visual_indexes=[], hidden_act="gelu_pytorch_tanh")


def text_fields(moe, tied):
    f = dict(vocab_size=qn.V, hidden_size=qn.H, num_hidden_layers=len(qn.TYPES), layer_types=qn.TYPES,
             num_attention_heads=qn.HEADS, num_key_value_heads=qn.GROUPS, head_dim=qn.HD, max_position_embeddings=64,
             rms_norm_eps=1e-6, tie_word_embeddings=tied, intermediate_size=96, linear_conv_kernel_dim=4,
             linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
             partial_rotary_factor=0.25, mtp_num_hidden_layers=1)
    if moe:
        f.update(num_experts=qn.E, num_experts_per_tok=qn.TOPK, moe_intermediate_size=qn.MOE_FFN,
                 shared_expert_intermediate_size=qn.SHARED, norm_topk_prob=True)
    return f


def config(case):
    from transformers import AutoConfig
    if case == "qwen3_next_mtp":
        return qn.hf_config("qwen3_next")
    moe = case == "qwen3_5_moe_vl"
    return AutoConfig.for_model(
        model_type="qwen3_5_moe" if moe else "qwen3_5",
        architectures=["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        text_config=dict(model_type="qwen3_5_moe_text" if moe else "qwen3_5_text", **text_fields(moe, tied=not moe), dtype="float32"),
        vision_config=dict(model_type="qwen3_5_moe" if moe else "qwen3_5", **VISION),
        tie_word_embeddings=not moe, dtype="float32",
    )


def model_class(case):
    import transformers
    return {"qwen3_5_vl": transformers.Qwen3_5ForConditionalGeneration, "qwen3_5_moe_vl": transformers.Qwen3_5MoeForConditionalGeneration,
            "qwen3_next_mtp": transformers.Qwen3NextForCausalLM}[case]


def read_all(d):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def mtp_tensors(sd, cfg):
    """The hub's mtp.* names: head tensors + the last full-attention layer's, per expert."""
    t = getattr(cfg, "text_config", cfg)
    last = max(i for i, k in enumerate(t.layer_types) if k == "full_attention")
    g = torch.Generator().manual_seed(11)
    out = {}
    pre = [p for p in ("model.language_model.layers.", "model.layers.") if any(k.startswith(p) for k in sd)][0]
    for k, v in sd.items():
        if not k.startswith(f"{pre}{last}."):
            continue
        rest = k[len(f"{pre}{last}."):]
        if rest.endswith("experts.gate_up_proj"):  # fused decoder experts: the MTP layer's are per expert
            E, twoF, Hd = v.shape
            for e in range(E):
                out[f"mtp.layers.0.{rest[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = torch.randn(twoF // 2, Hd, generator=g) * 0.1
                out[f"mtp.layers.0.{rest[:-len('gate_up_proj')]}{e}.up_proj.weight"] = torch.randn(twoF // 2, Hd, generator=g) * 0.1
            continue
        if rest.endswith("experts.down_proj"):
            E, Hd, F = v.shape
            for e in range(E):
                out[f"mtp.layers.0.{rest[:-len('down_proj')]}{e}.down_proj.weight"] = torch.randn(Hd, F, generator=g) * 0.1
            continue
        out[f"mtp.layers.0.{rest}"] = (torch.randn(v.shape, generator=g) * 0.3).to(v.dtype)
    H = t.hidden_size
    out["mtp.fc.weight"] = torch.randn(H, 2 * H, generator=g) * 0.1
    for n in ("mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"):
        out[n] = torch.randn(H, generator=g) * 0.3
    return out


def cmd_make(hf_dir, case):
    from safetensors.torch import save_file
    torch.manual_seed(5)
    cfg = config(case)
    m = model_class(case)._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("linear_attn.norm.weight"):
                p.copy_(torch.rand_like(p) * 1.4 + 0.55)  # HF − 1 in Megatron: exact in [0.5, 2]
            elif "visual" in n and ("norm" in n and n.endswith("weight")):
                p.copy_(1 + torch.randn_like(p) * 0.1)
            elif "norm" in n:
                p.copy_(torch.randn_like(p) * 0.3)
            elif n.endswith("mlp.gate.weight") or "shared_expert_gate" in n or "A_log" in n or "dt_bias" in n or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    m.save_pretrained(hf_dir, save_original_format=case != "qwen3_5_moe_vl")
    sd = read_all(hf_dir)
    sd.update(mtp_tensors(sd, cfg))
    for f in os.listdir(hf_dir):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(hf_dir, f))
    save_file(sd, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    return {"tensors": len(sd), "mtp": sum(1 for k in sd if k.startswith("mtp.")), "visual": sum(1 for k in sd if k.startswith("model.visual."))}


def hf_logits(d, case):
    m, info = model_class(case).from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return m.eval()(input_ids=TOKENS).logits, info


def cmd_check_hf(out_dir, hf_dir, case):
    got, info = hf_logits(out_dir, case)
    ref, _ = hf_logits(hf_dir, case)
    return {"missing": sorted(info["missing_keys"]), "unexpected": sorted(k for k in info["unexpected_keys"] if not k.startswith("mtp.")),
            "max_abs_diff": (got - ref).abs().max().item()}


def build_with_mtp(h):
    """qwen3next_oracle.build's stack plus megatron-core's MTP block (its layer: the last decoder layer's spec)."""
    import megatron.core.models.gpt.gpt_model as gm
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules, MultiTokenPredictionLayer, MultiTokenPredictionLayerSubmodules)
    from megatron.core.transformer.spec_utils import ModuleSpec
    captured = {}
    orig = gm.GPTModel.__init__

    def init_with_mtp(self, *a, **kw):
        spec = kw["transformer_layer_spec"]
        kw["config"].mtp_num_layers = 1
        layer = ModuleSpec(module=MultiTokenPredictionLayer, submodules=MultiTokenPredictionLayerSubmodules(
            enorm=qn.ZcRMSNorm, hnorm=qn.ZcRMSNorm, eh_proj=ColumnParallelLinear, transformer_layer=spec.layer_specs[-1], layer_norm=qn.ZcRMSNorm))
        kw["mtp_block_spec"] = MultiTokenPredictionBlockSubmodules(layer_specs=[layer])
        captured["ok"] = True
        orig(self, *a, **kw)

    gm.GPTModel.__init__ = init_with_mtp
    try:
        return qn.build(h, ((h.vocab_size + 127) // 128) * 128)
    finally:
        gm.GPTModel.__init__ = orig


def gated_qkv(q, k, v, heads, groups, hd):
    """Megatron's linear_qkv for gated attention (Megatron-Bridge merge_qkv_weights with attention_output_gate)."""
    Hd = q.shape[-1]
    q = q.view(heads, 2 * hd, Hd)
    qq, z = q[:, :hd], q[:, hd:]
    k = k.view(groups, hd, Hd)
    v = v.view(groups, hd, Hd)
    r = heads // groups
    parts = []
    for g in range(groups):
        parts += [qq[g * r:(g + 1) * r], z[g * r:(g + 1) * r], k[g:g + 1], v[g:g + 1]]
    return torch.cat([p.reshape(-1, Hd) for p in parts])


def expected_mtp(hf, h):
    """megatron name → value: Megatron-Bridge's Qwen3-Next / Qwen3.5 MTP mapping of the hub's mtp.* tensors."""
    t = "mtp.layers.0.transformer_layer."
    e = {"mtp.layers.0.enorm.weight": hf["mtp.pre_fc_norm_embedding.weight"], "mtp.layers.0.hnorm.weight": hf["mtp.pre_fc_norm_hidden.weight"],
         "mtp.layers.0.eh_proj.weight": hf["mtp.fc.weight"], "mtp.layers.0.final_layernorm.weight": hf["mtp.norm.weight"],
         t + "self_attention.linear_qkv.layer_norm_weight": hf["mtp.layers.0.input_layernorm.weight"],
         t + "self_attention.linear_qkv.weight": gated_qkv(hf["mtp.layers.0.self_attn.q_proj.weight"], hf["mtp.layers.0.self_attn.k_proj.weight"],
                                                           hf["mtp.layers.0.self_attn.v_proj.weight"], h.num_attention_heads, h.num_key_value_heads, h.head_dim),
         t + "self_attention.q_layernorm.weight": hf["mtp.layers.0.self_attn.q_norm.weight"],
         t + "self_attention.k_layernorm.weight": hf["mtp.layers.0.self_attn.k_norm.weight"],
         t + "self_attention.linear_proj.weight": hf["mtp.layers.0.self_attn.o_proj.weight"]}
    if getattr(h, "num_experts", None):
        e[t + "pre_mlp_layernorm.weight"] = hf["mtp.layers.0.post_attention_layernorm.weight"]
        e[t + "mlp.router.weight"] = hf["mtp.layers.0.mlp.gate.weight"]
        for x in range(h.num_experts):
            p = f"mtp.layers.0.mlp.experts.{x}."
            e[t + f"mlp.experts.local_experts.{x}.linear_fc1.weight"] = torch.cat([hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]])
            e[t + f"mlp.experts.local_experts.{x}.linear_fc2.weight"] = hf[p + "down_proj.weight"]
        s = "mtp.layers.0.mlp.shared_expert."
        e[t + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([hf[s + "gate_proj.weight"], hf[s + "up_proj.weight"]])
        e[t + "mlp.shared_experts.linear_fc2.weight"] = hf[s + "down_proj.weight"]
        e[t + "mlp.shared_experts.gate_weight"] = hf["mtp.layers.0.mlp.shared_expert_gate.weight"]
    else:
        e[t + "mlp.linear_fc1.layer_norm_weight"] = hf["mtp.layers.0.post_attention_layernorm.weight"]
        e[t + "mlp.linear_fc1.weight"] = torch.cat([hf["mtp.layers.0.mlp.gate_proj.weight"], hf["mtp.layers.0.mlp.up_proj.weight"]])
        e[t + "mlp.linear_fc2.weight"] = hf["mtp.layers.0.mlp.down_proj.weight"]
    return e


def expected_vision(hf, v):
    """Megatron-Bridge's Qwen3.5-VL vision mapping (qwen35_vl_bridge.py): torch_dist key → value (layers stacked)."""
    heads, hd = v["num_heads"], v["hidden_size"] // v["num_heads"]
    e = {"vision_model.patch_embed.proj.weight": hf["model.visual.patch_embed.proj.weight"], "vision_model.patch_embed.proj.bias": hf["model.visual.patch_embed.proj.bias"],
         "vision_model.pos_embed.weight": hf["model.visual.pos_embed.weight"],
         "vision_model.merger.patch_norm.weight": hf["model.visual.merger.norm.weight"], "vision_model.merger.patch_norm.bias": hf["model.visual.merger.norm.bias"]}
    for n in ("linear_fc1", "linear_fc2"):
        for w in ("weight", "bias"):
            e[f"vision_model.merger.{n}.{w}"] = hf[f"model.visual.merger.{n}.{w}"]
    per = {}
    for b in range(v["depth"]):
        B = f"model.visual.blocks.{b}."

        def concat_qkv(x):  # ConcatenatedQKVMapping: split [q; k; v], interleave per head (groups = heads)
            q, k, vv = x.split([heads * hd] * 3)
            sh = (heads, hd) + tuple(x.shape[1:])
            return torch.stack([q.reshape(sh), k.reshape(sh), vv.reshape(sh)], 1).reshape(x.shape)

        layer = {"self_attention.linear_qkv.layer_norm_weight": hf[B + "norm1.weight"], "self_attention.linear_qkv.layer_norm_bias": hf[B + "norm1.bias"],
                 "self_attention.linear_qkv.weight": concat_qkv(hf[B + "attn.qkv.weight"]), "self_attention.linear_qkv.bias": concat_qkv(hf[B + "attn.qkv.bias"]),
                 "self_attention.linear_proj.weight": hf[B + "attn.proj.weight"], "self_attention.linear_proj.bias": hf[B + "attn.proj.bias"],
                 "mlp.linear_fc1.layer_norm_weight": hf[B + "norm2.weight"], "mlp.linear_fc1.layer_norm_bias": hf[B + "norm2.bias"]}
        for n in ("linear_fc1", "linear_fc2"):
            for w in ("weight", "bias"):
                layer[f"mlp.{n}.{w}"] = hf[B + f"mlp.{n}.{w}"]
        for k, x in layer.items():
            per.setdefault(k, []).append(x)
    for k, xs in per.items():
        e[f"vision_model.decoder.layers.{k}"] = torch.stack(xs)
    return e


def raw_dcp(iter_dir, keys):
    """The named tensors of a DCP checkpoint, as torch.distributed.checkpoint reads them."""
    import torch.distributed.checkpoint as dcp
    reader = dcp.FileSystemReader(iter_dir)
    md = reader.read_metadata()
    sd = {k: torch.empty(md.state_dict_metadata[k].size, dtype=md.state_dict_metadata[k].properties.dtype) for k in keys if k in md.state_dict_metadata}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd, md


def compare_exports(logits_of, out_dir, hf_dir):
    """An export against its source through `logits_of(dir) -> (logits, loading info)`: the export's
    missing / unexpected keys and the largest logit difference (JSON)."""
    got, info = logits_of(out_dir)
    ref, _ = logits_of(hf_dir)
    return {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]), "max_abs_diff": (got - ref).abs().max().item()}


def carried_report(iter_dir, expected, prefixes):
    """How a torch_dist checkpoint holds the tensors a wrapper carries beside its language model
    (a vision tower, a projector): `expected` {torch_dist key: value} checked by value, and the keys
    under `prefixes` nothing expected (JSON fields vision_checked / vision_wrong / vision_unmatched)."""
    got, md = raw_dcp(iter_dir, list(expected))
    return {
        "vision_checked": len(expected),
        "vision_wrong": sorted(k for k, x in expected.items() if k not in got or got[k].shape != x.shape or not torch.equal(got[k], x)),
        "vision_unmatched": sorted(k for k in md.state_dict_metadata if k.startswith(tuple(prefixes)) and "/" not in k and not k.endswith("_extra_state") and k not in expected),
    }


def cmd_load(iter_dir, hf_dir, case):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    whole = AutoConfig.from_pretrained(hf_dir)
    h = getattr(whole, "text_config", whole)
    vl = case != "qwen3_next_mtp"
    prefix = "language_model." if vl else ""
    init(0, 1, 1, 1, tempfile.mktemp())
    model = build_with_mtp(h)
    ssd = model.sharded_state_dict(prefix=prefix)
    sd, missing, unexpected = dist_checkpointing.load(ssd, iter_dir, strict=StrictHandling.RETURN_ALL)
    # megatron-core's "missing" are checkpoint keys the model did not ask for: the vision tower's here
    # (Qwen3VLModel's vision_model, not part of this text model) — checked by value below.
    r = {"missing": sorted(k for k in missing if not k.startswith("vision_model.")), "unexpected": sorted(unexpected)}
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    state = {k[len(prefix):]: v for k, v in sd.items() if k not in common and k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    hf = read_all(hf_dir)
    names = dict(model.named_parameters())
    bad = []
    for k, want in expected_mtp(hf, h).items():
        got = names.get(k)
        if got is None or got.shape != want.shape or not torch.equal(got.detach(), want.to(got.dtype)):
            bad.append(k)
    r["mtp_checked"] = len(expected_mtp(hf, h))
    r["mtp_wrong"] = bad
    # The decoder's logits (the MTP block's forward needs labels and gives a loss, not logits).
    model.mtp_process, model.config.mtp_num_layers = False, None
    logits = forward(model)[..., : h.vocab_size]
    ref, _ = hf_logits(hf_dir, case)
    r["max_abs_diff"] = (logits - ref).abs().max().item()
    if vl:
        v = whole.vision_config.to_dict()
        exp = expected_vision(hf, v)
        got, md = raw_dcp(iter_dir, list(exp))
        r["vision_checked"] = len(exp)
        r["vision_wrong"] = sorted(k for k, x in exp.items() if k not in got or got[k].shape != x.shape or not torch.equal(got[k], x))
        r["vision_keys"] = sorted(k for k in md.state_dict_metadata if k.startswith("vision_model.") and not k.endswith("_extra_state") and "/" not in k)
    return r


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1], a[2])
    elif a[0] == "check_hf":
        r = cmd_check_hf(a[1], a[2], a[3])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2], a[3])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
