"""transformers 5.24 and megatron-core 0.16.1 (CPU) as oracles for Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration).

  make <hf_dir> [--native-names]
      a tiny random Qwen2.5-VL (Qwen2 text decoder with q/k/v biases; a vision tower with window and
      full-attention blocks) saved with save_pretrained — which writes the hub's names (`model.layers.*`,
      `visual.*`); --native-names renames them to transformers 5's in-memory ones
      (`model.language_model.*`, `model.visual.*`), which transformers loads too
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel with the text stack (local spec) loads the torch_dist checkpoint's
      `language_model.*` keys with nothing missing or unexpected but the vision tower; logits equal
      transformers' on text tokens; the vision tower's torch_dist tensors equal Megatron-Bridge's
      Qwen2.5-VL mapping (ReplicatedMapping "visual.**" ↔ "visual.**": every HF vision tensor under
      its own name) (JSON)
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
            max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION = dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2, in_channels=3, window_size=8, fullatt_block_indexes=[1])


def cmd_make(hf_dir, native):
    import transformers
    from transformers import AutoConfig
    from safetensors.torch import save_file
    torch.manual_seed(5)
    cfg = AutoConfig.for_model(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], text_config=dict(TEXT, dtype="float32"),
                               vision_config=VISION, tie_word_embeddings=False, dtype="float32")
    m = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or "ln_q" in n:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    m.save_pretrained(hf_dir)
    sd = q35.read_all(hf_dir)
    if native:
        sd = {("model.visual." + k[len("visual."):] if k.startswith("visual.") else "model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
              for k, v in sd.items()}
        for f in os.listdir(hf_dir):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(hf_dir, f))
        save_file(sd, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
    return {"tensors": len(sd), "prefixes": sorted({".".join(k.split(".")[:2]) for k in sd})}


def hf_logits(d):
    import transformers
    m, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return m.eval()(input_ids=TOKENS).logits, info


def cmd_check_hf(out_dir, hf_dir):
    return q35.compare_exports(hf_logits, out_dir, hf_dir)


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    whole = AutoConfig.from_pretrained(hf_dir)
    h = whole.text_config
    c = dict(layers=h.num_hidden_layers, hidden=h.hidden_size, heads=h.num_attention_heads, groups=h.num_key_value_heads, ffn=h.intermediate_size,
             head_dim=h.hidden_size // h.num_attention_heads, eps=h.rms_norm_eps, bias=True, qk=False, tied=bool(whole.tie_word_embeddings),
             max_pos=h.max_position_embeddings, rope_theta=(h.rope_parameters or {}).get("rope_theta", 10000.0), vocab=h.vocab_size)
    init(0, 1, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    model = megatron_build(c, meta["language_model.embedding.word_embeddings.weight"].global_shape[0])
    prefix = "language_model."
    sd, missing, unexpected = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), iter_dir, strict=StrictHandling.RETURN_ALL)
    r = {"missing": sorted(k for k in missing if not k.startswith("visual.")), "unexpected": sorted(unexpected)}
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k not in common and k.startswith(prefix)}, strict=True)
    logits = forward(model)[..., : c["vocab"]]
    ref, _ = hf_logits(hf_dir)
    r["max_abs_diff"] = (logits - ref).abs().max().item()
    hf = q35.read_all(hf_dir)
    exp = {("visual." + k.split("visual.", 1)[1]): v for k, v in hf.items() if k.startswith(("visual.", "model.visual."))}
    r.update(q35.carried_report(iter_dir, exp, ("visual.",)))
    return r


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1], "--native-names" in a)
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
