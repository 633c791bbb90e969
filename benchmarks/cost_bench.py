"""CFIW's cost per iteration: the tiny preset's loop with its segment and score stages (as the
preset scores: only groups with unequal rewards; and with `score.groups = "all"`), against the
uniform baseline without them (`cfiw loop --weighting uniform --no-score`), from the same warm
policy.

Per run it reads each stage's seconds from the manifests (rollout, segment, score, train; the
evaluations are left out, as they are no part of an iteration) and prints the mean seconds per
iteration, CFIW's share of a training iteration, (segment + score) / (rollout + segment +
score + train), and the ratio of the two runs' iteration times.

    python benchmarks/cost_bench.py                       # the tiny preset, 4 iterations
    python benchmarks/cost_bench.py --model runs/tiny-sft # an existing warm start (else built here)
    python benchmarks/cost_bench.py --quick               # random init, small sizes: a smoke test
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("rollout", "segment", "score", "train")


def cfiw(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "cfiw"), *args], check=True, cwd=ROOT, capture_output=True)


def warm_policy(work: Path, steps: int) -> str:
    """The tiny preset's warm start, as `just tiny-sft` builds it."""
    base, policy = work / "sft-base", work / "sft"
    cfiw("tiny-model", "--out", str(base), "--dataset", "data/arith/train.jsonl", "--layers", "4", "--hidden", "128")
    cfiw("sft", "--model", str(base), "--dataset", "data/arith", "--split", "sft", "--out", str(policy),
         "--steps", str(steps), "--lr", "3e-3", "--batch-size", "16")  # fmt: skip
    return str(policy)


def stage_seconds(run: Path) -> dict[str, float]:
    from cfiw_cli.report.sql import query

    _, rows = query(
        run,
        "select stage, sum(cast(json_extract(manifest, '$.wall_seconds') as double)) from manifests "
        "where file like '%/iter-%/%' and file not like '%weights.parquet' group by stage",
    )
    return {stage: seconds for stage, seconds in rows}


def scored_rollouts(run: Path) -> tuple[int, int]:
    """Rollouts scored (those with reasoning spans and an answer, in the groups scored) and
    rollouts sampled, over the run's iterations."""
    from cfiw_cli.report.sql import query

    _, rows = query(
        run,
        "select sum(cast(json_extract(manifest, '$.metrics.rollouts') as integer)) filter (where stage = 'score'), "
        "sum(cast(json_extract(manifest, '$.rows') as integer)) filter (where stage = 'rollout') "
        "from manifests where file like '%/iter-%/%'",
    )
    scored, sampled = rows[0]
    return scored or 0, sampled or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--model", help="the warm policy (default: built with --sft-steps SFT steps)")
    parser.add_argument("--sft-steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="random init, 1 iteration of 8 questions x G=4")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cfiw-cost-bench-"))
    sizes = ["--set", "loop.probe_questions=0", "--set", "loop.eval_limit=4", "--set", "loop.keep_policies=0"]
    if args.quick:
        args.iterations = 1
        cfiw("tiny-model", "--out", str(work / "model"), "--dataset", "data/arith/train.jsonl")
        model = str(work / "model")
        sizes += ["--set", "loop.questions=8", "--set", "rollout.group_size=4", "--set", "rollout.max_new_tokens=48"]
    else:
        model = args.model or warm_policy(work, args.sft_steps)
    common = ["loop", "--preset", "tiny", "--model", model, "--iterations", str(args.iterations), *sizes]
    runs = {
        "cfiw (preset)": (work / "cfiw", []),
        "cfiw, groups all": (work / "cfiw-all", ["--set", "score.groups=all"]),
        "uniform --no-score": (work / "uniform", ["--weighting", "uniform", "--no-score"]),
    }
    for run, extra in runs.values():
        cfiw(*common, "--run", str(run), *extra)

    print(f"tiny preset, {args.iterations} iterations, policy {model}; mean stage seconds per iteration")
    print(
        f"{'run':>20} " + " ".join(f"{s:>8}" for s in STAGES)
        + f" {'iteration':>10} {'CFIW share':>11} {'scored rollouts':>16}"
    )  # fmt: skip
    totals = {}
    for name, (run, _) in runs.items():
        found = stage_seconds(run)
        per = {s: found.get(s, 0.0) / args.iterations for s in STAGES}
        totals[name] = sum(per.values())
        share = (per["segment"] + per["score"]) / totals[name]
        scored, sampled = scored_rollouts(run)
        counted = f"{scored}/{sampled}"
        print(
            f"{name:>20} " + " ".join(f"{per[s]:>8.2f}" for s in STAGES)
            + f" {totals[name]:>10.2f} {share:>10.1%} {counted:>16}"
        )  # fmt: skip
    for name in ("cfiw (preset)", "cfiw, groups all"):
        print(
            f"ratio {name} iteration / uniform --no-score iteration: {totals[name] / totals['uniform --no-score']:.3f}"
        )


if __name__ == "__main__":
    main()
