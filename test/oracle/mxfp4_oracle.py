"""transformers' own MXFP4 quantizer as the oracle of `convert --to hf --quantize mxfp4`.

transformers 5.24 quantizes GPT-OSS experts with `integrations.mxfp4.quantize_to_mxfp4(w, hub)`,
which calls the hub kernel package's `numerics_details.mxfp.downcast_to_mxfp_torch`. That package
(triton_kernels) has no usable PyPI release (triton-kernels 0.1.0 lacks numerics_details); vLLM's
wheel carries a copy (`vllm/third_party/triton_kernels`), and it imports `triton` (1 GB installed),
too heavy for the test venv. So this script is run by hand and its output committed as the golden
fixture test/fixtures/mxfp4-quantize.safetensors, which test/unit/mxfp4-quantize.test.ts checks
shardshift against bit for bit:

  python -m venv /tmp/mxvenv && /tmp/mxvenv/bin/pip install torch==2.13.0 triton==3.9.0 \
      transformers==5.24.0 safetensors==0.8.0 numpy
  pip download --no-deps vllm==0.33.0 -d /tmp/vllm && cd /tmp/vllm && unzip -q vllm-*.whl 'vllm/third_party/triton_kernels/*'
  PYTHONPATH=/tmp/vllm/vllm/third_party /tmp/mxvenv/bin/python test/oracle/mxfp4_oracle.py golden test/fixtures/mxfp4-quantize.safetensors

  golden <out.safetensors>
      `w` bf16 [1, 256, N] (an HF expert weight, input-major) whose N output rows hold the cases
      below, and `w_blocks` uint8 [1, N, 8, 16] / `w_scales` uint8 [1, N, 8]: transformers'
      quantize_to_mxfp4(w) laid out as the hub stores it (Mxfp4ReverseDeserialize's transpose).
      Cases, 32 values a block: for each of 22 block maxima (6·2^t exactly, just above and below,
      3.1·2^t, 4·2^t, from bf16's smallest normals to its largest values) every bf16 magnitude
      from max·2^-12 to max with both signs, and the bf16 subnormals; random normal blocks at
      scales 2^-135 … 2^125; zero, negative-zero, all-subnormal and bf16-max blocks.
"""
import sys

import torch

K = 256  # 8 blocks of 32 inputs per output row


def bf16_from_bits(bits):
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def cases():
    blocks = []  # lists of 32 bf16 bit patterns
    mags = list(range(0, 0x7F80))  # every finite bf16 magnitude, by bits
    for t in (-126, -125, -100, -60, -20, -3, -1, 0, 1, 2, 3, 10, 60, 100, 124):
        for mult in (6.0, 3.1, 4.0) if t in (-126, 0, 60, 124) else (6.0,):
            m = torch.tensor(mult * 2.0**t, dtype=torch.float32).to(torch.bfloat16)
            mb = int(m.view(torch.int16).item()) & 0x7FFF
            for top in {mb, mb + 1, mb - 1}:
                lo = max(0, top - 12 * 128)
                vals = [b for b in range(lo, top + 1)] + [b | 0x8000 for b in range(lo, top + 1)]
                # the max in slot 0 of every block, 31 sweep values after it
                for i in range(0, len(vals), 31):
                    blocks.append([top] + vals[i:i + 31] + [0] * (31 - len(vals[i:i + 31])))
    sub = list(range(1, 0x80))  # bf16 subnormals, both signs
    sv = sub + [b | 0x8000 for b in sub]
    for i in range(0, len(sv), 31):
        blocks.append([0x0100] + sv[i:i + 31] + [0] * (31 - len(sv[i:i + 31])))
        blocks.append([0x007F] + sv[i:i + 31] + [0] * (31 - len(sv[i:i + 31])))
    g = torch.Generator().manual_seed(0)
    for s in range(-135, 126, 2):
        for _ in range(6):
            x = (torch.randn(32, generator=g) * 2.0**s).to(torch.bfloat16)
            blocks.append([int(v) & 0xFFFF for v in x.view(torch.int16).tolist()])
    blocks.append([0] * 32)
    blocks.append([0x8000] * 32)
    blocks.append([0x8000, 0] * 16)
    blocks.append(list(range(1, 33)))
    blocks.append([0x7F7F] + [0xFF7F] + list(range(0x7000, 0x7000 + 30)))
    while len(blocks) % (K // 32):
        blocks.append([0] * 32)
    return blocks


def cmd_golden(out):
    import triton_kernels
    import triton_kernels.numerics_details.mxfp  # noqa: F401 (the attribute path transformers takes)
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import quantize_to_mxfp4

    flat = [b for blk in cases() for b in blk]
    rows = bf16_from_bits(flat).reshape(-1, K)  # [N, K]: output rows
    w = rows.t().contiguous().unsqueeze(0)  # [1, K, N]: transformers' input-major expert weight
    q, s = quantize_to_mxfp4(w, triton_kernels)  # [1, K/2, N], [1, K/32, N]
    scales = s.transpose(-1, -2).contiguous()
    blocks = q.transpose(-1, -2).contiguous().reshape(*scales.shape, -1)
    save_file({"w": w, "w_blocks": blocks, "w_scales": scales}, out, metadata={"made_by": "test/oracle/mxfp4_oracle.py golden", "quantizer": "transformers 5.24.0 quantize_to_mxfp4 → vllm 0.33.0 third_party/triton_kernels downcast_to_mxfp_torch"})
    print(f"{rows.shape[0]} rows, {rows.shape[0] * K // 32} blocks")


if __name__ == "__main__":
    {"golden": cmd_golden}[sys.argv[1]](*sys.argv[2:])
