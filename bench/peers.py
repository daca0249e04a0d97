"""Python peers for the shardshift benchmark: the same job done the way the Python stacks do it,
on CPU, with the oracle venv (torch 2.13, safetensors, transformers).

  python bench/peers.py hf-save <hf_dir> <out_dir> --dtype bfloat16|float32 [--shard-size 2GB]
      transformers AutoModelForCausalLM.from_pretrained + save_pretrained (reshard, cast)
  python bench/peers.py dcp-to-torch <dcp_dir> <out.pt>
      torch.distributed.checkpoint.format_utils.dcp_to_torch_save
  python bench/peers.py dcp-to-hf <dcp_dir> <out_dir> [--shard-size 50GB]
      the DCP loaded into memory as dcp_to_torch_save does (_load_state_dict with
      _EmptyStateDictLoadPlanner, no process group), then written as sharded safetensors with
      huggingface_hub.save_torch_state_dict (what save_pretrained uses); side files copied
  python bench/peers.py lora-merge <hf_dir> <out_dir> --adapter <peft_dir>
      peft PeftModel.from_pretrained + merge_and_unload + save_pretrained
  python bench/peers.py hf-to-dcp <hf_dir> <out_dir>
      safetensors.torch.load_file of every shard, then torch.distributed.checkpoint.save(no_dist=True)
"""

import argparse
import glob
import os
import shutil


def side_files(src, out):
    for name in ("config.json", "generation_config.json"):
        p = os.path.join(src, name)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(out, name))


def hf_save(a):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=dtype)
    model.save_pretrained(a.out, max_shard_size=a.shard_size)


def dcp_to_torch(a):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(a.src, a.out)


def dcp_to_hf(a):
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(a.src), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    os.makedirs(a.out, exist_ok=True)
    save_torch_state_dict(sd, a.out, max_shard_size=a.shard_size)
    side_files(a.src, a.out)


def hf_to_dcp(a):
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(glob.glob(os.path.join(a.src, "*.safetensors"))):
        sd.update(load_file(f))
    dcp.save(sd, checkpoint_id=a.out, no_dist=True)


def lora_merge(a):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, a.adapter).merge_and_unload()
    merged.save_pretrained(a.out, max_shard_size=a.shard_size)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("job", choices=["hf-save", "dcp-to-torch", "dcp-to-hf", "hf-to-dcp", "lora-merge"])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shard-size", default="50GB")
    p.add_argument("--adapter")
    a = p.parse_args()
    {"hf-save": hf_save, "dcp-to-torch": dcp_to_torch, "dcp-to-hf": dcp_to_hf, "hf-to-dcp": hf_to_dcp, "lora-merge": lora_merge}[a.job](a)


if __name__ == "__main__":
    main()
