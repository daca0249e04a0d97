"""transformers 5.24 and megatron-core 0.16.1 (CPU) as oracles for Qwen3-VL (Qwen3VLForConditionalGeneration).

  make <hf_dir> [--tied]
      a tiny random Qwen3-VL (Qwen3 text decoder with q/k norms, interleaved mRoPE; a vision tower
      with two deepstack mergers) saved with save_pretrained, random norms and biases
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel with the text stack (local spec, q/k layernorm) loads the torch_dist
      checkpoint's `language_model.*` keys (Megatron-Bridge's Qwen3VLModel holds its language model so)
      with nothing missing or unexpected but the vision tower; its logits equal transformers' on
      text tokens (mRoPE with equal t/h/w positions is plain RoPE); the vision tower's torch_dist
      tensors equal Megatron-Bridge's Qwen3-VL mapping of `model.visual.*` (qwen3_vl_bridge.py:
      qwen35vl_oracle's tower mapping plus the deepstack mergers) (JSON)
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


def config(tied):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], text_config=dict(TEXT, dtype="float32"),
                                vision_config=VISION, tie_word_embeddings=tied, dtype="float32")


def cmd_make(hf_dir, tied):
    import transformers
    torch.manual_seed(5)
    m = transformers.Qwen3VLForConditionalGeneration._from_config(config(tied), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "visual" in n and "norm" in n and n.endswith("weight"):
                p.copy_(1 + torch.randn_like(p) * 0.1)
            elif "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    m.save_pretrained(hf_dir)
    sd = q35.read_all(hf_dir)
    return {"tensors": len(sd), "deepstack": sum(1 for k in sd if ".deepstack_merger_list." in k), "lm_head": "lm_head.weight" in sd}


def hf_logits(d):
    import transformers
    m, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return m.eval()(input_ids=TOKENS).logits, info


def cmd_check_hf(out_dir, hf_dir):
    got, info = hf_logits(out_dir)
    ref, _ = hf_logits(hf_dir)
    return {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]), "max_abs_diff": (got - ref).abs().max().item()}


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
    model = megatron_build(c, meta["language_model.embedding.word_embeddings.weight"].global_shape[0])
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
    got, md = q35.raw_dcp(iter_dir, list(exp))
    r["vision_checked"] = len(exp)
    r["vision_wrong"] = sorted(k for k, x in exp.items() if k not in got or got[k].shape != x.shape or not torch.equal(got[k], x))
    r["vision_unmatched"] = sorted(k for k in md.state_dict_metadata if k.startswith("vision_model.") and "/" not in k and not k.endswith("_extra_state") and k not in exp)
    return r


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1], "--tied" in a)
    elif a[0] == "check_hf":
        r = cmd_check_hf(a[1], a[2])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
