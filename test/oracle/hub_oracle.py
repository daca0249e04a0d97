"""huggingface_hub's own client against shardshift's loopback hub double (test/helpers/hub-double.ts).

  snapshot <endpoint> <repo_id> <cache_dir> [token]
      snapshot_download into cache_dir, as a user would before running shardshift: prints the
      snapshot path and the files in it.
  pushed <endpoint> <repo_id> <revision> <download_dir> [token]
      lists the revision's files with HfApi.list_repo_files and downloads each with
      hf_hub_download; prints {path: sha256} of the downloaded bytes.
"""
import hashlib
import json
import os
import sys

from huggingface_hub import HfApi, hf_hub_download, snapshot_download


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def main():
    a = sys.argv[1:]
    if a[0] == "snapshot":
        endpoint, repo, cache = a[1], a[2], a[3]
        token = a[4] if len(a) > 4 else None
        path = snapshot_download(repo, cache_dir=cache, endpoint=endpoint, token=token)
        files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
        print(json.dumps({"path": path, "files": files}))
    elif a[0] == "pushed":
        endpoint, repo, rev, out = a[1], a[2], a[3], a[4]
        token = a[5] if len(a) > 5 else None
        api = HfApi(endpoint=endpoint, token=token)
        files = api.list_repo_files(repo, revision=rev)
        got = {}
        for f in files:
            p = hf_hub_download(repo, f, revision=rev, cache_dir=out, endpoint=endpoint, token=token)
            got[f] = sha256(p)
        print(json.dumps(got))
    else:
        raise SystemExit(f"unknown command {a[0]}")


if __name__ == "__main__":
    main()
