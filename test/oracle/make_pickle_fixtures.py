"""Writes test/fixtures/pickles.json, the golden pickles of test/unit/pickle.test.ts.

Run once with the oracle python (torch 2.13, CPython 3.11) and commit the output:
    PYTHONHASHSEED=0 <oracle-venv>/bin/python test/oracle/make_pickle_fixtures.py

Contents:
  protocol_cases   structures pickled with protocols 0-5 by CPython, with their plain form (toPlain)
  pickler_goldens  CPython's protocol-2 pickles of values the unit test rebuilds as PyValues
                   (the pickler must write the same bytes)
  torch_save       the data.pkl of a torch.save'd state dict and its plain form
"""
import argparse
import base64
import collections
import io
import json
import os
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from pickle_oracle import (  # noqa: E402
    mixed_structure, torch_structure, reference_metadata, to_plain, pickles_all_protocols, restricted_loads,
)
import pickle  # noqa: E402


def golden_values():
    shared = [1]
    pair = (1, 2)
    return {
        "ints": [0, 1, 255, 256, 65535, 65536, -1, -2**31, 2**31 - 1, 2**31, -2**31 - 1, 2**53 + 1, 2**63, -2**63,
                 2**70, -(2**70), 2**2100],
        "floats": [0.0, -0.0, 1.5, -2.25e-300, float("inf"), float("-inf"), float("nan")],
        "strings": ["", "a", "ünï", "😀", "a", "a\ud800b", "x" * 300, "ünï"],
        "bytes": [b"", b"\x00\xff", b"abc", bytes([97, 98, 99]), b"a", bytes([97]), b""],
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
        "containers": {
            "list1": [1], "list2": [1, 2], "dict1": {"a": 1},
            "tuple_keys": {(1, 2): "a", ("x",): [1], 3: "i"},
            "ordered": collections.OrderedDict([("b", 1), ("a", 2)]), "empty_od": collections.OrderedDict(),
            "nested": {"a": {"b": [{}]}},
        },
        "sets": [set(), {1, 2, 3}, frozenset(), frozenset([5])],
        "misc": [complex(1.5, -2), slice(1, None, 2), slice(5), bytearray(b"ab\xff"), bytearray()],
        "shared": [shared, shared, (shared,), pair, pair],
        "torch_values": [torch.Size([3, 4]), torch.Size([]), torch.float32, torch.bfloat16, torch.strided, torch.strided],
        "namespace": argparse.Namespace(lr=0.1, name="run"),
        "big_list": list(range(1001)),
        "big_dict": {f"k{i}": i for i in range(300)},
        "metadata": reference_metadata(),
    }


def golden_state_dict():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = collections.OrderedDict()
    sd["w"] = base
    sd["w_t"] = base.t()
    sd["bf16"] = torch.zeros(2, 3, dtype=torch.bfloat16)
    sd["fp8"] = torch.zeros(4, dtype=torch.float8_e4m3fn)
    sd["u64"] = torch.zeros(2, dtype=torch.uint64)
    sd["p"] = torch.nn.Parameter(torch.ones(2))
    sd["n"] = 5
    buf = io.BytesIO()
    torch.save(sd, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def main():
    cases = [("mixed", mixed_structure()), ("torch", torch_structure()), ("metadata", reference_metadata())]
    data_pkl = golden_state_dict()
    out = {
        "generator": "test/oracle/make_pickle_fixtures.py",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "protocol_cases": [{"name": n, "plain": to_plain(v), "pickles": pickles_all_protocols(v)} for n, v in cases],
        "pickler_goldens": [{"name": n, "hex": pickle.dumps(v, protocol=2).hex()} for n, v in golden_values().items()],
        "torch_save": {"data_pkl": base64.b64encode(data_pkl).decode(), "plain": to_plain(restricted_loads(data_pkl))},
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "pickles.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"), allow_nan=False)
        f.write("\n")
    print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
