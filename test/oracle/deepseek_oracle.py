"""Real megatron-core (0.16.1, CPU, gloo) and transformers as oracles for DeepSeek-V3 (MLA + MoE + MTP).

  make <hf_dir> <case>
      a tiny random DeepseekV3ForCausalLM saved with save_pretrained (which writes the experts per
      expert, the hub layout: mlp.experts.<e>.{gate,up,down}_proj.weight), random norms, a router with
      real preferences and a non-zero e_score_correction_bias; with num_nextn_predict_layers > 0 the
      MTP layer is added to model.safetensors under the hub names (model.layers.<L+k>.*, including
      the copies embed_tokens / shared_head.head of the main embedding / lm_head). Cases: v3, v3_noq
      (no q_lora_rank, 2 dense layers, 2 shared experts, no MTP), v3_fp8 (v3 with hidden 192 and the
      attention/MLP linears in float8_e4m3fn + 128x128 `weight_scale_inv`, as the hub checkpoint; it
      also writes <hf_dir>.ref/, the bf16 reference dequantisation by Megatron-Bridge's
      dequantize_fp8_blockwise)
  compare <hf_a> <hf_b>
      transformers loads both (float32) and compares the logits; with MTP layers, also the logits of
      transformers' generic MtpModel (modeling_layers.MtpModel) on the same hidden states (JSON)
  load <iter_dir> <hf_dir> [--mtp] [--local-names]
      megatron-core's GPTModel configured as Megatron-Bridge's DeepSeek-V3 provider (MLATransformerConfig,
      sigmoid router with expert bias, group-limited top-k, shared experts, local spec, SequentialMLP;
      --mtp adds the MTP block) loads the torch_dist checkpoint with dist_checkpointing.load(strict=
      RAISE_ALL) + load_state_dict(strict=True); logits vs transformers' (JSON)
  save <run_dir> <case> [--ep N] [--tp M] [--mtp] [--local-names]
      megatron-core saves a random model of that case's shape under EP=N x TP=M (gloo ranks) into
      <run_dir>/iter_0000002 (+ tracker), with its logits (and MTP logits), an equivalent HF config
      (<run_dir>/hf_ref) and per global expert a fingerprint (experts.json); JSON lists the keys written
  load_legacy <run_dir> <hf_dir> --ep N [--mtp]
      every EP rank (TP=1, PP=1) of megatron-core's model built with the local spec's own names loads
      shardshift's legacy rank file mp_rank_00_<e>/model_optim_rng.pt with load_state_dict(strict=True)
      (the decoder's and the MTP layer's experts local to the rank); logits (and MTP logits) vs
      transformers' (JSON). TP>1 would need TE's MLA modules (the TE names), PP>1 a pipelined forward.
  check_hf <hf_dir> <run_dir>
      from_pretrained(hf_dir): missing/unexpected keys, logits (and MTP logits) vs megatron-core's,
      expert placement by fingerprint (JSON)
  fp8_table <out_dir>
      the exhaustive FP8 block dequantisation table: <out_dir>/fp8.safetensors (w [300, 260] every byte
      value in every block, edge scales; v [128, 256] log-uniform scales) and <out_dir>/ref.safetensors
      (dequantize_fp8_blockwise, bfloat16)

Checkpoint key names. The TE layer spec (what DeepSeek training with Megatron-LM / Megatron-Bridge
writes) fuses the MLA q/kv norms into linear_q_up_proj / linear_kv_up_proj and, in dense layers, the
pre-MLP norm into mlp.linear_fc1, so those norms are keyed `self_attention.linear_q_up_proj.
layer_norm_weight`, `self_attention.linear_kv_up_proj.layer_norm_weight` and `mlp.linear_fc1.
layer_norm_weight`. megatron-core 0.16.1's local MLA spec has separate modules (`self_attention.
q_layernorm`, `self_attention.kv_layernorm`, `pre_mlp_layernorm`) and, unlike its GQA local spec, no
sharded_state_dict_keys_map to the TE names. By default this oracle gives the local layers that map
(TransformerLayerSubmodules.sharded_state_dict_keys_map, the mechanism megatron-core's own GQA local
spec uses), so it reads and writes the TE names; --local-names uses the local spec's own names. The
tensors are the same either way; TE's `_extra_state` entries are not written (no TE here).

CPU: megatron_oracle.shims and moe_oracle.moe_shims are all that is needed (MLA itself needs none:
with rope_type="rope" and apply_rope_fusion=False, its default, it uses the unfused torch RoPE).
megatron-core 0.16.1 runs the MTP block only in GPTModel._postprocess with labels (it calls
labels.clone()); the oracle passes labels and captures the MTP block's output with a forward hook.
"""
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from megatron_oracle import TOKENS, forward  # noqa: E402
from moe_oracle import init  # noqa: E402  (shims + moe_shims + gloo + parallel_state)

V = 100
BASE = dict(
    vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, n_group=2, topk_group=1, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    num_nextn_predict_layers=1, max_position_embeddings=64, rms_norm_eps=1e-6, rope_interleave=True,
)
CASES = {
    "v3": {},
    "v3_noq": dict(q_lora_rank=None, num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2,
                   num_nextn_predict_layers=0, n_group=1, topk_group=1),
    # hidden 192 and ffn 160 give ragged 128x128 block grids (e.g. [160, 192] -> 2x2 blocks, 32/64 wide edges)
    "v3_fp8": dict(hidden_size=192, intermediate_size=160),
}
COMMON = {"args", "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "content_metadata"}
# The linears DeepSeek-V3's hub checkpoint stores as float8_e4m3fn + weight_scale_inv (not embeddings,
# lm_head, norms, the router gate, nor the MTP eh_proj / shared_head).
FP8_RE = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
FP32_RE = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")  # _keep_in_fp32_modules_strict


def hf_config(case, mtp=None):
    from transformers import AutoConfig
    kw = dict(BASE, **CASES[case])
    if mtp is not None:
        kw["num_nextn_predict_layers"] = mtp
    return AutoConfig.for_model(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32", **kw,
    )


# ---------------------------------------------------------------------------------------------------
# FP8 block quantisation: Megatron-Bridge's reference (src/megatron/bridge/models/conversion/
# quantization_utils.py at NVIDIA-NeMo/Megatron-Bridge 067f987d), copied so the oracle needs no Bridge.

FP8_BLOCK_SIZE = 128
FP8_E4M3_MAX = 448.0


def scale_from_amax(amax, max_quantized_value):
    """Megatron-Bridge scale_from_amax (float32 scale_dtype branch)."""
    return torch.where(amax > 0, amax / max_quantized_value, torch.ones_like(amax))


def quantize_fp8_2d_blocks(weight, block_size=FP8_BLOCK_SIZE):
    """Megatron-Bridge _quantize_fp8_2d_blocks with a float32 source scale: (fp8 weight, scale_inv)."""
    import torch.nn.functional as F
    rows, cols = weight.shape
    scale_rows, scale_cols = -(-rows // block_size), -(-cols // block_size)
    weight_f32 = weight.to(torch.float32)
    pad_rows = scale_rows * block_size - rows
    pad_cols = scale_cols * block_size - cols
    if pad_rows or pad_cols:
        weight_f32 = F.pad(weight_f32, (0, pad_cols, 0, pad_rows))
    blocks = weight_f32.view(scale_rows, block_size, scale_cols, block_size).transpose(1, 2)
    scale_f32 = scale_from_amax(blocks.abs().amax(dim=(-1, -2)), FP8_E4M3_MAX)
    q_blocks = (blocks / scale_f32[:, :, None, None]).to(torch.float8_e4m3fn)
    q_weight = q_blocks.transpose(1, 2).reshape(scale_rows * block_size, scale_cols * block_size)[:rows, :cols]
    return q_weight.contiguous(), scale_f32.to(torch.float32)


def dequantize_fp8_blockwise(weight, scale_inv, *, block_size=FP8_BLOCK_SIZE, dtype=torch.bfloat16):
    """Megatron-Bridge dequantize_fp8_blockwise, verbatim: one float32 scale per 128x128 block,
    w.float() * scale in float32, then one rounding to `dtype`."""
    M, N = weight.shape
    w = weight.float()
    out = torch.empty_like(w)
    sM, sN = scale_inv.shape
    for bi in range(sM):
        for bj in range(sN):
            r0, r1 = bi * block_size, min((bi + 1) * block_size, M)
            c0, c1 = bj * block_size, min((bj + 1) * block_size, N)
            out[r0:r1, c0:c1] = w[r0:r1, c0:c1] * scale_inv[bi, bj]
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------------
# HF side


def _randomize_hf(name, shape, gen):
    """Values for one HF tensor: norms ~ N(1, .5), router N(0, 1), bias N(0, .1), embeddings N(0, 1),
    linears N(0, 1/in) so attention is sharp enough that a RoPE or head-layout slip shows."""
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen) * 0.1
    if "norm" in name:
        return torch.randn(shape, generator=gen) * 0.5 + 1.0
    if name.endswith("mlp.gate.weight"):
        return torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * shape[-1] ** -0.5


def _per_expert(sd):
    """transformers' fused in-memory experts -> the hub layout (only needed if save_pretrained wrote them fused)."""
    out = {}
    for k, t in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = t[e, :half].contiguous()
                out[f"{p}{e}.up_proj.weight"] = t[e, half:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{p}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[k] = t
    return out


def _write_single(hf_dir, sd):
    from safetensors.torch import save_file
    for f in os.listdir(hf_dir):
        if f.endswith(".safetensors") or f.endswith(".safetensors.index.json"):
            os.remove(os.path.join(hf_dir, f))
    save_file(sd, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})


def _mtp_keys(keys, num_layers):
    return [k for k in keys if re.match(rf"model\.layers\.(\d+)\.", k) and int(k.split(".")[2]) >= num_layers]


def cmd_make(hf_dir, case):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM as A

    cfg = hf_config(case)
    torch.manual_seed(7)
    gen = torch.Generator().manual_seed(7)
    m = A.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in list(m.named_parameters()) + list(m.named_buffers()):
            if "rotary_emb" in n:
                continue
            p.copy_(_randomize_hf(n, tuple(p.shape), gen))
    m.save_pretrained(hf_dir)
    files = sorted(os.listdir(hf_dir))
    sd = {}
    for f in files:
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(hf_dir, f)))
    fused_on_disk = any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    sd = _per_expert(sd)
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    for k in range(cfg.num_nextn_predict_layers):
        # The MTP layer: a full MoE decoder layer (named like the last decoder layer, which is MoE)
        # plus enorm / hnorm / eh_proj / shared_head.norm and the hub's copies of the embedding and head.
        src = f"model.layers.{L - 1}."
        for name in [n for n in sd if n.startswith(src)]:
            new = f"model.layers.{L + k}." + name[len(src):]
            sd[new] = _randomize_hf(new, tuple(sd[name].shape), gen)
        p = f"model.layers.{L + k}."
        sd[p + "enorm.weight"] = _randomize_hf("enorm.weight", (H,), gen)
        sd[p + "hnorm.weight"] = _randomize_hf("hnorm.weight", (H,), gen)
        sd[p + "eh_proj.weight"] = _randomize_hf("eh_proj.weight", (H, 2 * H), gen)
        sd[p + "shared_head.norm.weight"] = _randomize_hf("shared_head.norm.weight", (H,), gen)
        sd[p + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[p + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    out = {"ok": True, "experts_on_disk": "fused" if fused_on_disk else "per_expert", "files": files}
    if case == "v3_fp8":
        out.update(_make_fp8(hf_dir, sd))
    else:
        _write_single(hf_dir, sd)
    # transformers loads it (the .ref for FP8, see _load_hf) with the MTP layer as its only unexpected keys
    _, info = A.from_pretrained(out.get("ref_dir", hf_dir), dtype=torch.float32, output_loading_info=True)
    out["missing"] = sorted(info["missing_keys"])
    unexpected = sorted(info["unexpected_keys"])
    out["unexpected"] = [u for u in unexpected if u not in _mtp_keys(unexpected, L)]
    out["unexpected_mtp"] = len(unexpected) - len(out["unexpected"])
    from safetensors import safe_open
    with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
        out["tensors"] = {k: [f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()] for k in f.keys()}
    return out


def _make_fp8(hf_dir, sd):
    """Quantise as the DeepSeek-V3 hub checkpoint is stored; write <hf_dir>.ref/ = the bf16 reference."""
    q, ref, fp8_names = {}, {}, []
    for k in sorted(sd):
        t = sd[k]
        if FP8_RE.search(k) and t.ndim == 2:
            w, s = quantize_fp8_2d_blocks(t)
            q[k], q[k + "_scale_inv"] = w, s
            ref[k] = dequantize_fp8_blockwise(w, s)
            fp8_names.append(k)
        elif FP32_RE.search(k):
            q[k] = ref[k] = t.to(torch.float32)
        else:  # the hub stores the rest in bf16
            q[k] = ref[k] = t.to(torch.bfloat16)
    _write_single(hf_dir, q)
    cfg_path = os.path.join(hf_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    json.dump(cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    ref_dir = hf_dir.rstrip("/") + ".ref"
    os.makedirs(ref_dir, exist_ok=True)
    for f in os.listdir(hf_dir):
        if f.endswith(".json") and not f.endswith(".safetensors.index.json"):
            shutil.copy(os.path.join(hf_dir, f), ref_dir)
    rcfg = dict(cfg)
    del rcfg["quantization_config"]
    json.dump(rcfg, open(os.path.join(ref_dir, "config.json"), "w"), indent=2, sort_keys=True)
    _write_single(ref_dir, ref)
    return {"fp8": fp8_names, "ref_dir": ref_dir}


def _load_hf(hf_dir):
    from transformers import AutoModelForCausalLM
    qc = json.load(open(os.path.join(hf_dir, "config.json"))).get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        # transformers 5.24's FP8 path (integrations/finegrained_fp8.py, Fp8Dequantize and the fp8 linears)
        # derives the block from the scale grid, block = rows // scale_rows, which is wrong for DeepSeek's
        # ragged 128x128 blocks (a [32, 192] weight with a [1, 2] grid gets 96-wide blocks; the hub's
        # kv_a_proj_with_mqa [576, 7168] / [5, 56] raises), and by default also quantises activations:
        # its logits are no reference. Compare <dir>.ref (make's bf16 dequantisation) instead.
        raise SystemExit(f"{hf_dir} is an FP8 checkpoint: transformers 5.24 cannot dequantise its ragged "
                         "blocks; compare its .ref")
    m, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    return m.eval(), info


def hf_outputs(hf_dir):
    """Logits of transformers' model, and of its generic MtpModel on the model's final (normed) hidden
    states, with the inputs rolled as megatron-core's MTP rolls them (shift left, 0 at the end)."""
    from transformers.modeling_layers import MtpModel
    m, info = _load_hf(hf_dir)
    L = m.config.num_hidden_layers
    nmtp = m.config.num_nextn_predict_layers or 0
    unexpected = sorted(info["unexpected_keys"])
    mtp_unexpected = _mtp_keys(unexpected, L)
    res = {"missing": sorted(info["missing_keys"]), "unexpected": [u for u in unexpected if u not in mtp_unexpected],
           "mtp_keys_ignored": len(mtp_unexpected), "model": m}
    with torch.no_grad():
        h = m.model(TOKENS).last_hidden_state
        res["logits"] = m.lm_head(h)
        res["mtp_logits"] = []
        if nmtp and mtp_unexpected:
            # DeepseekV3PreTrainedModel lists only the 61-layer hub model's MTP prefix (model.layers.61)
            # in _keys_to_ignore_on_load_unexpected, which MtpModel uses to find the MTP weights; point it
            # at this model's MTP layers.
            m._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L + k}\..*" for k in range(nmtp)]
            mtp = MtpModel.from_pretrained(m).eval()
            res["mtp"] = mtp
            ids, pos = TOKENS, torch.arange(TOKENS.shape[1]).unsqueeze(0).expand_as(TOKENS)
            for k in range(nmtp):
                ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
                h = mtp.forward_layer(k, h, position_ids=pos, mtp_cache=None, input_ids=ids)
                res["mtp_logits"].append(mtp._project_to_logits(h))
    return res


def _mtp_copies_exact(hf_dir):
    """Whether model.layers.<L+k>.embed_tokens / shared_head.head equal the main embedding / lm_head."""
    from safetensors import safe_open
    from transformers import AutoConfig
    L = AutoConfig.from_pretrained(hf_dir).num_hidden_layers
    path = os.path.join(hf_dir, "model.safetensors")
    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        pairs = [(k, "model.embed_tokens.weight" if k.endswith("embed_tokens.weight") else "lm_head.weight")
                 for k in _mtp_keys(sorted(keys), L) if k.endswith(("embed_tokens.weight", "shared_head.head.weight"))]
        if not pairs:
            return None
        return all(torch.equal(f.get_tensor(a).view(torch.uint8), f.get_tensor(b).view(torch.uint8)) for a, b in pairs)


def cmd_compare(a, b):
    ra, rb = hf_outputs(a), hf_outputs(b)
    out = {
        "max_abs_diff": (ra["logits"] - rb["logits"]).abs().max().item(), "max_abs": ra["logits"].abs().max().item(),
        "missing_a": ra["missing"], "unexpected_a": ra["unexpected"],
        "missing_b": rb["missing"], "unexpected_b": rb["unexpected"],
        "mtp_keys_ignored_a": ra["mtp_keys_ignored"], "mtp_keys_ignored_b": rb["mtp_keys_ignored"],
        "mtp_layers_a": len(ra["mtp_logits"]), "mtp_layers_b": len(rb["mtp_logits"]),
        "mtp_copies_exact_a": _mtp_copies_exact(a), "mtp_copies_exact_b": _mtp_copies_exact(b),
    }
    if ra["mtp_logits"] and len(ra["mtp_logits"]) == len(rb["mtp_logits"]):
        out["mtp_max_abs_diff"] = max((x - y).abs().max().item() for x, y in zip(ra["mtp_logits"], rb["mtp_logits"]))
        out["mtp_max_abs"] = max(x.abs().max().item() for x in ra["mtp_logits"])
    return out


# ---------------------------------------------------------------------------------------------------
# megatron-core side


def mcore_cfg(h):
    """The MLATransformerConfig fields of an HF DeepseekV3 config (as Megatron-Bridge's DeepSeek-V3 bridge)."""
    assert h.norm_topk_prob, "megatron-core's sigmoid router always renormalises the top-k (norm_topk_prob=True)"
    rp = getattr(h, "rope_parameters", None) or {}
    assert rp.get("rope_type", "default") == "default", "the oracle covers plain RoPE (rope_type='rope') only"
    L, fk = h.num_hidden_layers, h.first_k_dense_replace
    return dict(
        layers=L, hidden=h.hidden_size, heads=h.num_attention_heads, ffn=h.intermediate_size, eps=h.rms_norm_eps,
        max_pos=h.max_position_embeddings, rope_theta=rp.get("rope_theta", 10000.0), vocab=h.vocab_size,
        q_lora=h.q_lora_rank, kv_lora=h.kv_lora_rank, qk_nope=h.qk_nope_head_dim, qk_rope=h.qk_rope_head_dim,
        v_dim=h.v_head_dim, experts=h.n_routed_experts, topk=h.num_experts_per_tok, moe_ffn=h.moe_intermediate_size,
        shared=h.moe_intermediate_size * h.n_shared_experts if h.n_shared_experts else None,
        freq=[0] * fk + [1] * (L - fk), groups=h.n_group, group_topk=h.topk_group, scaling=h.routed_scaling_factor,
        mtp=h.num_nextn_predict_layers or 0,
    )


def mla_shims():
    """Without TransformerEngine, megatron.core.extensions.transformer_engine still imports (it stands
    MagicMocks in for TE), so multi_latent_attention sets HAVE_TE = True and MLA's __init__ calls
    isinstance(self.linear_proj, TELinear) with TELinear a MagicMock: TypeError. TE is not installed, so
    tell that module so (its only other TE uses are `in [TELinear]` comparisons, False either way)."""
    import megatron.core.transformer.multi_latent_attention as mla
    from megatron.core.extensions import transformer_engine as te_ext
    if not te_ext.HAVE_TE:
        mla.HAVE_TE = False


def mla_core_attention():
    """megatron-core 0.16.1's MLA builds its core attention with k_channels= / v_channels= (q/k head dim
    qk_head_dim + qk_pos_emb_head_dim != v_head_dim), which only TE's DotProductAttention accepts: the
    local DotProductAttention raises TypeError on them. Its forward already handles a q/k head dim that
    differs from the value head dim (baddbmm over whatever q/k carry, bmm with v) and sizes its output by
    kv_channels, so with kv_channels = v_head_dim (set in build) dropping the two arguments is exact.
    The module has no parameters: the checkpoint is unaffected."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            # (Attention.__init__ first builds one without them; MLA then replaces it)
            assert v_channels in (None, kwargs["config"].kv_channels), "build() sets kv_channels = v_head_dim"
            super().__init__(*args, **kwargs)

    return MLADotProductAttention


def local_mla_spec(spec, local_names):
    """The local MLA layer specs with the CPU core attention and (unless local_names) the TE checkpoint
    names (see the module docstring)."""
    from megatron.core.transformer.mlp import MLP
    mla_shims()
    core = mla_core_attention()
    layers = []
    for s in spec.layer_specs:
        attn = s.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core))
        keys = {}
        if not local_names:
            keys = {"self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
                    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_"}
            if s.submodules.mlp.module is MLP:  # dense layer: TE fuses pre_mlp_layernorm into linear_fc1
                keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        sub = dataclasses.replace(s.submodules, self_attention=attn, sharded_state_dict_keys_map=keys)
        layers.append(dataclasses.replace(s, submodules=sub))
    return dataclasses.replace(spec, layer_specs=layers)


def build(c, padded_vocab, mtp=False, local_names=False):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    cfg = MLATransformerConfig(
        num_layers=c["layers"], hidden_size=c["hidden"], num_attention_heads=c["heads"], ffn_hidden_size=c["ffn"],
        kv_channels=c["v_dim"],  # sizes the local core attention's output (mla_core_attention)
        multi_latent_attention=True, q_lora_rank=c["q_lora"], kv_lora_rank=c["kv_lora"], qk_head_dim=c["qk_nope"],
        qk_pos_emb_head_dim=c["qk_rope"], v_head_dim=c["v_dim"], rope_type="rope", rotary_base=c["rope_theta"],
        normalization="RMSNorm", layernorm_epsilon=c["eps"], qk_layernorm=True,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(), pipeline_dtype=torch.float32,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(), sequence_parallel=False,
        num_moe_experts=c["experts"], moe_router_topk=c["topk"], moe_ffn_hidden_size=c["moe_ffn"],
        moe_shared_expert_intermediate_size=c["shared"], moe_layer_freq=c["freq"],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_dtype="fp32",
        moe_router_topk_scaling_factor=c["scaling"], moe_router_num_groups=c["groups"],
        moe_router_group_topk=c["group_topk"], moe_router_pre_softmax=True,  # as the bridge; unused by sigmoid
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,  # alltoall needs CUDA streams
        mtp_num_layers=c["mtp"] if mtp else None,
    )
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    spec = local_mla_spec(spec, local_names)
    mtp_spec = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False) if mtp else None
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=padded_vocab, max_sequence_length=c["max_pos"],
        pre_process=True, post_process=True, parallel_output=False, share_embeddings_and_output_weights=False,
        position_embedding_type="rope", rotary_base=c["rope_theta"], mtp_block_spec=mtp_spec,
    )
    return model.eval()


def forward_mtp(model):
    """(main logits, [MTP logits per depth]) [b, s, V]. megatron-core 0.16.1 runs the MTP block only in
    the loss path, so pass labels and take the MTP block's output (main + one hidden per depth, catted
    on the sequence dim) from a forward hook; both go through the shared output layer."""
    B, S = TOKENS.shape
    pos = torch.arange(S).unsqueeze(0).expand_as(TOKENS)
    mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), diagonal=1)
    got = {}
    hook = model.mtp.register_forward_hook(lambda mod, args, out: got.__setitem__("h", out))
    with torch.no_grad():
        model(TOKENS, pos, attention_mask=mask, labels=TOKENS)
        hook.remove()
        parts = torch.chunk(got["h"], 1 + model.config.mtp_num_layers, dim=0)
        logits = [model.output_layer(x)[0].transpose(0, 1) for x in parts]
    return logits[0], logits[1:]


def cmd_load(iter_dir, hf_dir, mtp=False, local_names=False):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from transformers import AutoConfig

    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    if mtp:
        assert c["mtp"] > 0, "--mtp needs num_nextn_predict_layers > 0 in the HF config"
    init(0, 1, 1, 1, tempfile.mktemp())
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    padded = meta["embedding.word_embeddings.weight"].global_shape[0]  # the converter's padding, as written
    model = build(c, padded, mtp=mtp, local_names=local_names)
    sd = dist_checkpointing.load(model.sharded_state_dict(), iter_dir, strict=StrictHandling.RAISE_ALL)
    model.load_state_dict({k: v for k, v in sd.items() if k not in COMMON}, strict=True)
    ref = hf_outputs(hf_dir)
    out = {"padded_vocab": padded, "keys": len(meta), "mtp_loaded": bool(mtp)}
    if mtp:
        logits, mtp_logits = forward_mtp(model)
        out["mtp_forward"] = True
        if ref["mtp_logits"]:
            out["mtp_max_abs_diff"] = max((a[..., : c["vocab"]] - b).abs().max().item() for a, b in zip(mtp_logits, ref["mtp_logits"]))
            out["mtp_max_abs"] = max(b.abs().max().item() for b in ref["mtp_logits"])
        else:
            out["mtp_max_abs_diff"], out["why"] = None, "the HF dir has no MTP weights for transformers' MtpModel"
    else:
        logits = forward(model)
    logits = logits[..., : c["vocab"]]
    out.update(max_abs_diff=(logits - ref["logits"]).abs().max().item(), max_abs=ref["logits"].abs().max().item())
    return out


def save_worker(rank, world, init_file, run_dir, case, tp, ep, mtp, local_names):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    init(rank, world, tp, ep, init_file)
    h = hf_config(case, mtp=(1 if mtp else 0))
    c = mcore_cfg(h)
    mult = 1280 * tp  # Megatron-Bridge's make_vocab_size_divisible_by for DeepSeek, x TP as Megatron-LM pads
    model = build(c, -(-V // mult) * mult, mtp=mtp, local_names=local_names)
    # CPU initialisation draws full weights from the same seed on every rank and slices them, so TP
    # shards and replicas agree; scale those (x5: std 0.1, so attention is not flat), and give norms,
    # routers and expert biases random values (same on all ranks) and each expert shard its own, so
    # experts differ across EP ranks and a misplaced one shows.
    shared = torch.Generator().manual_seed(99)
    own = torch.Generator().manual_seed(1000 + 10 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "local_experts" in n:
                p.copy_(torch.randn(p.shape, generator=own) * 0.1)
            elif "norm" in n:
                p.copy_(torch.randn(p.shape, generator=shared) * 0.5 + 1.0)
            elif "router" in n:
                p.copy_(torch.randn(p.shape, generator=shared))
            else:
                p.mul_(5.0)
        for n, b in model.named_buffers():
            if n.endswith("router.expert_bias"):  # a persistent fp32 buffer of TopKRouter
                b.copy_(torch.randn(b.shape, generator=shared) * 0.1)
    iter_dir = os.path.join(run_dir, "iter_0000002")
    if rank == 0:
        os.makedirs(iter_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), iter_dir)
    if mtp:
        logits, mtp_logits = forward_mtp(model)
    else:
        logits, mtp_logits = forward(model), []
    ep_rank = ps.get_expert_model_parallel_rank()
    prints = {}
    for n, p in model.named_parameters():
        if "local_experts" in n and n.endswith("linear_fc2.weight"):
            if n.startswith("mtp."):  # MTP layer k is HF layer L + k
                layer = c["layers"] + int(n.split("mtp.layers.")[1].split(".")[0])
            else:
                layer = int(n.split("decoder.layers.")[1].split(".")[0])
            g = ep_rank * (c["experts"] // ep) + int(n.split("local_experts.")[1].split(".")[0])
            full = p.detach().clone()
            if ps.get_expert_tensor_parallel_world_size() > 1:
                parts = [torch.empty_like(full) for _ in range(ps.get_expert_tensor_parallel_world_size())]
                torch.distributed.all_gather(parts, full, group=ps.get_expert_tensor_parallel_group())
                full = torch.cat(parts, dim=1)
            prints[f"{layer}.{g}"] = full.double().sum().item()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, prints)
    if rank == 0:
        merged = {}
        for g in gathered:
            merged.update(g)
        json.dump(merged, open(os.path.join(run_dir, "experts.json"), "w"))
        torch.save(logits[..., :V], os.path.join(run_dir, "logits.pt"))
        if mtp:
            torch.save([x[..., :V] for x in mtp_logits], os.path.join(run_dir, "mtp_logits.pt"))
        with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2")
        h.save_pretrained(os.path.join(run_dir, "hf_ref"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_save(run_dir, case, tp, ep, mtp, local_names):
    import torch.multiprocessing as mp
    from megatron.core import dist_checkpointing
    os.makedirs(run_dir, exist_ok=True)
    mp.spawn(save_worker, args=(tp * ep, tempfile.mktemp(), run_dir, case, tp, ep, mtp, local_names), nprocs=tp * ep, join=True)
    from torch.distributed.checkpoint import FileSystemReader
    it = os.path.join(run_dir, "iter_0000002")
    meta = dist_checkpointing.load_tensors_metadata(it)
    keys = {k: [list(v.global_shape), str(v.dtype).replace("torch.", "")] for k, v in sorted(meta.items())}
    # the non-tensor entries: megatron-core's linears write `<module>._extra_state` ShardedObjects
    # (stored as `<key>/shard_<i>_<n>`, one per expert for the experts)
    objects = {}
    for k in FileSystemReader(it).read_metadata().state_dict_metadata:
        if "/shard_" in k:
            base, shard = k.split("/shard_")
            objects[base] = int(shard.rsplit("_", 1)[1])
    return {"ok": True, "keys": keys, "objects": dict(sorted(objects.items()))}


def cmd_check_hf(hf_dir, run_dir):
    ref = torch.load(os.path.join(run_dir, "logits.pt"))
    r = hf_outputs(hf_dir)
    prints = json.load(open(os.path.join(run_dir, "experts.json")))
    L = r["model"].config.num_hidden_layers
    sd = r["model"].state_dict()
    msd = r["mtp"].state_dict() if "mtp" in r else {}
    wrong = []
    for key, want in prints.items():
        layer, g = map(int, key.split("."))
        name = (f"model.layers.{layer}.mlp.experts.down_proj" if layer < L  # transformers 5 fuses experts in memory
                else f"layers.{layer - L}.mtp_block.mlp.experts.down_proj")
        src = sd if layer < L else msd
        got = src[name][g].double().sum().item() if name in src else float("nan")
        if not abs(got - want) <= 1e-9 * max(1.0, abs(want)):
            wrong.append(key)
    out = {
        "max_abs_diff": (r["logits"] - ref).abs().max().item(), "max_abs": ref.abs().max().item(),
        "missing": r["missing"], "unexpected": r["unexpected"], "mtp_keys_ignored": r["mtp_keys_ignored"],
        "experts_checked": len(prints), "experts_misplaced": wrong, "mtp_copies_exact": _mtp_copies_exact(hf_dir),
    }
    mtp_path = os.path.join(run_dir, "mtp_logits.pt")
    if os.path.exists(mtp_path):
        want = torch.load(mtp_path)
        if len(r["mtp_logits"]) == len(want):
            out["mtp_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(r["mtp_logits"], want))
        else:
            out["mtp_max_abs_diff"], out["why"] = None, f"HF has {len(r['mtp_logits'])} MTP layers, megatron {len(want)}"
    return out


# ---------------------------------------------------------------------------------------------------
# FP8 table


def cmd_fp8_table(out_dir):
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(2024)
    B = FP8_BLOCK_SIZE
    rows, cols = 300, 260
    w = torch.empty(rows, cols, dtype=torch.uint8)
    starts = {}
    for bi in range(-(-rows // B)):
        for bj in range(-(-cols // B)):
            r0, r1, c0, c1 = bi * B, min(rows, (bi + 1) * B), bj * B, min(cols, (bj + 1) * B)
            n = (r1 - r0) * (c1 - c0)
            # every byte value in every block of >= 256 elements; the 44x4 corner block (176 elements)
            # starts at 0x70 so it still holds 0x7F/0xFF (NaN), 0x00/0x80 (+-0) and the subnormals 0x01-0x1F
            start = 0x70 if n < 256 else (37 * (bi * 3 + bj)) % 256
            starts[f"{bi},{bj}"] = [start, min(n, 256)]
            w[r0:r1, c0:c1] = ((torch.arange(n) + start) % 256).to(torch.uint8).view(r1 - r0, c1 - c0)
    w_scale = torch.tensor([
        [1.0, torch.randn(1, generator=gen).item(), 2.0 ** -130],    # subnormal float32 scale and products
        [3e38, -0.75, 2.0 ** -6],                                    # bf16 (and fp32) overflow to inf; negative
        [1.0 / 448.0, torch.rand(1, generator=gen).item() * 10, 2.0 ** -149],  # smallest float32 subnormal
    ], dtype=torch.float32)
    v = torch.randint(0, 256, (128, 256), generator=gen, dtype=torch.uint8)
    lo, hi = torch.log(torch.tensor(1e-8)).item(), torch.log(torch.tensor(1e4)).item()  # log-uniform 1e-8..1e4
    v_scale = torch.exp(torch.empty(1, 2).uniform_(lo, hi, generator=gen)).to(torch.float32)
    wq, vq = w.view(torch.float8_e4m3fn), v.view(torch.float8_e4m3fn)
    save_file({"w": wq, "w_scale_inv": w_scale, "v": vq, "v_scale_inv": v_scale},
              os.path.join(out_dir, "fp8.safetensors"), metadata={"format": "pt"})
    ref = {"w": dequantize_fp8_blockwise(wq, w_scale), "v": dequantize_fp8_blockwise(vq, v_scale)}
    save_file(ref, os.path.join(out_dir, "ref.safetensors"), metadata={"format": "pt"})
    bits = ref["w"].view(torch.int16)
    nan = torch.isnan(ref["w"])
    return {"ok": True, "w_scale_inv": w_scale.tolist(), "v_scale_inv": v_scale.tolist(), "block_starts": starts,
            "nan": int(nan.sum()), "nan_bits": sorted({int(x) & 0xFFFF for x in bits[nan].unique().tolist()}),
            "inf": int(torch.isinf(ref["w"]).sum()), "zero": int((ref["w"] == 0).sum())}


def load_legacy_worker(rank, world, init_file, run_dir, hf_dir, ep, mtp, out_file):
    from transformers import AutoConfig

    init(rank, world, 1, ep, init_file)
    c = mcore_cfg(AutoConfig.from_pretrained(hf_dir))
    it = open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")).read().strip()
    d = os.path.join(run_dir, f"iter_{int(it):07d}", "mp_rank_00" + (f"_{rank:03d}" if ep > 1 else ""), "model_optim_rng.pt")
    sd = torch.load(d, map_location="cpu", weights_only=False)["model"]
    model = build(c, sd["embedding.word_embeddings.weight"].shape[0], mtp=mtp, local_names=True)
    model.load_state_dict(sd, strict=True)
    if mtp:
        logits, mtp_logits = forward_mtp(model)
    else:
        logits, mtp_logits = forward(model), []
    if rank == 0:
        ref = hf_outputs(hf_dir)
        out = {"keys": len(sd), "max_abs_diff": (logits[..., : c["vocab"]] - ref["logits"]).abs().max().item()}
        if mtp:
            out["mtp_max_abs_diff"] = max((a[..., : c["vocab"]] - b).abs().max().item() for a, b in zip(mtp_logits, ref["mtp_logits"]))
        json.dump(out, open(out_file, "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def cmd_load_legacy(run_dir, hf_dir, ep, mtp):
    import torch.multiprocessing as mp
    out = tempfile.mktemp()
    mp.spawn(load_legacy_worker, args=(ep, tempfile.mktemp(), run_dir, hf_dir, ep, mtp, out), nprocs=ep, join=True)
    return json.load(open(out))


def main():
    a = sys.argv[1:]
    opt = lambda k, d: int(a[a.index(k) + 1]) if k in a else d  # noqa: E731
    if a[0] == "make":
        r = cmd_make(a[1], a[2])
    elif a[0] == "compare":
        r = cmd_compare(a[1], a[2])
    elif a[0] == "load":
        r = cmd_load(a[1], a[2], "--mtp" in a, "--local-names" in a)
    elif a[0] == "save":
        r = cmd_save(a[1], a[2], opt("--tp", 1), opt("--ep", 1), "--mtp" in a, "--local-names" in a)
    elif a[0] == "load_legacy":
        r = cmd_load_legacy(a[1], a[2], opt("--ep", 1), "--mtp" in a)
    elif a[0] == "check_hf":
        r = cmd_check_hf(a[1], a[2])
    elif a[0] == "fp8_table":
        r = cmd_fp8_table(a[1])
    else:
        raise SystemExit(f"unknown command {a[0]}")
    print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
