"""Oracle for src/tensor/cast.ts: what torch's `tensor.to(dtype)` does, for every pair of
F32, F16, BF16, F8_E4M3 (float8_e4m3fn) and F8_E5M2 (float8_e5m2), bit for bit.

Inputs per source dtype:
  F16, BF16          all 65,536 bit patterns, in order
  F8_E4M3, F8_E5M2   all 256 bit patterns, in order
  F32                edges ++ tie sweeps ++ random ++ focused random (see f32_inputs below);
                     every part is reproducible in TypeScript from cast-golden.json alone.

Each cast runs on one big contiguous tensor (small sets are tiled up to >= 2^20 elements), i.e.
torch's vectorized CPU kernel. The script also checks that the result does not depend on the
element's position in the tensor nor on the thread count (it re-runs the cast on a rotated copy
with 2 threads), and fails loudly if it does.

Usage:
  cast_tables.py dump DIR [--pairs F32:BF16,F16:F8_E4M3,...]
      writes DIR/in-<FROM>.bin (raw little-endian inputs) and DIR/out-<FROM>-<TO>.bin (torch's
      outputs); prints a JSON manifest on stdout.
  cast_tables.py digests
      prints JSON {torch, cpuCapability, inputs: {FROM: {count, sha256}}, outputs: {"FROM->TO": sha256}}.
  cast_tables.py golden [--write]
      prints (or writes to test/fixtures/cast-golden.json) the golden fixture the pure-TS unit
      test uses: the digests above plus the F32 input recipe (explicit edges, PRNG, seeds).
"""

import hashlib
import json
import os
import sys

import numpy as np
import torch

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NP_UINT = {4: np.uint32, 2: np.uint16, 1: np.uint8}
CASTABLE = list(DTYPES)

# Narrow formats: (exponent bits, mantissa bits, largest finite positive bit pattern).
FORMATS = {
    "F16": (5, 10, 0x7BFF),
    "BF16": (8, 7, 0x7F7F),
    "F8_E4M3": (4, 3, 0x7E),
    "F8_E5M2": (5, 2, 0x7B),
}

RANDOM_SEED = 0x5EEDCA57
RANDOM_COUNT = 1_000_000
FOCUSED_SEED = 0x0F0C05ED
FOCUSED_COUNT = 262_144
GOLDEN_RATIO_32 = 0x9E3779B9

GENERATOR_DOC = (
    "hash32(x) = lowbias32: x ^= x>>16; x = x*0x7feb352d mod 2^32; x ^= x>>15; x = x*0x846ca68b mod 2^32; x ^= x>>16. "
    "random[i] = hash32((seed + i*0x9e3779b9) mod 2^32). "
    "focused[i]: h = hash32((seed + i*0x9e3779b9) mod 2^32); bits = (h & 0x807fffff) | ((100 + ((h>>23) & 0xff) % 51) << 23) "
    "(random sign and mantissa, exponent field 100..150, i.e. 2^-27..2^24: every target's subnormal and rounding range)."
)
SWEEP_DOC = (
    "For each target T in order F16, BF16, F8_E4M3, F8_E5M2 (fields exp/mant bits, max finite pattern K): "
    "v(k) = value of T's positive pattern k (k = K+1 decoded as a normal number: the first value past max); "
    "for k = 0..K: v = f32bits(v(k)), m = f32bits((v(k)+v(k+1))/2) (exact); emit v, m-1, m, m+1, "
    "then the same four with the sign bit set."
)


def hash32(x):
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    x = x ^ (x >> np.uint32(16))
    return x


def counter(seed, count):
    i = np.arange(count, dtype=np.uint64)
    return ((np.uint64(seed) + i * np.uint64(GOLDEN_RATIO_32)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def random_inputs():
    return hash32(counter(RANDOM_SEED, RANDOM_COUNT))


def focused_inputs():
    h = hash32(counter(FOCUSED_SEED, FOCUSED_COUNT))
    exp = np.uint32(100) + ((h >> np.uint32(23)) & np.uint32(0xFF)) % np.uint32(51)
    return (h & np.uint32(0x807FFFFF)) | (exp << np.uint32(23))


def f32bits(x):
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def decode(fmt, k):
    ebits, mbits, _ = FORMATS[fmt]
    bias = (1 << (ebits - 1)) - 1
    e, m = k >> mbits, k & ((1 << mbits) - 1)
    if e == 0:
        return m * 2.0 ** (1 - bias - mbits)
    return (1 + m / 2.0**mbits) * 2.0 ** (e - bias)


def sweep_inputs():
    out = []
    for fmt in ("F16", "BF16", "F8_E4M3", "F8_E5M2"):
        top = FORMATS[fmt][2]
        vals = [decode(fmt, k) for k in range(top + 2)]
        for k in range(top + 1):
            v = f32bits(vals[k])
            mid = (vals[k] + vals[k + 1]) / 2
            m = f32bits(mid)
            assert float(np.float32(mid)) == mid, (fmt, k)
            four = [v, m - 1, m, m + 1]
            out += four + [x | 0x80000000 for x in four]
    return np.array(out, dtype=np.uint32)


def edge_inputs():
    """The explicit, hand-picked f32 edge cases (stored verbatim in the golden fixture)."""
    pos = [
        0x00000000, 0x00000001, 0x00000002, 0x007FFFFF, 0x00800000, 0x00800001, 0x7F7FFFFF, 0x7F7FFFFE,
        0x7F800000,
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # bf16 ties at 1.0: 1+2^-8 ties down, 1+3*2^-8 up
        0x3F801000, 0x3F803000, 0x3F801001, 0x3F800FFF,  # f16 ties at 1.0
        0x3F880000, 0x3F980000, 0x3F900000, 0x3FA00000, 0x3FB00000,  # fp8 ties at 1.0
        # F16: max 65504, 65504+ulp/2 = 65520 (tie to even → Inf), 65536, largest below the tie
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000, 0x477FFFFF,
        # F16 subnormal range: 2^-24 min subnormal, 2^-25 (tie → 0), max subnormal, min normal
        0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x387FC000, 0x38800000, 0x387FE000, 0x387FDFFF,
        # BF16: max, overflow tie, just below
        0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7EFFFF, 0x7F7E8000,
        # F8_E4M3: 448 max, 464 (tie between 448 and 480), 480 (first value past max), far overflow
        0x43E00000, 0x43E7FFFF, 0x43E80000, 0x43E80001, 0x43EFFFFF, 0x43F00000, 0x43F00001, 0x44000000,
        0x461C4000, 0x477FE000,
        # F8_E4M3 subnormals: 2^-9 min, 2^-10 (tie → 0), 7*2^-9 max subnormal, 2^-6 min normal
        0x3B000000, 0x3A800000, 0x3A800001, 0x3A7FFFFF, 0x3BE00000, 0x3C800000, 0x3C7FFFFF, 0x3C700000,
        # F8_E5M2: 57344 max, 61440 (tie → Inf), 65536
        0x47600000, 0x476FFFFF, 0x47700000, 0x47700001, 0x47800000, 0x47680000,
        # F8_E5M2 subnormals: 2^-16 min, 2^-17 tie, 3*2^-16 max subnormal, 2^-14 min normal
        0x37800000, 0x37000000, 0x37000001, 0x36FFFFFF, 0x38400000, 0x38800000, 0x387FFFFF, 0x38700000,
    ]
    # NaNs with various payloads (quiet and signalling, payload in the bits each target keeps or drops)
    pos += [
        0x7FC00000, 0x7FC00001, 0x7FE00000, 0x7FFFFFFF, 0x7F800001, 0x7F800002, 0x7FBFFFFF, 0x7FA00000,
        0x7F900000, 0x7F810000, 0x7F808000, 0x7F807FFF, 0x7F802000, 0x7F801FFF, 0x7FFF0000, 0x7FFFE000,
        0x7FC02000, 0x7FC10000, 0x7FD55555, 0x7FAAAAAA, 0x7F8FFFFF, 0x7F880000,
    ]
    # every power of two f32 can hold (normal and subnormal), and its neighbours
    for e in range(1, 255):
        p = e << 23
        pos += [p - 1, p, p + 1]
    for k in range(23):
        pos += [1 << k, (1 << k) + 1, (3 << k) & 0x7FFFFF]
    seen, out = set(), []
    for b in pos:
        for x in (b, b | 0x80000000):
            if x not in seen:
                seen.add(x)
                out.append(x)
    return np.array(out, dtype=np.uint32)


def f32_parts():
    return [("edges", edge_inputs()), ("sweeps", sweep_inputs()), ("random", random_inputs()), ("focused", focused_inputs())]


def inputs(src):
    if src == "F32":
        return np.concatenate([p for _, p in f32_parts()])
    size = DTYPES[src].itemsize
    return np.arange(1 << (8 * size), dtype=np.uint64).astype(NP_UINT[size])


def to_tensor(arr, dtype):
    return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).copy()).view(dtype)


def raw(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def cast(src, dst, x):
    """torch's cast of the input array x (numpy, bit patterns of src) to dst; returns bytes."""
    n = len(x)
    reps = max(1, -(-(1 << 20) // n))  # tile small sets: a big tensor, the vectorized path
    big = np.tile(x, reps)
    torch.set_num_threads(1)
    t = to_tensor(big, DTYPES[src])
    y = t.to(DTYPES[dst]) if src != dst else t.clone()
    out = raw(y)
    isz = DTYPES[dst].itemsize
    first = out[: n * isz]
    if out != first * reps:
        raise SystemExit(f"cast_tables: {src}->{dst} differs between tiles of the same input")
    # Same cast with the elements rotated and 2 threads: the result must follow the elements.
    shift = 7
    torch.set_num_threads(2)
    y2 = to_tensor(np.roll(big, shift), DTYPES[src]).to(DTYPES[dst])
    torch.set_num_threads(1)
    back = np.roll(np.frombuffer(raw(y2), dtype=NP_UINT[isz]), -shift).tobytes()
    if back != out:
        raise SystemExit(f"cast_tables: {src}->{dst} depends on position or thread count")
    return first


def parse_pairs(spec):
    if not spec:
        return [(a, b) for a in CASTABLE for b in CASTABLE]
    pairs = []
    for item in spec.split(","):
        a, b = item.split(":")
        if a not in DTYPES or b not in DTYPES:
            raise SystemExit(f"cast_tables: unknown dtype in {item!r}")
        pairs.append((a, b))
    return pairs


def sha(b):
    return hashlib.sha256(b).hexdigest()


def env_info():
    return {"torch": torch.__version__, "numpy": np.__version__, "cpuCapability": torch.backends.cpu.get_cpu_capability()}


def cmd_dump(argv):
    if not argv:
        raise SystemExit("usage: cast_tables.py dump DIR [--pairs A:B,...]")
    out_dir = argv[0]
    spec = argv[argv.index("--pairs") + 1] if "--pairs" in argv else None
    pairs = parse_pairs(spec)
    os.makedirs(out_dir, exist_ok=True)
    manifest = {**env_info(), "inputs": {}, "outputs": {}}
    cache = {}
    for a, b in pairs:
        if a not in cache:
            cache[a] = inputs(a)
            path = os.path.join(out_dir, f"in-{a}.bin")
            with open(path, "wb") as f:
                f.write(cache[a].tobytes())
            manifest["inputs"][a] = {"file": path, "count": len(cache[a])}
        path = os.path.join(out_dir, f"out-{a}-{b}.bin")
        with open(path, "wb") as f:
            f.write(cast(a, b, cache[a]))
        manifest["outputs"][f"{a}->{b}"] = {"file": path}
    json.dump(manifest, sys.stdout, indent=1)


def digests():
    res = {**env_info(), "inputs": {}, "outputs": {}}
    for a in CASTABLE:
        x = inputs(a)
        res["inputs"][a] = {"count": len(x), "sha256": sha(x.tobytes())}
        for b in CASTABLE:
            res["outputs"][f"{a}->{b}"] = sha(cast(a, b, x))
    return res


def golden():
    d = digests()
    parts = f32_parts()
    return {
        "generatedBy": (
            f"test/oracle/cast_tables.py golden --write (torch {d['torch']}, CPU capability {d['cpuCapability']}, "
            f"numpy {d['numpy']}); regenerate with: $(node scripts/oracle-venv.mjs) test/oracle/cast_tables.py golden --write"
        ),
        **d,
        "f32Inputs": {
            "order": [name for name, _ in parts],
            "counts": {name: len(p) for name, p in parts},
            "edges": [f"{int(x):08x}" for x in parts[0][1]],
            "sweeps": {"targets": ["F16", "BF16", "F8_E4M3", "F8_E5M2"], "doc": SWEEP_DOC},
            "random": {"generator": "lowbias32-counter", "seed": RANDOM_SEED, "count": RANDOM_COUNT, "step": GOLDEN_RATIO_32},
            "focused": {"generator": "lowbias32-counter-exp100-150", "seed": FOCUSED_SEED, "count": FOCUSED_COUNT, "step": GOLDEN_RATIO_32},
            "generatorDoc": GENERATOR_DOC,
        },
    }


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd, argv = sys.argv[1], sys.argv[2:]
    if cmd == "dump":
        cmd_dump(argv)
    elif cmd == "digests":
        json.dump(digests(), sys.stdout, indent=1)
    elif cmd == "golden":
        g = golden()
        text = json.dumps(g, indent=1) + "\n"
        if "--write" in argv:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "cast-golden.json")
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {os.path.normpath(path)}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
