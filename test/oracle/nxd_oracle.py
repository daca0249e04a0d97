"""NxD / NxD Training checkpoints: the real converter (vendor/nxd_checkpoint_converter.py, an
unmodified copy of neuronx-distributed's scripts/checkpoint_converter.py) run with real torch.

torch_xla and neuronx_distributed do not install from PyPI (the Neuron packages live on AWS's own
index), so the converter's imports are satisfied by small CPU stand-ins defined here:
  - torch_xla.utils.serialization: TensorReference and save(), in one of two modes (env NXD_XSER):
      cpu  what torch_xla's xser.save does with CPU tensors (the converter's case): it selects
           only XLA tensors, so every tensor stays inline in the main pickle and <file>.tensors/
           is left empty;
      xla  what it does with device tensors, and what NxD training's _xser_save_data writes:
           every tensor replaced by TensorReference(tid) (tids in traversal order), stored as
           <file>.tensors/tensor_<tid>.pt, plus <file>.info.pt {tid: {dtype, shape,
           expert_model_parallel}}
  - neuronx_distributed.pipeline.partition: create_partitions / stage_to_pipeline_parallel_rank
    copied from NxD's pipeline/partition.py (the same commit);
  - neuronx_distributed.trainer.checkpoint._xser_load_data: torch.load of the reference tree
    with each TensorReference replaced by torch.load(<file>.tensors/tensor_<tid>.pt).

  make <dir> <case>                 tiny Llama / Mistral / Qwen3 (save_pretrained, fp32) + pytorch_model.bin (the
                                    converter's single-file input) + ref_logits.json
  convert <converter flags…>        CheckpointConverterBase().run(parse_args(flags))
  logits <hf_dir | checkpoint.pt> <config.json> <ref_logits.json>
                                    the config's model class loads the weights strictly; JSON max_abs_diff
  dump <model_dir>                  every shard, references resolved: {file: {name: [dtype,
                                    shape, sha256 of the contiguous bytes]}} (JSON)
"""
import hashlib
import json
import os
import shutil
import sys
import types
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENS = torch.tensor([[1, 5, 9, 13, 2, 90, 40, 7], [3, 3, 80, 11, 0, 64, 22, 95]])
CASES = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=32),
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=32),
    "gqa8": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, hidden_size=32),
    # Other dense families shardshift maps, through the same converter (it goes by tensor names):
    # Mistral has Llama's names; Qwen3 adds per-head q/k norms, which the converter replicates
    # (head_dim = hidden / heads, as the converter assumes).
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, sliding_window=None, arch="mistral"),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=8, arch="qwen3"),
}
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
BASE = dict(vocab_size=96, intermediate_size=48, num_hidden_layers=4, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False, architectures=["LlamaForCausalLM"], model_type="llama")


# ---------------------------------------------------------------------------------------------
# Stand-ins for the converter's imports

class TensorReference(object):
    def __init__(self, tid):
        self.tid = tid


def _xser_save(data, path, master_only=True, global_master=False):
    folder = path + ".tensors"
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.mkdir(folder)
    if os.environ.get("NXD_XSER", "cpu") == "cpu":
        torch.save(data, path)
        return
    info = {}
    ref = {}
    for i, (k, v) in enumerate(data.items()):
        assert isinstance(v, torch.Tensor)
        torch.save(v, os.path.join(folder, f"tensor_{i}.pt"))
        info[i] = {"dtype": v.dtype, "shape": v.shape, "expert_model_parallel": False}
        ref[k] = TensorReference(i)
    torch.save(ref, path)
    torch.save(info, path + ".info.pt")


def _xser_load_data(checkpoint_dir, path, groups=None, ep_only=False, ignore_tensor_data=False):
    ref = torch.load(path, weights_only=False)
    return {k: (torch.load(os.path.join(path + ".tensors", f"tensor_{v.tid}.pt")) if isinstance(v, TensorReference) else v)
            for k, v in ref.items()}


def create_partitions(pipeline_parallel_size, model_layer_names):  # NxD pipeline/partition.py
    num_hidden_layers = len(model_layer_names)
    num_layer_per_partition = num_hidden_layers // pipeline_parallel_size
    assert num_layer_per_partition >= 1
    layers_per_partition = [num_layer_per_partition for x in range(pipeline_parallel_size)]
    remainder = num_hidden_layers % pipeline_parallel_size
    if remainder > 0:
        for i in range(-remainder, 0):
            layers_per_partition[i] += 1
    pipeline_cuts = []
    current_cut = 0
    for layers in layers_per_partition[:-1]:
        current_cut += layers
        pipeline_cuts.append(model_layer_names[current_cut - 1])
    return pipeline_cuts


def stage_to_pipeline_parallel_rank(stage, pp_size=None):
    return stage % pp_size


def install_stubs():
    def mod(name, **attrs):
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m
        return m

    mod("torch_xla")
    mod("torch_xla.utils")
    ser = mod("torch_xla.utils.serialization", save=_xser_save, _get_tensors_folder=lambda p: p + ".tensors")
    TensorReference.__module__ = "torch_xla.utils.serialization"
    ser.TensorReference = TensorReference
    mod("neuronx_distributed")
    mod("neuronx_distributed.pipeline")
    mod("neuronx_distributed.pipeline.partition", create_partitions=create_partitions,
        stage_to_pipeline_parallel_rank=stage_to_pipeline_parallel_rank)
    mod("neuronx_distributed.trainer")
    mod("neuronx_distributed.trainer.checkpoint", _xser_load_data=_xser_load_data)
    mod("neuronx_distributed.trainer.checkpoint_storage", BaseCheckpointStorage=object,
        create_checkpoint_storage=lambda d: None)
    mod("neuronx_distributed.scripts")
    mod("neuronx_distributed.scripts.yaml_converter", convert_yaml_to_json=lambda p: p)


# ---------------------------------------------------------------------------------------------

def logits_of(model):
    with torch.no_grad():
        return model(TOKENS).logits.double()


def classes(arch):
    import transformers
    c, m = ARCHS[arch]
    return getattr(transformers, c), getattr(transformers, m)


def cmd_make(out, case):
    spec = dict(CASES[case])
    arch = spec.pop("arch", "llama")
    Config, Model = classes(arch)
    torch.manual_seed(7)
    base = dict(BASE, architectures=[ARCHS[arch][1]], model_type=arch)
    cfg = Config(**base, **spec)
    model = Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # not the init's zeros/ones: every byte of every tensor matters
    model.save_pretrained(out, safe_serialization=True)
    torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin.full"))
    os.makedirs(os.path.join(out, "full"), exist_ok=True)
    os.replace(os.path.join(out, "pytorch_model.bin.full"), os.path.join(out, "full", "pytorch_model.bin"))
    with open(os.path.join(out, "ref_logits.json"), "w") as f:
        json.dump(logits_of(model).tolist(), f)


def cmd_convert(flags):
    install_stubs()
    sys.path.insert(0, os.path.join(HERE, "vendor"))
    from nxd_checkpoint_converter import CheckpointConverterBase
    c = CheckpointConverterBase()
    c.run(c.get_arg_parser().parse_args(flags))


def cmd_logits(path, config, ref):
    with open(config) as f:
        raw = json.load(f)
    Config, Model = classes(raw.get("model_type", "llama"))
    if os.path.isdir(path):
        model = Model.from_pretrained(path, torch_dtype=torch.float32).eval()
        missing = unexpected = []
    else:
        cfg = Config(**raw)
        model = Model(cfg).eval()
        sd = torch.load(path)
        r = model.load_state_dict(sd, strict=False)
        missing, unexpected = list(r.missing_keys), list(r.unexpected_keys)
        model = model.float()
    with open(ref) as f:
        want = torch.tensor(json.load(f), dtype=torch.float64)
    got = logits_of(model)
    print(json.dumps({"max_abs_diff": float((got - want).abs().max()), "missing": missing, "unexpected": unexpected}))


def digest(t):
    t = t.contiguous()
    return [str(t.dtype), list(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()]


def cmd_dump(model_dir):
    install_stubs()
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".pt") or name.endswith(".info.pt"):
            continue
        p = os.path.join(model_dir, name)
        sd = _xser_load_data(None, p)
        out[name] = {k: digest(v) for k, v in sd.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make":
        cmd_make(*args)
    elif cmd == "convert":
        cmd_convert(args)
    elif cmd == "logits":
        cmd_logits(*args)
    elif cmd == "dump":
        cmd_dump(*args)
    else:
        raise SystemExit(f"unknown command {cmd}")
