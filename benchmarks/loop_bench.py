"""`cfiw loop` (one process, model loaded once) against the same stages chained as separate
commands (`cfiw loop --dry-run | bash`), on the tiny preset; and where an iteration's time goes.

    python benchmarks/loop_bench.py              # 2 iterations
    python benchmarks/loop_bench.py --quick      # 1 iteration
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.iterations = 1

    from cfiw_cli.report.sql import query
    from cfiw_cli.tools import tiny_model

    work = Path(tempfile.mkdtemp(prefix="cfiw-loop-bench-"))
    model = tiny_model.run(
        tiny_model.TinyModelConfig(out=str(work / "model"), dataset=str(ROOT / "data/arith/train.jsonl"))
    ).path
    cfiw = str(Path(sys.executable).parent / "cfiw")
    # The preset's layout at small sizes (a random-init model, 8 questions x G=4, 48 new tokens,
    # 16 evaluation questions), so that the fixed costs this benchmark is about are visible.
    small = [
        "--eval-every",
        "1",
        "--set",
        "loop.questions=8",
        "--set",
        "rollout.group_size=4",
        "--set",
        "rollout.max_new_tokens=48",
        "--set",
        "loop.eval_limit=16",
        "--set",
        "loop.probe_questions=4",
        "--set",
        "loop.probe_samples=2",
    ]
    base = [cfiw, "loop", "--preset", "tiny", "--model", str(model), "--iterations", str(args.iterations), *small]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    started = time.perf_counter()
    subprocess.run(base + ["--run", str(work / "loop")], check=True, cwd=ROOT, capture_output=True)
    loop_seconds = time.perf_counter() - started
    commands = subprocess.run(
        base + ["--run", str(work / "staged"), "--dry-run"], check=True, cwd=ROOT, capture_output=True, text=True
    ).stdout
    started = time.perf_counter()
    subprocess.run(["bash", "-e"], input=commands, check=True, cwd=ROOT, capture_output=True, text=True, env=env)
    staged_seconds = time.perf_counter() - started

    print(
        f"tiny preset at small sizes, {args.iterations} iterations (each: rollout, segment, score, train, eval), "
        f"2-core CPU"
    )
    print(f"{'way':>8} {'total s':>8} {'s / iteration':>14}")
    for name, seconds in (("loop", loop_seconds), ("staged", staged_seconds)):
        print(f"{name:>8} {seconds:>8.1f} {seconds / args.iterations:>14.1f}")
    print(f"ratio staged / loop: {staged_seconds / loop_seconds:.2f}")
    columns, rows = query(
        work / "loop",
        "select stage, sum(cast(json_extract(manifest, '$.wall_seconds') as double)) as s from manifests where "
        "file not like '%weights.parquet' group by stage order by s desc",
    )
    total = sum(r[1] for r in rows)
    print("share of the loop's stage time (from the manifests' wall_seconds):")
    for stage, seconds in rows:
        print(f"  {stage:>8} {seconds:6.2f} s  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
