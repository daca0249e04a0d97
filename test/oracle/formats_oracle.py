"""The torch side of the format interop tests.

  make <dir>              write every fixture checkpoint with real torch / safetensors / DCP
  dump <format> <path>    load a checkpoint with the reference library and print, as JSON,
                          every tensor's dtype, shape and SHA-256 of its contiguous bytes, and
                          every non-tensor value's repr
  golden <dir>            make + dump every fixture (the committed golden set for pure-TS tests)
  dcpload <path> <json>   load a DCP checkpoint with dcp.load into a template built from a dump
                          (the API users call) and print the same JSON

Tensors are compared by hashing `clone(memory_format=contiguous)`'s storage bytes, which is the
C-order little-endian data — what shardshift's readers produce.
"""
import hashlib
import json
import os
import sys
import tempfile

import torch
import torch.distributed.checkpoint as dcp


def tensor_bytes(t: torch.Tensor) -> bytes:
    c = t.detach().clone(memory_format=torch.contiguous_format)
    return bytes(c.untyped_storage())


DTYPE_NAME = {
    torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.complex64: "C64", torch.complex128: "C128",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
NAME_DTYPE = {v: k for k, v in DTYPE_NAME.items()}


def flatten(obj, prefix=""):
    """Leaves by dotted name, as shardshift flattens them."""
    out = {}
    if isinstance(obj, dict) and obj and all(isinstance(k, (str, int)) for k in obj):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and obj:
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def describe(sd) -> dict:
    tensors, objects = {}, {}
    for k, v in flatten(sd).items():
        if isinstance(v, torch.Tensor):
            tensors[k] = {"dtype": DTYPE_NAME[v.dtype], "shape": list(v.shape),
                          "sha256": hashlib.sha256(tensor_bytes(v)).hexdigest()}
        else:
            objects[k] = repr(v)
    return {"tensors": tensors, "objects": objects}


def rand(shape, dtype, g):
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point and dtype.itemsize == 1:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def assorted():
    g = torch.Generator().manual_seed(1234)
    sd = {}
    for name, dt in DTYPE_NAME.items():
        sd[f"dtype.{dt}"] = rand((3, 5), name, g)
    base = torch.arange(100, dtype=torch.float32)
    sd["shared.view_a"] = base[10:20]
    sd["shared.view_b"] = base[50:60].view(2, 5)
    sd["shared.base"] = base
    m = torch.randn(6, 4, generator=g)
    sd["strided.transposed"] = m.t()
    sd["strided.every_other"] = m[:, ::2]
    sd["strided.offset_slice"] = m[2:5, 1:3]
    sd["edge.scalar"] = torch.tensor(3.25)
    sd["edge.empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    sd["edge.param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    return {
        "model": sd,
        "nested": {"layers": [torch.ones(2), (torch.zeros(3, dtype=torch.int64), torch.full((1,), 7.0))]},
        "meta": {"step": 5, "name": "tiny", "lr": 0.1, "big": 2**70, "flags": [True, None], "pair": (1, "a")},
    }


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 32, bias=False)


def dcp_worker(rank, world, init_file, out):
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor, Shard, Replicate
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(99)
    full = {
        "rows": torch.randn(7, 6, generator=g).to(torch.bfloat16),  # uneven split 4 + 3 along dim 0
        "cols": torch.randn(4, 5, generator=g),  # uneven split along dim 1
        "vec": torch.arange(10, dtype=torch.int64),
        "replicated": torch.randn(3, generator=g, dtype=torch.float64),
    }
    sd = {
        "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
        "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
        "vec": distribute_tensor(full["vec"], mesh, [Shard(0)]),
        "replicated": distribute_tensor(full["replicated"], mesh, [Replicate()]),
        "step": 11,
    }
    dcp.save(sd, checkpoint_id=out)
    if rank == 0:
        torch.save(full, out + ".expected.pt")
    dist.barrier()
    dist.destroy_process_group()


def make(d):
    os.makedirs(d, exist_ok=True)
    from safetensors.torch import save_file

    a = assorted()
    torch.save(a, os.path.join(d, "assorted.pt"))
    torch.manual_seed(0)
    tiny = Tiny()
    torch.save(tiny.state_dict(), os.path.join(d, "module_state.pt"))

    # DCP saved in one process: nested dicts, several dtypes, non-tensor entries.
    sd1 = {
        "model": {k: v for k, v in tiny.state_dict().items()},
        "extra": {"bf16": torch.randn(4, 4).to(torch.bfloat16), "fp8": torch.randn(8).to(torch.float8_e4m3fn)},
        "step": 3, "tag": "hello",
    }
    dcp.save(sd1, checkpoint_id=os.path.join(d, "dcp_single"))

    # DCP saved by two ranks (gloo, CPU): tensors split into chunks across two .distcp files.
    import torch.multiprocessing as mp
    init_file = tempfile.mktemp()
    mp.spawn(dcp_worker, args=(2, init_file, os.path.join(d, "dcp_multi")), nprocs=2, join=True)

    # safetensors: one file with every dtype torch and safetensors share, and a sharded model.
    st = {k: v.contiguous() for k, v in a["model"].items() if k.startswith("dtype.") and not k.endswith("C128")}
    save_file(st, os.path.join(d, "all_dtypes.safetensors"), metadata={"format": "pt", "note": "x"})
    sharded = os.path.join(d, "sharded")
    os.makedirs(sharded, exist_ok=True)
    sdt = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    keys = list(sdt)
    half = len(keys) // 2
    parts = [keys[:half], keys[half:]]
    wm = {}
    for i, ks in enumerate(parts):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sdt[k] for k in ks}, os.path.join(sharded, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in ks})
    total = sum(v.numel() * v.element_size() for v in sdt.values())
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
    with open(os.path.join(sharded, "config.json"), "w") as f:
        json.dump({"model_type": "tiny", "hidden_size": 8}, f)


def load(fmt, path):
    if fmt == "torch":
        if os.path.isdir(path):
            idx = [n for n in os.listdir(path) if n.endswith(".bin.index.json")]
            if idx:
                wm = json.load(open(os.path.join(path, idx[0])))["weight_map"]
                sd = {}
                for f in sorted(set(wm.values())):
                    sd.update(torch.load(os.path.join(path, f), weights_only=True))
                return sd
            (f,) = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
            path = os.path.join(path, f)
        return torch.load(path, weights_only=True)
    if fmt == "safetensors":
        from safetensors.torch import load_file
        if os.path.isdir(path):
            idx = [n for n in os.listdir(path) if n.endswith(".safetensors.index.json")]
            if idx:
                wm = json.load(open(os.path.join(path, idx[0])))["weight_map"]
                sd = {}
                for f in sorted(set(wm.values())):
                    sd.update(load_file(os.path.join(path, f)))
                return sd
            (f,) = [n for n in os.listdir(path) if n.endswith(".safetensors")]
            path = os.path.join(path, f)
        return load_file(path)
    if fmt == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        with tempfile.TemporaryDirectory() as t:
            dcp_to_torch_save(path, os.path.join(t, "x.pt"))
            return torch.load(os.path.join(t, "x.pt"), weights_only=False)
    raise SystemExit(f"unknown format {fmt}")


def dcpload(path, dump_json):
    """dcp.load into a template — the call users make — then describe what it filled in."""
    want = json.load(open(dump_json))
    sd = {}
    for k, t in want["tensors"].items():
        sd[k] = torch.zeros(t["shape"], dtype=NAME_DTYPE[t["dtype"]])
    for k in want["objects"]:
        sd[k] = None
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd


FIXTURES = {
    "assorted.pt": "torch", "module_state.pt": "torch", "dcp_single": "dcp", "dcp_multi": "dcp",
    "all_dtypes.safetensors": "safetensors", "sharded": "safetensors",
}


def golden(d):
    make(d)
    os.remove(os.path.join(d, "dcp_multi.expected.pt"))
    dumps = {name: {"format": fmt, **describe(load(fmt, os.path.join(d, name)))} for name, fmt in FIXTURES.items()}
    dumps["_generatedBy"] = f"test/oracle/formats_oracle.py golden, torch {torch.__version__}"
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(dumps, f, indent=1, sort_keys=True)


def zip64check(path):
    """torch.load (mmap, no 4 GiB copy) of shardshift's sparse >4 GiB archive."""
    sd = torch.load(path, weights_only=True, mmap=True)
    big = sd["big"]
    return {"big_shape": list(big.shape), "big_tail": big[-8:].tolist(), "after": sd["after"].tolist()}


def zip64make(path):
    """torch.save of a >4 GiB archive: one big uint8 tensor (pages never touched) and a small one."""
    big = torch.empty(2**32 + (1 << 20), dtype=torch.uint8)
    big[-8:] = torch.arange(8, dtype=torch.uint8)
    torch.save({"big": big, "after": torch.tensor([1.0, 2.0, 3.0, 4.0])}, path)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2])
    elif cmd == "dump":
        print(json.dumps(describe(load(sys.argv[2], sys.argv[3]))))
    elif cmd == "statedict_metadata":
        sd = torch.load(sys.argv[2], weights_only=True)
        print(json.dumps({"type": type(sd).__name__, "_metadata": {k: dict(v) for k, v in getattr(sd, "_metadata", {}).items()}}))
    elif cmd == "legacy":
        torch.save({"w": torch.ones(3)}, sys.argv[2], _use_new_zipfile_serialization=False)
    elif cmd == "zip64check":
        print(json.dumps(zip64check(sys.argv[2])))
    elif cmd == "zip64make":
        zip64make(sys.argv[2])
    elif cmd == "golden":
        golden(sys.argv[2])
    elif cmd == "dcpload":
        print(json.dumps(describe(dcpload(sys.argv[2], sys.argv[3]))))
    else:
        raise SystemExit(f"unknown command {cmd}")
