"""NeMo RL policy checkpoints built with real torch.distributed.checkpoint, in the layouts NeMo RL
writes (nemo_rl/utils/native_checkpoint.py and the Automodel-based v2):

  make <step_dir> <layout> <case>
      step_N/config.yaml (policy.model_name → a tiny HF model made with transformers),
      step_N/policy/tokenizer/, step_N/policy/optimizer/ (Adam state after one step, DCP), and
      step_N/policy/weights/ as
        v1: dcp.save({"model": model_state_dict})      (DTensor v1: keys wrapped under "model")
        v2: dcp.save(model_state_dict) under weights/model/   (Automodel: flat keys)
"""
import json
import os
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, StateDictOptions

sys.path.insert(0, os.path.dirname(__file__))
import models_oracle  # noqa: E402


def make(step_dir, layout, case):
    hf_dir = os.path.join(os.path.dirname(os.path.abspath(step_dir)), f"hf-{case}")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        models_oracle.make(hf_dir, case)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    # One training step so the weights differ from the base and the optimizer has state.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(models_oracle.TOKENS, labels=models_oracle.TOKENS).loss
    loss.backward()
    opt.step()
    policy = os.path.join(step_dir, "policy")
    os.makedirs(os.path.join(policy, "tokenizer"), exist_ok=True)
    with open(os.path.join(policy, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 128, "note": "the run's own tokenizer"}, f)
    with open(os.path.join(step_dir, "config.yaml"), "w") as f:
        f.write(f"policy:\n  model_name: {hf_dir}\n  dtensor_cfg:\n    enabled: true\ngrpo:\n  max_num_steps: 1\n")
    sd = get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))
    weights = os.path.join(policy, "weights")
    if layout == "v1":
        dcp.save({"model": sd}, checkpoint_id=weights, no_dist=True)
    elif layout == "v2":
        dcp.save(sd, checkpoint_id=os.path.join(weights, "model"), no_dist=True)
    else:
        raise SystemExit(f"unknown layout {layout}")
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=StateDictOptions(cpu_offload=True))}, checkpoint_id=os.path.join(policy, "optimizer"), no_dist=True)
    # The trained model itself, for the logits comparison.
    model.save_pretrained(os.path.join(step_dir, "trained-reference"))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
