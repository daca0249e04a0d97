"""compressed-tensors 0.20.1 (PackedQuantizationCompressor.compress / .decompress) as the oracle for INT4 pack-quantized weights (Kimi K2-Thinking / K2.5
routed experts: symmetric, per-group scales, group_size 32).

  table <out_dir>
      <out_dir>/int4.safetensors: weights packed by the package's own PackedQuantizationCompressor
      (every 4-bit value in every group, under bf16 / fp16 / fp32 scales including edge ones: 1,
      negative, zero, subnormal, a bf16 overflow to Inf, random), as `<X>.weight_packed` int32,
      `<X>.weight_scale`, `<X>.weight_shape` int64 — the triplet the hub checkpoints hold — and
      <out_dir>/ref.safetensors: `<X>.weight`, the package's decompress_weight of each (JSON)
  make <hf_dir>
      a tiny DeepSeek-V3-shaped model (deepseek_oracle.py's v3_noq case) in the Kimi K2-Thinking
      layout: routed experts INT4 pack-quantized by the package (scales amax/7 per group of 32, in
      bf16), everything else bf16 (router weight and bias float32), config.json with K2-Thinking's
      quantization_config; <hf_dir>.ref/ the same model with the experts decompressed by the
      package (bf16) and no quantization_config (JSON)
"""
import json
import os
import shutil
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

GROUP = 32
ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
SCHEME = QuantizationScheme(targets=["Linear"], weights=ARGS)
# Kimi K2-Thinking / K2.5's quantization_config (moonshotai/Kimi-K2.5 text_config, as published).
QCONFIG = {
    "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                  "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": GROUP,
                                              "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                                              "symmetric": True, "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}


def compress(w, scale):
    """The package's own compression of weight w [R, C] with per-group scale [R, C/32]."""
    return PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, SCHEME)


def decompress(d, scale):
    """The package's own decompression (PackedQuantizationCompressor.decompress)."""
    sd = {"weight_packed": d["weight_packed"], "weight_scale": scale, "weight_shape": d["weight_shape"]}
    return PackedQuantizationCompressor.decompress(sd, SCHEME)["weight"]


def cmd_table(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    packed, ref = {}, {}
    edge = [1.0, -0.75, 0.0, 2.0 ** -130, 3.0e38, 2.0 ** -6, 1 / 448, 0.3]
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        name = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[dt]
        R, C = 16, 96 if dt != torch.float32 else 200 - 200 % GROUP + GROUP  # 96 / 224 columns: words not a power of two
        # Every 4-bit value in every group: q cycles -8 … 7 with a per-row phase.
        q = torch.stack([(torch.arange(C) + 3 * r) % 16 - 8 for r in range(R)]).to(torch.int8)
        scale = torch.empty(R, C // GROUP, dtype=torch.float32)
        for r in range(R):
            for j in range(C // GROUP):
                k = r * (C // GROUP) + j
                scale[r, j] = edge[k % len(edge)] if k < 2 * len(edge) else float(torch.exp(torch.randn(1, generator=g) * 4))
        scale = scale.to(dt)
        finfo = torch.finfo(dt)
        scale = torch.where(scale.isinf(), torch.full_like(scale, finfo.max), scale)
        # compress_weight quantizes w / scale: give it q · scale where that is exact, else pack q directly.
        d = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([R, C])}
        x = decompress(d, scale)
        packed[f"{name}.weight_packed"] = d["weight_packed"]
        packed[f"{name}.weight_scale"] = scale
        packed[f"{name}.weight_shape"] = d["weight_shape"]
        ref[f"{name}.weight"] = x
        # A round trip through the compressor itself (random weights, amax/7 scales): pack, unpack.
        w = torch.randn(R, C, generator=g).to(dt)
        s = (w.float().view(R, C // GROUP, GROUP).abs().amax(-1) / 7).clamp(min=1e-8).to(dt)
        d2 = compress(w, s)
        packed[f"{name}_rt.weight_packed"] = d2["weight_packed"]
        packed[f"{name}_rt.weight_scale"] = s
        packed[f"{name}_rt.weight_shape"] = d2["weight_shape"]
        ref[f"{name}_rt.weight"] = decompress(d2, s)
    save_file({k: v.contiguous() for k, v in packed.items()}, os.path.join(out_dir, "int4.safetensors"))
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out_dir, "ref.safetensors"))
    return {"ok": True, "tensors": sorted(ref), "shape_dtype": str(d["weight_shape"].dtype),
            "nonfinite": int(sum((~v.isfinite()).sum().item() for v in ref.values()))}


def cmd_make(hf_dir):
    from deepseek_oracle import cmd_make as make_deepseek
    make_deepseek(hf_dir, "v3_noq")
    path = os.path.join(hf_dir, "model.safetensors")
    sd = load_file(path)
    out, ref = {}, {}
    n = 0
    for k, v in sd.items():
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            w = v.to(torch.bfloat16)
            R, C = w.shape
            s = (w.float().view(R, C // GROUP, GROUP).abs().amax(-1) / 7).clamp(min=1e-8).to(torch.bfloat16)
            d = compress(w, s)
            base = k[: -len(".weight")]
            out[f"{base}.weight_packed"] = d["weight_packed"]
            out[f"{base}.weight_scale"] = s
            out[f"{base}.weight_shape"] = d["weight_shape"]
            ref[k] = decompress(d, s)
            n += 1
        else:
            keep32 = k.endswith("mlp.gate.weight") or k.endswith("e_score_correction_bias")
            out[k] = v if keep32 else v.to(torch.bfloat16)
            ref[k] = out[k]
    shutil.rmtree(hf_dir + ".ref", ignore_errors=True)
    shutil.copytree(hf_dir, hf_dir + ".ref")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(hf_dir + ".ref", "model.safetensors"), metadata={"format": "pt"})
    for d, q in ((hf_dir, True), (hf_dir + ".ref", False)):
        cp = os.path.join(d, "config.json")
        cfg = json.load(open(cp))
        cfg.pop("quantization_config", None)
        if q:
            cfg["quantization_config"] = QCONFIG
        cfg["torch_dtype"] = "bfloat16"
        cfg.pop("dtype", None)
        json.dump(cfg, open(cp, "w"), indent=2)
    return {"ok": True, "int4_weights": n}


def main():
    a = sys.argv[1:]
    if a[0] == "table":
        r = cmd_table(a[1])
    elif a[0] == "make":
        r = cmd_make(a[1])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
