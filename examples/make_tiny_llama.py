"""Writes examples/tiny-llama: a 2-layer Llama-shaped checkpoint (random bf16 weights, ~60 KB)
with the files a Hugging Face model directory carries. Re-run only to regenerate the example."""
import json, os
import torch
from safetensors.torch import save_file

d = os.path.join(os.path.dirname(__file__), "tiny-llama")
os.makedirs(d, exist_ok=True)
cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
           torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
g = torch.Generator().manual_seed(0)
r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
H, I, V, KV = 32, 64, 64, 2 * 8
sd = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16), "lm_head.weight": r(V, H)}
for i in range(2):
    p = f"model.layers.{i}."
    sd.update({p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(KV, H),
               p + "self_attn.v_proj.weight": r(KV, H), p + "self_attn.o_proj.weight": r(H, H),
               p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H), p + "mlp.down_proj.weight": r(H, I),
               p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
               p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)})
save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
json.dump({"bos_token_id": 1, "eos_token_id": 2}, open(os.path.join(d, "generation_config.json"), "w"), indent=2)

# examples/tiny-llama-lora: a PEFT LoRA adapter for it (r=2 on q_proj and v_proj, bf16), as peft
# saves one (`base_model.model.` prefix, lora_A / lora_B without the adapter name).
a = os.path.join(os.path.dirname(__file__), "tiny-llama-lora")
os.makedirs(a, exist_ok=True)
ad = {}
for i in range(2):
    p = f"base_model.model.model.layers.{i}.self_attn."
    ad.update({p + "q_proj.lora_A.weight": r(2, H), p + "q_proj.lora_B.weight": r(H, 2),
               p + "v_proj.lora_A.weight": r(2, H), p + "v_proj.lora_B.weight": r(KV, 2)})
save_file(ad, os.path.join(a, "adapter_model.safetensors"), metadata={"format": "pt"})
json.dump(dict(peft_type="LORA", task_type="CAUSAL_LM", r=2, lora_alpha=4, lora_dropout=0.0, bias="none",
               target_modules=["q_proj", "v_proj"], base_model_name_or_path="tiny-llama", fan_in_fan_out=False,
               use_rslora=False, use_dora=False, init_lora_weights=True),
          open(os.path.join(a, "adapter_config.json"), "w"), indent=2)
