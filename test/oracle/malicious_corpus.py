"""The malicious-pickle corpus (issue 16): hostile pickles written by CPython itself.

    <oracle-venv>/bin/python test/oracle/malicious_corpus.py write   # → test/fixtures/malicious.json (commit it)
    <oracle-venv>/bin/python test/oracle/malicious_corpus.py live    # proves each live payload runs in CPython

Each payload, when CPython's own pickle.loads runs it in a scratch working directory, creates a
sentinel file there (`ss-pwned-<name>`): `live` loads every one that way and prints, as JSON,
which sentinel appeared — the test asserts that every payload marked live did run. shardshift
must refuse every one by naming the global, and create no sentinel. Non-code payloads (memo and
nesting bombs, huge length claims) are in the corpus too, marked `live: false`.
"""
import base64
import json
import os
import pickle
import pickletools
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "malicious.json")


def sentinel(name):
    return "ss-pwned-" + name


def reduce_pickle(func, args, proto=2):
    class P:
        def __reduce__(self):
            return func, args
    return pickle.dumps(P(), protocol=proto)


def touch_cmd(name):
    return "touch " + sentinel(name)


def py_touch(name):
    return "open(%r, 'w').close()" % sentinel(name)


def global_op(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def first_global(data):
    strings = []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            return arg.replace(" ", ".")
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            return strings[-2] + "." + strings[-1]
    return ""


def corpus():
    import builtins
    import functools
    import operator
    import os as _os
    import subprocess
    out = []

    def add(name, data, glob, live=True, named=True):
        # The global as the bytes name it (protocol 2 writes Python 2 names: __builtin__.eval,
        # commands.Popen), which is what a refusal can quote.
        if glob and named:
            glob = first_global(data)
        # `global` may list alternatives (a|b): the first refused global depends on what the container allows.
        out.append({"name": name, "global": glob, "live": live, "pickle": base64.b64encode(data).decode()})

    add("os-system", reduce_pickle(_os.system, (touch_cmd("os-system"),)), "posix.system")
    add("os-system-proto0", reduce_pickle(_os.system, (touch_cmd("os-system-proto0"),), proto=0), "posix.system")
    add("os-system-proto4", reduce_pickle(_os.system, (touch_cmd("os-system-proto4"),), proto=4), "posix.system")
    add("subprocess-popen", reduce_pickle(subprocess.Popen, (["touch", sentinel("subprocess-popen")],)), "subprocess.Popen")
    add("subprocess-call", reduce_pickle(subprocess.call, (["touch", sentinel("subprocess-call")],)), "subprocess.call")
    add("eval", reduce_pickle(builtins.eval, (py_touch("eval"),)), "builtins.eval")
    add("exec", reduce_pickle(builtins.exec, (py_touch("exec"),)), "builtins.exec")
    # compile + exec through a hand-written pickle: exec(compile(src, '<x>', 'exec'))
    add("compile", b"\x80\x02" + global_op("builtins", "exec") + global_op("builtins", "compile")
        + pickle.dumps(py_touch("compile"), 2)[2:-1] + pickle.dumps("<x>", 2)[2:-1] + pickle.dumps("exec", 2)[2:-1]
        + b"\x87R\x85R.", "builtins.exec")
    # getattr(__import__('os'), 'system')('touch …')
    add("import-getattr", b"\x80\x02" + global_op("builtins", "getattr") + global_op("builtins", "__import__")
        + pickle.dumps("os", 2)[2:-1] + b"\x85R" + pickle.dumps("system", 2)[2:-1] + b"\x86R"
        + pickle.dumps(touch_cmd("import-getattr"), 2)[2:-1] + b"\x85R.", "builtins.getattr")
    add("functools-partial", b"\x80\x02" + global_op("functools", "partial") + global_op("posix", "system")
        + pickle.dumps(touch_cmd("functools-partial"), 2)[2:-1] + b"\x86R)R.", "functools.partial")
    add("operator-methodcaller", b"\x80\x02" + global_op("operator", "methodcaller") + pickle.dumps("system", 2)[2:-1]
        + pickle.dumps(touch_cmd("operator-methodcaller"), 2)[2:-1] + b"\x86R" + global_op("builtins", "__import__")
        + pickle.dumps("os", 2)[2:-1] + b"\x85R\x85R.", "operator.methodcaller")
    add("operator-attrgetter", b"\x80\x02" + global_op("operator", "attrgetter") + pickle.dumps("system", 2)[2:-1]
        + b"\x85R" + global_op("builtins", "__import__") + pickle.dumps("os", 2)[2:-1] + b"\x85R\x85R"
        + pickle.dumps(touch_cmd("operator-attrgetter"), 2)[2:-1] + b"\x85R.", "operator.attrgetter")
    add("pkgutil-resolve-name", b"\x80\x02" + global_op("pkgutil", "resolve_name") + pickle.dumps("os:system", 2)[2:-1]
        + b"\x85R" + pickle.dumps(touch_cmd("pkgutil-resolve-name"), 2)[2:-1] + b"\x85R.", "pkgutil.resolve_name")
    add("importlib", b"\x80\x02" + global_op("builtins", "getattr") + global_op("importlib", "import_module")
        + pickle.dumps("os", 2)[2:-1] + b"\x85R" + pickle.dumps("system", 2)[2:-1] + b"\x86R"
        + pickle.dumps(touch_cmd("importlib"), 2)[2:-1] + b"\x85R.", "builtins.getattr")
    # os.system(_codecs.encode('touch …', 'latin1')): the bytes-building trick of protocol-2 payloads
    add("codecs-encode-bytes", b"\x80\x02" + global_op("posix", "system") + global_op("_codecs", "encode")
        + pickle.dumps(touch_cmd("codecs-encode-bytes"), 2)[2:-1] + pickle.dumps("latin1", 2)[2:-1] + b"\x86R\x85R.", "posix.system")
    # torch look-alikes and gadgets: names only (never importable as code here).
    add("torch-load", b"\x80\x02" + global_op("torch", "load") + pickle.dumps("x.pt", 2)[2:-1] + b"\x85R.", "torch.load", live=False)
    add("torch-storage-load-from-bytes", b"\x80\x02" + global_op("torch.storage", "_load_from_bytes") + pickle.dumps(b"x", 2)[2:-1] + b"\x85R.",
        "torch.storage._load_from_bytes", live=False)
    add("torch-lookalike", b"\x80\x02" + global_op("torch._utils", "_rebuild_tensor_v2x") + b")R.", "torch._utils._rebuild_tensor_v2x", live=False)
    add("torch-hub-load", b"\x80\x02" + global_op("torch.hub", "load") + b")R.", "torch.hub.load", live=False)
    add("marshal-loads", b"\x80\x02" + global_op("marshal", "loads") + pickle.dumps(b"\xe3", 2)[2:-1] + b"\x85R.", "marshal.loads", live=False)
    add("copyreg-reconstructor", b"\x80\x02" + global_op("copyreg", "_reconstructor") + global_op("posix", "system")
        + global_op("builtins", "object") + b"N\x87R.", "posix.system", live=False, named=False)
    # BUILD on an allowed-looking object whose __setstate__ would be code
    add("build-setstate", b"\x80\x02" + global_op("collections", "OrderedDict") + b")R}" + pickle.dumps("__setstate__", 2)[2:-1]
        + global_op("posix", "system") + b"sb.", "posix.system", live=False, named=False)
    # numpy's object arrays unpickle their elements: np.array([os.system(...)], dtype=object). A
    # reader allowing numpy's reconstruct (Megatron's args) must still refuse the element's global.
    import numpy as np

    class Touch:
        def __reduce__(self):
            return _os.system, (touch_cmd("numpy-object-array"),)
    data = pickle.dumps(np.array([Touch()], dtype=object), protocol=2)
    add("numpy-object-array", data, first_global(data) + "|posix.system", named=False)
    # TorchScript and torch._C entry points: names only.
    add("torch-jit-load", b"\x80\x02" + global_op("torch.jit", "load") + pickle.dumps("x.pt", 2)[2:-1] + b"\x85R.", "torch.jit.load", live=False)
    add("torch-c-import-ir-module", b"\x80\x02" + global_op("torch._C", "_import_ir_module") + b")R.", "torch._C._import_ir_module", live=False)
    # Not code: resource claims.
    add("huge-binunicode-claim", b"\x80\x02X\xff\xff\xff\x7fabc.", "", live=False)
    add("memo-index-bomb", b"\x80\x02j\xff\xff\xff\x7f.", "", live=False)
    # `global`: the first global the pickle names that a safe loader must refuse (the allowed
    # copyreg._reconstructor / OrderedDict come first in the last two code payloads).
    add("nesting-bomb", b"\x80\x02" + b"]" * 3000 + b"a" * 2999 + b".", "", live=False)
    return out


def live():
    results = {}
    for c in corpus():
        if not c["live"]:
            continue
        with tempfile.TemporaryDirectory() as d:
            cwd = os.getcwd()
            os.chdir(d)
            try:
                try:
                    pickle.loads(base64.b64decode(c["pickle"]))
                except Exception:
                    pass
                import time
                for _ in range(50):
                    if os.path.exists(sentinel(c["name"])):
                        break
                    time.sleep(0.02)
                results[c["name"]] = os.path.exists(sentinel(c["name"]))
            finally:
                os.chdir(cwd)
    print(json.dumps(results))


def main():
    if sys.argv[1:2] == ["write"]:
        with open(sys.argv[2] if len(sys.argv) > 2 else OUT, "w") as f:
            json.dump({"comment": "written by test/oracle/malicious_corpus.py; shardshift must refuse each by naming its global", "pickles": corpus()}, f, indent=1)
            f.write("\n")
    elif sys.argv[1:] == ["live"]:
        live()
    else:
        sys.exit("usage: malicious_corpus.py write [path] | live")


if __name__ == "__main__":
    main()
