"""transformers 5.24 and megatron-core 0.16.1 (CPU) as oracles for Qwen3-VL (Qwen3VLForConditionalGeneration).

  make <hf_dir> [--tied] [--moe [--hub-layout]]
      a tiny random Qwen3-VL (Qwen3 text decoder with q/k norms, interleaved mRoPE; a vision tower
      with two deepstack mergers) saved with save_pretrained, random norms and biases; --moe makes a
      Qwen3VLMoeForConditionalGeneration (layer 1 dense via mlp_only_layers); save_pretrained of a model
      built from a config writes its experts fused output-major ([E, 2F, H] / [E, H, F]); --hub-layout
      rewrites them as the hub stores them, input-major (gate_up_proj [E, H, 2F], down_proj [E, F, H]),
      which transformers' qwen3_vl_moe conversion mapping transposes on load
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel with the text stack (local spec, q/k layernorm) loads the torch_dist
      checkpoint's `language_model.*` keys (Megatron-Bridge's Qwen3VLModel holds its language model so)
      with nothing missing or unexpected but the vision tower; its logits equal transformers' on
      text tokens (mRoPE with equal t/h/w positions is plain RoPE); the vision tower's torch_dist
      tensors equal Megatron-Bridge's Qwen3-VL mapping of `model.visual.*` (qwen3_vl_bridge.py:
      qwen35vl_oracle's tower mapping plus the deepstack mergers) (JSON)
  strip_layout <iter_dir>
      removes shardshift's own record of the HF expert layout (args.shardshift_hf_layout) from the
      checkpoint's common.pt, as a checkpoint megatron-core saved would lack it
  check_hf <exported_dir> <hf_dir>
      the export loads in transformers with no missing or unexpected keys and gives the original's logits
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
from megatron_oracle import build as megatron_build  # noqa: E402
from moe_oracle import init  # noqa: E402
import qwen35vl_oracle as q35  # noqa: E402

V = 100
TEXT = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True})
VISION = dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2, in_channels=3, num_position_embeddings=16, deepstack_visual_indexes=[0, 2], hidden_act="gelu_pytorch_tanh")


MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True)


def config(tied, moe=False):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type="qwen3_vl_moe" if moe else "qwen3_vl",
                                architectures=["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
                                text_config=dict(TEXT, dtype="float32", **(MOE if moe else {})),
                                vision_config=VISION, tie_word_embeddings=tied, dtype="float32")


def model_class(d_or_moe):
    import transformers
    moe = d_or_moe if isinstance(d_or_moe, bool) else json.load(open(os.path.join(d_or_moe, "config.json")))["model_type"] == "qwen3_vl_moe"
    return transformers.Qwen3VLMoeForConditionalGeneration if moe else transformers.Qwen3VLForConditionalGeneration


def cmd_make(hf_dir, tied, moe, hub_layout=False):
    torch.manual_seed(5)
    m = model_class(moe)._from_config(config(tied, moe), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "visual" in n and "norm" in n and n.endswith("weight"):
                p.copy_(1 + torch.randn_like(p) * 0.1)
            elif "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif n.endswith(".bias") or n.endswith("mlp.gate.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    m.save_pretrained(hf_dir)
    sd = q35.read_all(hf_dir)
    if hub_layout:
        from safetensors.torch import save_file
        sd = {k: (v.transpose(1, 2).contiguous() if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")) else v) for k, v in sd.items()}
        for f in os.listdir(hf_dir):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(hf_dir, f))
        save_file(sd, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    experts = {k: list(v.shape) for k, v in sd.items() if ".mlp.experts." in k and "layers.0." in k}
    return {"tensors": len(sd), "deepstack": sum(1 for k in sd if ".deepstack_merger_list." in k), "lm_head": "lm_head.weight" in sd, "experts": experts}


def hf_logits(d):
    m, info = model_class(d).from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return m.eval()(input_ids=TOKENS).logits, info


def cmd_check_hf(out_dir, hf_dir):
    return q35.compare_exports(hf_logits, out_dir, hf_dir)


def expected_vision(hf, v):
    """Megatron-Bridge's Qwen3-VL vision mapping: the Qwen3.5 tower's plus the deepstack mergers."""
    e = q35.expected_vision(hf, v)
    for k in range(len(v.get("deepstack_visual_indexes") or [])):
        H, M = f"model.visual.deepstack_merger_list.{k}.", f"vision_model.decoder.deepstack_merger_list.{k}."
        e[M + "patch_norm.weight"], e[M + "patch_norm.bias"] = hf[H + "norm.weight"], hf[H + "norm.bias"]
        for n in ("linear_fc1", "linear_fc2"):
            for w in ("weight", "bias"):
                e[M + f"{n}.{w}"] = hf[H + f"{n}.{w}"]
    return e


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    whole = AutoConfig.from_pretrained(hf_dir)
    h = whole.text_config
    tied = bool(whole.tie_word_embeddings)
    c = dict(layers=h.num_hidden_layers, hidden=h.hidden_size, heads=h.num_attention_heads, groups=h.num_key_value_heads, ffn=h.intermediate_size,
             head_dim=h.head_dim, eps=h.rms_norm_eps, bias=False, qk=True, tied=tied, max_pos=h.max_position_embeddings,
             rope_theta=(h.rope_parameters or {}).get("rope_theta", 10000.0), vocab=h.vocab_size)
    init(0, 1, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    padded = meta["language_model.embedding.word_embeddings.weight"].global_shape[0]
    if getattr(h, "num_experts", None):
        import moe_oracle
        only = list(h.mlp_only_layers or [])
        freq = [0 if i in only else 1 for i in range(h.num_hidden_layers)]
        c.update(experts=h.num_experts, topk=h.num_experts_per_tok, moe_ffn=h.moe_intermediate_size, freq=freq if 0 in freq else 1,
                 pre_softmax=not h.norm_topk_prob)
        model = moe_oracle.build(c, padded)
    else:
        model = megatron_build(c, padded)
    prefix = "language_model."
    sd, missing, unexpected = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), iter_dir, strict=StrictHandling.RETURN_ALL)
    r = {"missing": sorted(k for k in missing if not k.startswith("vision_model.")), "unexpected": sorted(unexpected)}
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k not in common and k.startswith(prefix)}, strict=True)
    logits = forward(model)[..., : c["vocab"]]
    ref, _ = hf_logits(hf_dir)
    r["max_abs_diff"] = (logits - ref).abs().max().item()
    hf = q35.read_all(hf_dir)
    exp = expected_vision(hf, whole.vision_config.to_dict())
    r.update(q35.carried_report(iter_dir, exp, ("vision_model.",)))
    return r


def cmd_strip_layout(iter_dir):
    path = os.path.join(iter_dir, "common.pt")
    common = torch.load(path, map_location="cpu", weights_only=False)
    had = hasattr(common["args"], "shardshift_hf_layout")
    if had:
        delattr(common["args"], "shardshift_hf_layout")
    torch.save(common, path)
    return {"removed": had}


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1], "--tied" in a, "--moe" in a, "--hub-layout" in a)
    elif a[0] == "check_hf":
        r = cmd_check_hf(a[1], a[2])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    elif a[0] == "strip_layout":
        r = cmd_strip_layout(a[1])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
