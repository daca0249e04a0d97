"""The reference block FP8 quantizer (Megatron-Bridge's _quantize_fp8_2d_blocks, as copied in
deepseek_oracle.py) applied to a bf16 DeepSeek-V3 checkpoint, and a block-by-block comparison of two
FP8 checkpoints.

  quantize <bf16_dir> <out_dir>
      every linear weight DeepSeek-V3's hub stores in FP8 (attention and MLP projections; not
      embeddings, head, norms, router, eh_proj) quantized in 128x128 blocks: <name> float8_e4m3fn and
      <name>_scale_inv float32; every other tensor as it is (JSON)
  blocks <fp8_a> <fp8_b>
      per 128x128 block of every FP8 weight: does its scale differ, do its e4m3 bytes differ, how many
      values differ (JSON)
"""
import json
import os
import re
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from deepseek_oracle import quantize_fp8_2d_blocks  # noqa: E402

FP8_LINEAR = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj))\.weight$")


def cmd_quantize(src, out):
    sd = load_file(os.path.join(src, "model.safetensors"))
    res, n = {}, 0
    for k, v in sd.items():
        if FP8_LINEAR.search(k) and v.ndim == 2:
            q, s = quantize_fp8_2d_blocks(v)
            res[k], res[k + "_scale_inv"] = q, s
            n += 1
        else:
            res[k] = v
    os.makedirs(out, exist_ok=True)
    save_file(res, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return {"ok": True, "quantized": n}


def cmd_blocks(a, b):
    x, y = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    blocks = scale_differs = bytes_differ = values = values_differ = 0
    for k, v in x.items():
        if v.dtype != torch.float8_e4m3fn:
            continue
        w = y[k]
        sa, sb = x[k + "_scale_inv"], y[k + "_scale_inv"]
        R, C = v.shape
        for i in range(sa.shape[0]):
            for j in range(sa.shape[1]):
                blocks += 1
                ba = v[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].view(torch.uint8)
                bb = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].view(torch.uint8)
                d = int((ba != bb).sum())
                values += ba.numel()
                values_differ += d
                scale_differs += int(sa[i, j].item() != sb[i, j].item())
                bytes_differ += int(d > 0)
    return {"blocks": blocks, "blocks_scale_differs": scale_differs, "blocks_bytes_differ": bytes_differ, "values": values, "values_differ": values_differ}


def main():
    a = sys.argv[1:]
    r = cmd_quantize(a[1], a[2]) if a[0] == "quantize" else cmd_blocks(a[1], a[2]) if a[0] == "blocks" else None
    if r is None:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
