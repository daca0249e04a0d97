"""Oracle for the pickle interop tests (test/interop/pickle.test.ts).

Subcommands (all print JSON on stdout):
  assorted                    python pickles (protocols 0-5) of assorted structures + their plain form
  load <in.json>              load shardshift's pickles ([{name, b64}]) with a restricted Unpickler
  torchload <pkl> <storages>  put a pickle in a torch zip (storages: JSON {key: nbytes}) and torch.load(weights_only=True)
  dcp-save <dir>              torch.distributed.checkpoint.save a small state dict; plain form of its .metadata
  dcp-check <pkl>             pickle.load shardshift's Metadata and compare it with reference_metadata()
  dcp-roundtrip <dir> <pkl>   compare a re-pickled .metadata with the original and dcp.load through it
  torch-save <dir>            torch.save a state dict; write its data.pkl to <dir>; describe its tensors

`to_plain` mirrors toPlain() in src/pickle/unpickler.ts.
"""
import _compat_pickle
import argparse
import base64
import collections
import enum
import io
import json
import math
import os
import pathlib
import pickle
import random
import sys
import warnings
import zipfile

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import metadata as dcpm  # noqa: E402
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402

SAFE_MAX = 2**53 - 1

DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.uint16: "U16", torch.int16: "I16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.uint32: "U32", torch.int32: "I32", torch.float32: "F32",
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e8m0fnu: "F8_E8M0",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex128: "C128",
}
STORAGE_DTYPES = {cls_name: DTYPE_NAMES[dt] for dt, cls_name in torch.storage._dtype_to_storage_type_map().items() if dt in DTYPE_NAMES}


# ------------------------------------------------------------------------------------------------
# The plain (JSON) form, as toPlain() in TypeScript renders the unpickled values


class StorageMarker:
    """What persistent_load returns for ('storage', cls, key, location, numel)."""

    def __init__(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"bad persistent id {pid!r}")
        _, cls, key, location, numel = pid
        self.key, self.location, self.numel = key, location, numel
        if cls is torch.UntypedStorage:
            self.dtype, self.untyped = "U8", True
        else:
            self.dtype, self.untyped = STORAGE_DTYPES[cls.__name__], False

    def plain(self):
        return {"key": self.key, "dtype": self.dtype, "location": self.location, "numel": self.numel, "untyped": self.untyped}


class FakeTensor:
    def __init__(self, storage, offset, size, stride, requires_grad, dtype, parameter=False, state=None):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.requires_grad, self.dtype, self.parameter, self.state = requires_grad, dtype, parameter, state

    def plain(self):
        t = {"dtype": self.dtype, "shape": list(self.size), "stride": list(self.stride), "offset": self.offset,
             "storage": self.storage.key, "requires_grad": self.requires_grad, "parameter": self.parameter}
        if self.state is not None:
            t["state"] = to_plain(self.state)
        return t


def _hooks_ok(hooks):
    if type(hooks) is not collections.OrderedDict or hooks:
        raise pickle.UnpicklingError(f"backward hooks must be an empty OrderedDict, got {hooks!r}")


def _check_tuple_of_ints(x, what):
    if type(x) is not tuple or not all(type(i) is int for i in x):
        raise pickle.UnpicklingError(f"{what} must be a tuple of ints, got {x!r}")


def fake_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    assert isinstance(storage, StorageMarker) and not storage.untyped
    _check_tuple_of_ints(size, "size")
    _check_tuple_of_ints(stride, "stride")
    _hooks_ok(hooks)
    assert metadata is None and type(requires_grad) is bool
    return FakeTensor(storage, offset, size, stride, requires_grad, storage.dtype)


def fake_rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    assert isinstance(storage, StorageMarker) and storage.untyped
    _check_tuple_of_ints(size, "size")
    _check_tuple_of_ints(stride, "stride")
    _hooks_ok(hooks)
    assert metadata is None and type(requires_grad) is bool
    return FakeTensor(storage, offset, size, stride, requires_grad, DTYPE_NAMES[dtype])


def fake_rebuild_parameter(data, requires_grad, hooks):
    assert isinstance(data, FakeTensor) and not data.requires_grad
    _hooks_ok(hooks)
    return FakeTensor(data.storage, data.offset, data.size, data.stride, requires_grad, data.dtype, True)


def fake_rebuild_parameter_with_state(data, requires_grad, hooks, state):
    p = fake_rebuild_parameter(data, requires_grad, hooks)
    p.state = state
    return p


def fake_rebuild_from_type_v2(func, new_type, args, state):
    assert new_type is torch.Tensor
    t = func(*args)
    t.state = state
    return t


def to_plain(v):
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if -SAFE_MAX <= v <= SAFE_MAX else {"__int__": str(v)}
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return {"__float__": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    if isinstance(v, bytes):
        return {"__bytes__": v.hex()}
    if isinstance(v, bytearray):
        return {"__bytearray__": bytes(v).hex()}
    if isinstance(v, (tuple, list)):
        return [to_plain(x) for x in v]
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v):
            return {k: to_plain(x) for k, x in v.items()}
        return {"__dict__": [[to_plain(k), to_plain(x)] for k, x in v.items()]}
    if isinstance(v, frozenset):
        return {"__frozenset__": [to_plain(x) for x in v]}
    if isinstance(v, set):
        return {"__set__": [to_plain(x) for x in v]}
    if isinstance(v, complex):
        return {"__complex__": [v.real, v.imag]}
    if isinstance(v, slice):
        return {"__slice__": [to_plain(v.start), to_plain(v.stop), to_plain(v.step)]}
    if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
        return {"__global__": str(v)}
    if isinstance(v, type):
        return {"__global__": f"{v.__module__}.{v.__qualname__}"}
    if isinstance(v, StorageMarker):
        return {"__storage__": v.plain()}
    if isinstance(v, FakeTensor):
        return {"__tensor__": v.plain()}
    if isinstance(v, torch.Tensor):
        return {"__tensor__": describe_tensor(v)}
    qual = f"{type(v).__module__}.{type(v).__qualname__}"
    if isinstance(v, enum.Enum):
        return {"__class__": qual, "__args__": [to_plain(v.value)]}
    if isinstance(v, pathlib.PurePath):
        return {"__class__": qual, "__args__": list(v.parts)}
    o = {"__class__": qual}
    state = v.__getstate__()
    if state is None:
        pass
    elif isinstance(state, dict):
        o.update({k: to_plain(x) for k, x in state.items()})
    else:
        o["__state__"] = to_plain(state)
    return o


def describe_tensor(t):
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "stride": list(t.stride()), "offset": t.storage_offset(),
            "requires_grad": t.requires_grad, "parameter": isinstance(t, torch.nn.Parameter)}


# ------------------------------------------------------------------------------------------------
# Values


def mixed_structure():
    shared = [1, "shared"]
    return {
        "none": None, "true": True, "false": False,
        "ints": [0, 1, -1, 255, 256, 65535, 65536, -2**31, 2**31 - 1, 2**31, -2**31 - 1, 2**53 - 1, 2**53, 2**63, -2**64 - 1, 2**100],
        "floats": [0.0, -1.5, 1e300, 5e-324, float("inf"), float("-inf"), float("nan")],
        "strs": ["", "ascii", "ünïcödé", "日本語", "😀", "back\\slash\nnew\rline\x00nul\x1a", "a\ud800b", "x" * 300],
        "bytes": [b"", b"\x00\xff", b"abc", bytes(range(256)) * 2],
        "bytearray": [bytearray(b"ab\xff"), bytearray()],
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
        "nested": {"a": {"b": {"c": [1, (2, [3, {"d": None}])]}}},
        "tuple_keys": {(1, 2): "a", ("x",): [1], 3: "int key", -5: "negative", (): "empty"},
        "set": {1, 2, 3},
        "frozenset": frozenset([4, 5]),
        "complex": complex(1.5, -2),
        "slice": slice(1, None, 2),
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "shared": [shared, shared, (shared,)],
        "namespace": argparse.Namespace(lr=0.1, name="run", layers=[1, 2]),
        "many": list(range(1001)),
        "memo_heavy": [f"s{i}" for i in range(260)],
    }


def torch_structure():
    return {
        "size": torch.Size([3, 4]),
        "empty_size": torch.Size([]),
        "dtypes": [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint16, torch.int64],
        "layout": torch.strided,
        "enum": dcpm._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT,
        "path": pathlib.PosixPath("/tmp/ckpt/x"),
    }


def reference_metadata():
    """A DCP Metadata with every class torch 2.13 pickles in .metadata (mirrored in the TS tests)."""
    props = dcpm.TensorProperties(dtype=torch.float32)
    props16 = dcpm.TensorProperties(dtype=torch.bfloat16, requires_grad=True)
    return dcpm.Metadata(
        state_dict_metadata={
            "model.w": dcpm.TensorStorageMetadata(
                properties=props, size=torch.Size([4, 6]),
                chunks=[dcpm.ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 6])),
                        dcpm.ChunkStorageMetadata(offsets=torch.Size([2, 0]), sizes=torch.Size([2, 6]))]),
            "model.b": dcpm.TensorStorageMetadata(
                properties=props16, size=torch.Size([6]),
                chunks=[dcpm.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([6]))]),
            "step": dcpm.BytesStorageMetadata(),
        },
        planner_data={"model.w": ("model", "w"), "model.b": ("model", "b"), "step": ("step",)},
        storage_data={
            dcpm.MetadataIndex("model.w", [0, 0], 0): _StorageInfo("__0_0.distcp", 0, 100),
            dcpm.MetadataIndex("model.w", [2, 0], 1): _StorageInfo("__1_0.distcp", 0, 100),
            dcpm.MetadataIndex("model.b", [0], 0): _StorageInfo("__0_0.distcp", 100, 50, transform_descriptors=["stream.zstd/1"]),
            dcpm.MetadataIndex("step"): _StorageInfo("__0_0.distcp", 150, 20),
        },
        storage_meta=dcpm.StorageMeta(checkpoint_id=pathlib.PosixPath("/ckpt/run1"), save_id="save-1", load_id=None, modules=["model"]),
        version="1.0.0",
    )


def assorted(seed=1234, count=20):
    """Random nested structures (deterministic)."""
    rnd = random.Random(seed)

    def leaf():
        k = rnd.randrange(9)
        if k == 0:
            return rnd.randrange(-2**70, 2**70)
        if k == 1:
            return rnd.randrange(-300, 70000)
        if k == 2:
            return rnd.uniform(-1e6, 1e6)
        if k == 3:
            return "".join(rnd.choice("ab\u00e9\u65e5\U0001f600\\\n ") for _ in range(rnd.randrange(12)))
        if k == 4:
            return bytes(rnd.randrange(256) for _ in range(rnd.randrange(10)))
        if k == 5:
            return rnd.choice([None, True, False])
        if k == 6:
            return torch.Size([rnd.randrange(9) for _ in range(rnd.randrange(4))])
        if k == 7:
            return complex(rnd.randrange(-5, 5), rnd.random())
        return rnd.choice([torch.float16, torch.bfloat16, torch.int8])

    def node(depth):
        if depth > 3 or rnd.random() < 0.3:
            return leaf()
        k = rnd.randrange(5)
        n = rnd.randrange(6)
        if k == 0:
            return [node(depth + 1) for _ in range(n)]
        if k == 1:
            return tuple(node(depth + 1) for _ in range(n))
        if k == 2:
            return {f"k{i}": node(depth + 1) for i in range(n)}
        if k == 3:
            return collections.OrderedDict((i, node(depth + 1)) for i in range(n))
        return {(i, str(i)): node(depth + 1) for i in range(n)}

    return [node(0) for _ in range(count)]


def pickles_all_protocols(value):
    return {str(p): base64.b64encode(pickle.dumps(value, protocol=p)).decode() for p in range(6)}


# ------------------------------------------------------------------------------------------------
# Restricted loading of shardshift's output


def allowed_globals():
    g = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
        ("builtins", "slice"): slice, ("builtins", "bytearray"): bytearray, ("builtins", "bytes"): bytes,
        ("_codecs", "encode"): __import__("_codecs").encode,
        ("torch", "Size"): torch.Size, ("torch", "Tensor"): torch.Tensor,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch._utils", "_rebuild_tensor_v2"): fake_rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): fake_rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): fake_rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): fake_rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): fake_rebuild_from_type_v2,
        ("torch.storage", "UntypedStorage"): torch.UntypedStorage,
        ("argparse", "Namespace"): argparse.Namespace,
        ("pathlib", "PosixPath"): pathlib.PosixPath,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    }
    for name in dcpm.__all__ + ["_MEM_FORMAT_ENCODING"]:
        g[(dcpm.__name__, name)] = getattr(dcpm, name)
    for dt in DTYPE_NAMES:
        g[("torch", str(dt).split(".")[1])] = dt
    for cls_name in STORAGE_DTYPES:
        g[("torch", cls_name)] = getattr(torch, cls_name)
    return g


class RestrictedUnpickler(pickle.Unpickler):
    GLOBALS = allowed_globals()

    def find_class(self, module, name):
        # What pickle.Unpickler.find_class does for protocols < 3 (shardshift writes protocol 2).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return self.GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global not allowed: {module}.{name}") from None

    def persistent_load(self, pid):
        return StorageMarker(pid)


def restricted_loads(data):
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_assorted():
    cases = [{"name": f"random{i}", "value": v} for i, v in enumerate(assorted())]
    cases += [{"name": "mixed", "value": mixed_structure()}, {"name": "torch", "value": torch_structure()},
              {"name": "metadata", "value": reference_metadata()}]
    return [{"name": c["name"], "plain": to_plain(c["value"]), "pickles": pickles_all_protocols(c["value"])} for c in cases]


def cmd_load(path):
    """Loads each pickle; `same_as_cpython` says whether CPython re-pickles the loaded value (protocol 2) to the same bytes."""
    out = []
    for item in json.load(open(path)):
        data = base64.b64decode(item["b64"])
        try:
            value = restricted_loads(data)
        except Exception as e:  # reported; the TS test fails with the message
            out.append({"name": item["name"], "error": f"{type(e).__name__}: {e}"})
            continue
        try:
            same = pickle.dumps(value, protocol=2) == data
        except Exception:
            same = None
        out.append({"name": item["name"], "plain": to_plain(value), "same_as_cpython": same})
    return out


def cmd_torchload(pkl_path, storages_json):
    storages = json.loads(storages_json)
    zpath = pkl_path + ".pt"
    writer = torch._C.PyTorchFileWriter(zpath)
    data = open(pkl_path, "rb").read()
    writer.write_record("data.pkl", data, len(data))
    writer.write_record("byteorder", b"little", len(b"little"))
    for key, nbytes in storages.items():
        writer.write_record(f"data/{key}", bytes(nbytes), nbytes)
    writer.write_end_of_file()
    del writer
    sd = torch.load(zpath, weights_only=True)
    groups = {}
    out = {}
    for name, t in sd.items():
        d = describe_tensor(t)
        ptr = t.untyped_storage().data_ptr()
        d["group"] = groups.setdefault(ptr, name)
        d["storage_nbytes"] = t.untyped_storage().nbytes()
        out[name] = d
    return out


def dcp_state_dict():
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(4, 6), "b": torch.arange(6, dtype=torch.int64)},
        "emb": torch.ones(3, 2, dtype=torch.bfloat16),
        "step": 7,
        "name": "run-1",
    }


def cmd_dcp_save(path):
    dcp.save(dcp_state_dict(), checkpoint_id=path)
    with open(os.path.join(path, ".metadata"), "rb") as f:
        md = pickle.load(f)
    return {"plain": to_plain(md), "files": sorted(os.listdir(path)), "version": md.version}


RESTRICTED_DCP = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
} | {(dcpm.__name__, n) for n in dcpm.__all__ + ["_MEM_FORMAT_ENCODING"]} | {("torch", str(d).split(".")[1]) for d in DTYPE_NAMES}


class DcpUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in RESTRICTED_DCP:
            raise pickle.UnpicklingError(f"global not allowed: {module}.{name}")
        return super().find_class(module, name)


def cmd_dcp_check(pkl_path):
    data = open(pkl_path, "rb").read()
    md = DcpUnpickler(io.BytesIO(data)).load()
    ref = reference_metadata()
    return {
        "is_metadata": type(md) is dcpm.Metadata,
        "equal": md == ref,
        "storage_meta_equal": md.storage_meta == ref.storage_meta,
        "same_bytes_as_cpython": data == pickle.dumps(ref, protocol=2),
        "plain": to_plain(md),
    }


def cmd_dcp_roundtrip(ckpt, pkl_path):
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        original_bytes = f.read()
    original = pickle.loads(original_bytes)
    data = open(pkl_path, "rb").read()
    md = DcpUnpickler(io.BytesIO(data)).load()
    os.replace(os.path.join(ckpt, ".metadata"), os.path.join(ckpt, ".metadata.orig"))
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(data)
    target = dcp_state_dict()
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
    expected["model"] = {k: v.clone() for k, v in target["model"].items()}
    target = {"model": {"w": torch.zeros(4, 6), "b": torch.zeros(6, dtype=torch.int64)}, "emb": torch.zeros(3, 2, dtype=torch.bfloat16), "step": 0, "name": ""}
    dcp.load(target, checkpoint_id=ckpt)
    loaded_ok = (torch.equal(target["model"]["w"], expected["model"]["w"]) and torch.equal(target["model"]["b"], expected["model"]["b"])
                 and torch.equal(target["emb"], expected["emb"]) and target["step"] == 7 and target["name"] == "run-1")
    return {"equal": md == original, "storage_meta_equal": md.storage_meta == original.storage_meta,
            "same_bytes_as_cpython": data == pickle.dumps(original, protocol=2), "dcp_load_ok": bool(loaded_ok)}


def cmd_torch_save(out_dir):
    torch.manual_seed(0)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = collections.OrderedDict()
    sd["w"] = base
    sd["w_t"] = base.t()
    sd["w_rows"] = base[1:]
    sd["w_col"] = base[:, 2]
    sd["bf16"] = torch.randn(2, 3).to(torch.bfloat16)
    sd["fp8"] = torch.randn(4).to(torch.float8_e4m3fn)
    sd["fp8_view"] = sd["fp8"][1:3]
    sd["u16"] = torch.arange(5).to(torch.uint16)
    sd["i64"] = torch.arange(3, dtype=torch.int64)
    sd["param"] = torch.nn.Parameter(torch.ones(2, 2))
    sd["frozen"] = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(sd, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    pkl_name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    prefix = pkl_name[: -len("data.pkl")]
    with open(os.path.join(out_dir, "data.pkl"), "wb") as f:
        f.write(z.read(pkl_name))
    records = {n[len(prefix) + len("data/"):]: z.getinfo(n).file_size for n in z.namelist() if n.startswith(prefix + "data/")}
    groups = {}
    tensors = {}
    for name, t in sd.items():
        d = describe_tensor(t)
        d["group"] = groups.setdefault(t.untyped_storage().data_ptr(), name)
        d["storage_nbytes"] = t.untyped_storage().nbytes()
        tensors[name] = d
    return {"tensors": tensors, "records": records}


def main():
    cmd, *args = sys.argv[1:]
    fn = {
        "assorted": cmd_assorted, "load": cmd_load, "torchload": cmd_torchload, "dcp-save": cmd_dcp_save,
        "dcp-check": cmd_dcp_check, "dcp-roundtrip": cmd_dcp_roundtrip, "torch-save": cmd_torch_save,
    }[cmd]
    json.dump(fn(*args), sys.stdout, allow_nan=False)


if __name__ == "__main__":
    main()
