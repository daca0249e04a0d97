"""Real megatron-core (0.16.1, CPU, gloo) and transformers as oracles for GPT-OSS.

  make <hf_dir>
      a tiny random GptOssForCausalLM (fp32; random biases, sinks, norms and router so misplaced
      ones show; both layer types, in a non-alternating order) saved with save_pretrained
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel configured as Megatron-Bridge's GPT-OSS provider (add_bias_linear,
      softmax_type='learnable', quick-GEGLU clamped at swiglu_limit with glu_linear_offset 1,
      window_size=(sliding_window-1, 0) on the sliding layers; local spec, SequentialMLP) loads the
      torch_dist checkpoint with dist_checkpointing.load(strict=RAISE_ALL); logits vs transformers'
      (JSON: max_abs_diff, max_abs, keys)
  mxfp4 <hf_dir> <out_dir>
      the experts of <hf_dir> quantised to MXFP4 as the openai/gpt-oss hub files store them
      (`*_blocks` uint8 [E, rows, cols/32, 16], `*_scales` uint8 [E, rows, cols/32], rows/cols of
      the on-disk (output-major) layout), everything else as is; writes <out_dir>/model.safetensors
      + config.json with quantization_config, and <out_dir>/dequantized.safetensors = transformers'
      own dequantisation (convert_moe_packed_tensors) in bf16 under the unquantised HF names
  load_same <dir_a> <dir_b>
      transformers loads both MXFP4 directories (AutoModelForCausalLM, bfloat16, CPU: its
      dequantising path) and compares every parameter and the logits (JSON: params, differing,
      max_abs_diff)
"""
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import TOKENS, forward, shims  # noqa: E402
from moe_oracle import moe_shims  # noqa: E402

E, TOPK, H, HEADS, GROUPS, HD, F, V, WINDOW = 4, 2, 64, 4, 2, 16, 32, 100, 4
LAYER_TYPES = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


def hf_config():
    from transformers import AutoConfig
    return AutoConfig.for_model(
        model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=V, hidden_size=H,
        num_hidden_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES, num_attention_heads=HEADS,
        num_key_value_heads=GROUPS, head_dim=HD, intermediate_size=F, num_local_experts=E,
        num_experts_per_tok=TOPK, sliding_window=WINDOW, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        attention_bias=True, dtype="float32",
    )


def cmd_make(hf_dir):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(11)
    m = AutoModelForCausalLM.from_config(hf_config(), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif n.endswith("bias") or "sinks" in n or "router" in n:
                p.copy_(torch.randn_like(p) * (1.0 if ("router" in n or "sinks" in n) else 0.1))
            elif "experts" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    m.save_pretrained(hf_dir)
    return {"ok": True, "params": sorted(n for n, _ in m.named_parameters())}


def build(h, padded_vocab):
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=h.num_hidden_layers, hidden_size=h.hidden_size, num_attention_heads=h.num_attention_heads,
        num_query_groups=h.num_key_value_heads, ffn_hidden_size=h.intermediate_size, kv_channels=h.head_dim,
        gated_linear_unit=True, activation_func=quick_gelu, activation_func_clamp_value=h.swiglu_limit,
        glu_linear_offset=1.0, bias_activation_fusion=False, normalization="RMSNorm", layernorm_epsilon=h.rms_norm_eps,
        add_bias_linear=True, add_qkv_bias=True, softmax_type="learnable", window_size=(h.sliding_window - 1, 0),
        window_attn_skip_freq=[1 if t == "sliding_attention" else 0 for t in h.layer_types],
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=1, sequence_parallel=False,
        num_moe_experts=h.num_local_experts, moe_router_topk=h.num_experts_per_tok, moe_ffn_hidden_size=h.intermediate_size,
        moe_router_pre_softmax=False, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
    )
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=padded_vocab, max_sequence_length=h.max_position_embeddings,
        pre_process=True, post_process=True, parallel_output=False, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_base=h.rope_parameters["rope_theta"],
    )
    return model.eval()


def gptoss_shims():
    """megatron-core 0.16.1 builds the sliding-window mask on device="cuda"; the same mask on CPU."""
    import megatron.core.fusions.fused_softmax as fs

    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    fs.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def cmd_load(iter_dir, hf_dir):
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    shims()
    moe_shims()
    gptoss_shims()
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    h = AutoConfig.from_pretrained(hf_dir)
    model = build(h, ((h.vocab_size + 127) // 128) * 128)
    ssd = model.sharded_state_dict()
    keys = sorted({getattr(v, "key", k) for k, v in ssd.items()})  # the torch_dist keys
    sd = dist_checkpointing.load(ssd, iter_dir, strict=StrictHandling.RAISE_ALL)
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k: v for k, v in sd.items() if k not in common}, strict=True)
    out = {"keys": keys}
    try:
        logits = forward(model)[..., : h.vocab_size]
    except Exception as e:  # report what megatron-core could not run on CPU
        import traceback
        out["forward_error"] = f"{type(e).__name__}: {e} at {traceback.format_tb(e.__traceback__)[-1].strip()}"
        return out
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(TOKENS).logits
    out.update(max_abs_diff=(logits - want).abs().max().item(), max_abs=want.abs().max().item())
    return out


FP4_VALUES = [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def quantize_mxfp4(w):
    """[E, rows, cols] (cols % 32 == 0) → blocks uint8 [E, rows, cols/32, 16], scales uint8
    [E, rows, cols/32]: per 32-element block a power-of-two scale (biased by 127) and nibbles
    indexing FP4_VALUES (low nibble = even element), nearest value."""
    E_, R, C = w.shape
    g = w.float().reshape(E_, R, C // 32, 32)
    amax = g.abs().amax(-1).clamp(min=1e-30)
    exp = torch.clamp(torch.ceil(torch.log2(amax / 6.0)), -127, 127).to(torch.int32)
    scaled = g / torch.pow(2.0, exp.float()).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES)
    idx = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # ties: first (positive zero)
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).contiguous()
    return blocks, (exp + 127).to(torch.uint8)


def cmd_mxfp4(hf_dir, out_dir):
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    out, deq = {}, {}
    for n, t in sd.items():
        if n.endswith("mlp.experts.gate_up_proj") or n.endswith("mlp.experts.down_proj"):
            # On disk output-major [E, rows, cols]; transformers' dequantisation returns [E, cols, rows].
            blocks, scales = quantize_mxfp4(t.transpose(1, 2).contiguous())
            out[n + "_blocks"], out[n + "_scales"] = blocks, scales
            deq[n] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        else:
            out[n] = t
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, out_dir.rstrip("/") + ".dequantized.safetensors", metadata={"format": "pt"})  # beside the model dir
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    return {"ok": True, "tensors": {n: list(t.shape) for n, t in out.items() if "_blocks" in n or "_scales" in n}}


def cmd_mxfp4_table(out_dir):
    """Every scale byte (0..255) and every nibble, through transformers' own dequantisation."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(5)
    scales = torch.arange(256, dtype=torch.int32).reshape(2, 8, 16).to(torch.uint8)  # [E=2, R=8, G=16]
    blocks = torch.randint(0, 256, (2, 8, 16, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    blocks[0, 0, :, :] = torch.arange(256, dtype=torch.int32).reshape(16, 16).to(torch.uint8)  # every byte
    deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    os.makedirs(out_dir, exist_ok=True)
    save_file({"w_blocks": blocks, "w_scales": scales}, os.path.join(out_dir, "packed.safetensors"))
    save_file({"w": deq}, os.path.join(out_dir, "expected.safetensors"))
    return {"shape": list(deq.shape)}


def cmd_load_same(dir_a, dir_b):
    from transformers import AutoModelForCausalLM

    ms = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval() for d in (dir_a, dir_b)]
    sa, sb = ms[0].state_dict(), ms[1].state_dict()
    differing = [n for n in sa if n not in sb or sa[n].dtype != sb[n].dtype or not torch.equal(sa[n], sb[n])]
    with torch.no_grad():
        la, lb = (m(TOKENS).logits.float() for m in ms)
    return {"params": len(sa), "differing": differing, "max_abs_diff": float((la - lb).abs().max()),
            "experts_dtype": str(sa[next(n for n in sa if n.endswith("experts.down_proj"))].dtype)}


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2])
    elif a[0] == "mxfp4_table":
        r = cmd_mxfp4_table(a[1])
    elif a[0] == "mxfp4":
        r = cmd_mxfp4(a[1], a[2])
    elif a[0] == "load_same":
        r = cmd_load_same(a[1], a[2])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
