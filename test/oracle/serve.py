"""A long-lived oracle process: runs test/oracle/<script> requests one after another in this
interpreter, so torch, transformers, megatron-core … are imported once per test file instead of
once per call (each fresh start costs seconds, tens of seconds on a loaded machine).

Protocol: one JSON request per line on stdin, {"script": "models_oracle.py", "args": [...]};
one JSON reply per line on file descriptor 3, {"ok": true, "stdout": "..."} or
{"ok": false, "stderr": "...", "code": N}. A script runs as `__main__` (runpy), with sys.argv
set and Python-level stdout/stderr captured; it gets fresh globals each time, and the modules
it imports stay loaded. Scripts that start processes (torch.multiprocessing ranks) or patch what
they import are not sent here (test/helpers/oracle.ts runs those in a fresh interpreter); a
request that leaves a process group or megatron-core's parallel state behind ends this server
after its reply (`dirty`).
"""
import io
import json
import os
import runpy
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
reply = os.fdopen(3, "w", buffering=1)


def run(script, args):
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", write_through=True)
    saved = sys.argv, sys.stdout, sys.stderr, os.getcwd()
    sys.argv = [os.path.join(HERE, script), *args]
    sys.stdout, sys.stderr = out, err
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code not in (None, 0) and not isinstance(e.code, int):
            err.write(str(e.code) + "\n")
    except BaseException:  # noqa: BLE001 - every failure is the request's, reported to it
        traceback.print_exc(file=err)
        code = 1
    finally:
        out.flush()
        err.flush()
        sys.argv, sys.stdout, sys.stderr = saved[0], saved[1], saved[2]
        os.chdir(saved[3])
    stdout = out_bytes.getvalue().decode("utf-8", "replace")
    stderr = err_bytes.getvalue().decode("utf-8", "replace")
    return {"ok": True, "stdout": stdout} if code == 0 else {"ok": False, "code": code, "stderr": stderr, "stdout": stdout}


def dirty():
    """Whether the last request left process-wide state a later one would trip on: a
    torch.distributed process group, or megatron-core's parallel state (a second
    initialize_model_parallel asserts). Such a server answers, then exits; the next request
    gets a fresh interpreter."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return True
    except Exception:  # noqa: BLE001
        return True
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and getattr(ps, "_DATA_PARALLEL_GROUP", None) is not None:
        return True
    return False


for line in sys.stdin:
    if not line.strip():
        continue
    req = json.loads(line)
    res = run(req["script"], req["args"])
    res["exiting"] = dirty()
    reply.write(json.dumps(res) + "\n")
    if res["exiting"]:
        reply.flush()
        os._exit(0)
