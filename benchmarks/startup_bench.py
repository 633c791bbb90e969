"""Start-up: hashing a model directory the first time, and every time after.

Every stage records its inputs' sha256 in its manifest (and compares them to decide whether
an output is up to date). A file of 1 MiB or more is hashed once; its hash is recorded under
the cache directory and trusted while the file's size, mtime_ns and inode are unchanged.
This benchmark builds a random-init checkpoint of about 560 MB (one layer, hidden 896,
Qwen2.5's 151,936 embedding rows, float32) and times, each in a fresh process:

- the first hash (no record yet: the naive way, every time before records existed);
- the second hash (the record is read and trusted);
- `--rehash` (CFIW_REHASH=1: hashed afresh, as the first).

    python benchmarks/startup_bench.py            # median of 3 fresh processes each
    python benchmarks/startup_bench.py --quick    # a small checkpoint, for smoke tests
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TIMED = """
import sys, time
from cfiw_cli.artifacts import sha256_of
started = time.perf_counter()
digest = sha256_of(sys.argv[1])
print(time.perf_counter() - started, digest)
"""


def hash_in_fresh_process(model: Path, env: dict) -> tuple[float, str]:
    done = subprocess.run(
        [sys.executable, "-c", TIMED, str(model)], capture_output=True, text=True, env=env, check=True
    )
    seconds, digest = done.stdout.split()
    return float(seconds), digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 5 MB checkpoint, for smoke tests")
    args = parser.parse_args()

    from cfiw_cli.configs import TinyModelConfig
    from cfiw_cli.tools import tiny_model

    work = Path(tempfile.mkdtemp(prefix="cfiw-startup-bench-"))
    shape = {"layers": 1, "hidden": 896, "heads": 14, "kv_heads": 2, "intermediate": 4864, "pad_vocab": 151_936}
    if args.quick:
        shape = {"layers": 1, "hidden": 64, "pad_vocab": 20_000}
    model = tiny_model.run(TinyModelConfig(out=str(work / "model"), **shape)).path
    size = sum(p.stat().st_size for p in Path(model).rglob("*") if p.is_file())
    env = {**os.environ, "CFIW_CACHE_DIR": str(work / "cache"), "CFIW_REHASH": "0"}

    first, second, rehash, digests = [], [], [], set()
    for repeat in range(args.repeats):
        env["CFIW_CACHE_DIR"] = str(work / f"cache-{repeat}")  # no record yet
        for times, rehashing in ((first, "0"), (second, "0"), (rehash, "1")):
            seconds, digest = hash_in_fresh_process(Path(model), {**env, "CFIW_REHASH": rehashing})
            times.append(seconds)
            digests.add(digest)
    assert len(digests) == 1, "the recorded hash differs from a fresh one"
    print(f"checkpoint: {size / 1e6:.0f} MB in {model}; median of {args.repeats} fresh processes each")
    print(f"{'hash':>28} {'seconds':>9}")
    for name, times in (("first (no record: naive)", first), ("second (record trusted)", second),
                        ("--rehash", rehash)):  # fmt: skip
        print(f"{name:>28} {statistics.median(times):>9.3f}")
    print(f"ratio first / second: {statistics.median(first) / statistics.median(second):.0f}x")


if __name__ == "__main__":
    main()
