"""transformers 5.24 and megatron-core 0.16.1 (CPU, gloo) as oracles for Llama 4 (Llama4ForConditionalGeneration,
Llama4ForCausalLM).

  make <hf_dir> [--causal]
      a tiny random Llama 4 saved with save_pretrained: 4 layers, MoE on layers 1 and 3 (interleave step
      2, shared expert, top-1 of 4 experts, the experts fused input-major as transformers stores them),
      NoPE on layer 3, L2 q/k norms; the wrapper with a 2-layer vision model and projector, or (--causal)
      the text model alone
  load <iter_dir> <hf_dir>
      megatron-core's GPTModel built as Megatron-Bridge's llama4_utils layer spec builds it (L2Norm q/k
      norms on the RoPE layers only, no_rope_freq, rotary_interleaved, sigmoid top-k router with
      moe_apply_probs_on_input, shared experts, moe_layer_freq; local spec, SequentialMLP) loads the
      torch_dist checkpoint (the wrapper's text keys under `language_model.`) with nothing missing or
      unexpected but the carried vision model; logits vs transformers' on text tokens; the carried
      vision tensors equal the HF ones (JSON)
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
TEXT = dict(vocab_size=V, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
            max_position_embeddings=64, rope_theta=500000.0, use_qk_norm=True, attention_chunk_size=16, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
              vision_output_dim=40, projector_input_dim=40, projector_output_dim=40, pixel_shuffle_ratio=0.5)


def model_class(d_or_causal):
    import transformers
    causal = d_or_causal if isinstance(d_or_causal, bool) else json.load(open(os.path.join(d_or_causal, "config.json")))["model_type"] == "llama4_text"
    return transformers.Llama4ForCausalLM if causal else transformers.Llama4ForConditionalGeneration


def cmd_make(hf_dir, causal):
    from transformers import AutoConfig
    torch.manual_seed(5)
    if causal:
        cfg = AutoConfig.for_model(model_type="llama4_text", architectures=["Llama4ForCausalLM"], dtype="float32", tie_word_embeddings=False, **TEXT)
    else:
        cfg = AutoConfig.for_model(model_type="llama4", architectures=["Llama4ForConditionalGeneration"], text_config=dict(TEXT, dtype="float32"),
                                   vision_config=VISION, tie_word_embeddings=False, dtype="float32", image_token_index=99, boi_token_index=97, eoi_token_index=98)
    m = model_class(causal)._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.5 + 1.0)
            elif "router" in n:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 * 2)
    m.save_pretrained(hf_dir)
    sd = q35.read_all(hf_dir)
    return {"tensors": len(sd), "experts": {k: list(v.shape) for k, v in sd.items() if "layers.1.feed_forward.experts" in k}}


def hf_logits(d):
    m, info = model_class(d).from_pretrained(d, dtype=torch.float32, output_loading_info=True, attn_implementation="eager")
    m.eval()
    # transformers 5.24's Llama4ForConditionalGeneration.forward fails on text-only input (it reads
    # outputs.image_outputs from its language model's output, which has none): run the wrapper's
    # language model (a Llama4ForCausalLM, the module the text weights load into) directly.
    lm = getattr(m, "language_model", m)
    with torch.no_grad():
        return lm(input_ids=TOKENS).logits, info


def cmd_check_hf(out_dir, hf_dir):
    return q35.compare_exports(hf_logits, out_dir, hf_dir)


def llama4_spec(cfg, rope_layers):
    """Megatron-Bridge llama4_utils.get_llama4_layer_spec on the local spec: L2Norm q/k norms on RoPE layers only."""
    import dataclasses
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.torch_norm import L2Norm
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    layers = []
    for i, s in enumerate(block.layer_specs):
        norm = L2Norm if rope_layers[i] else None
        sub = dataclasses.replace(s.submodules.self_attention.submodules, q_layernorm=norm, k_layernorm=norm)
        layers.append(dataclasses.replace(s, submodules=dataclasses.replace(s.submodules, self_attention=dataclasses.replace(s.submodules.self_attention, submodules=sub))))
    return dataclasses.replace(block, layer_specs=layers)


def cmd_load(iter_dir, hf_dir):
    from transformers import AutoConfig
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    whole = AutoConfig.from_pretrained(hf_dir)
    h = getattr(whole, "text_config", whole)
    wrapper = whole.model_type == "llama4"
    prefix = "language_model." if wrapper else ""
    rope_layers = [bool(x) for x in h.no_rope_layers]
    c = dict(layers=h.num_hidden_layers, hidden=h.hidden_size, heads=h.num_attention_heads, groups=h.num_key_value_heads, ffn=h.intermediate_size_mlp,
             head_dim=h.head_dim, eps=h.rms_norm_eps, bias=False, qk=False, tied=False, max_pos=h.max_position_embeddings,
             rope_theta=h.rope_parameters["rope_theta"], vocab=h.vocab_size)
    freq = [1 if i in h.moe_layers else 0 for i in range(h.num_hidden_layers)]
    extra = dict(expert_model_parallel_size=1, sequence_parallel=False, num_moe_experts=h.num_local_experts, moe_router_topk=h.num_experts_per_tok,
                 moe_ffn_hidden_size=h.intermediate_size, moe_shared_expert_intermediate_size=h.intermediate_size, moe_layer_freq=freq,
                 moe_router_score_function="sigmoid", moe_router_pre_softmax=False, moe_apply_probs_on_input=True, moe_router_load_balancing_type="none",
                 moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, rotary_interleaved=True,
                 no_rope_freq=[0 if r else 1 for r in rope_layers])
    init(0, 1, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    model = megatron_build(c, meta[f"{prefix}embedding.word_embeddings.weight"].global_shape[0], extra=extra, block_spec=lambda cfg: llama4_spec(cfg, rope_layers))
    sd, missing, unexpected = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), iter_dir, strict=StrictHandling.RETURN_ALL)
    r = {"missing": sorted(k for k in missing if not k.startswith(("vision_model.", "multi_modal_projector."))), "unexpected": sorted(unexpected)}
    common = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
    model.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k not in common and k.startswith(prefix)}, strict=True)
    logits = forward(model)[..., : c["vocab"]]
    ref, _ = hf_logits(hf_dir)
    r["max_abs_diff"] = (logits - ref).abs().max().item()
    r["max_abs"] = ref.abs().max().item()
    hf = q35.read_all(hf_dir)
    exp = {k: v for k, v in hf.items() if k.startswith(("vision_model.", "multi_modal_projector."))}
    r.update(q35.carried_report(iter_dir, exp, ("vision_model.", "multi_modal_projector.")))
    return r


def main():
    a = sys.argv[1:]
    if a[0] == "make":
        r = cmd_make(a[1], "--causal" in a)
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
