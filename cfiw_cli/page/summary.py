"""The answer first: what a report's tables say, in a few lines a researcher can paste.

Per run: the probe reward first -> last with the 95% interval of its gain (paired by
question), greedy accuracy first -> last, optimizer steps, the stages' seconds, and where the
token weight went by span kind. Over several runs, each comparison the tables hold (the
modes' compare paired by seed, the paired replay, the gradient measurement) as mode - uniform
with its 95% interval, and one sentence saying whether any interval excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cfiw_cli.artifacts import read_manifest
from cfiw_cli.runs import EVALUATION_KINDS, RunLayout

# the files whose manifests hold each stage's seconds once (weights.parquet repeats train's)
TIMED_KINDS = ("rollouts", "spans", "scores", "train_metrics")


@dataclass
class Summary:
    lines: list[str] = field(default_factory=list)  # one sentence per run or comparison
    comparisons: list[tuple[str, list[dict]]] = field(default_factory=list)  # (title, rows: label, mean, low, high)


def stage_seconds(run: Path) -> float:
    """The run's stages' wall seconds, summed over the manifests of its iteration and evaluation files."""
    layout = RunLayout(run)
    files = [p for kind in TIMED_KINDS for p in run.glob(f"iter-*/{kind}.parquet")]
    files += [p for kind in EVALUATION_KINDS for p in (layout.root / kind).glob("iter-*.parquet")]
    return sum(float((read_manifest(p) or {}).get("wall_seconds") or 0.0) for p in files)


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _run_line(run: str, results: dict[str, list[dict]], seconds: float) -> str:
    parts = []
    probe = next((r for r in results.get("probe_runs", []) if r["run"] == run), None)
    mode = probe["mode"] if probe else None
    if probe:
        gain = probe["gain"]
        half = 1.959963984540054 * (probe["gain_se"] or 0.0)
        parts.append(
            f"probe reward {_number(probe['first_reward'])} -> {_number(probe['final_reward'])} "
            f"(gain {gain:+.3f} ± {half:.3f}, 95% paired by question)"
        )
    accuracy = [r for r in results.get("accuracy", []) if r["run"] == run]
    if accuracy:
        mode = mode or accuracy[0]["mode"]
        parts.append(f"greedy accuracy {_number(accuracy[0]['accuracy'])} -> {_number(accuracy[-1]['accuracy'])}")
    steps = (probe or {}).get("steps") or (accuracy[-1]["step"] if accuracy else None)
    if steps is not None:
        parts.append(f"{int(steps)} optimizer steps")
    if seconds:
        parts.append(f"{seconds:,.0f} s of stage time")
    shares = [r for r in results.get("weight_by_kind", []) if r["run"] == run and r["share"] is not None]
    if shares:
        mode = mode or shares[0]["mode"]
        top = sorted(shares, key=lambda r: -r["share"])
        parts.append("token weight by span kind: " + ", ".join(f"{r['kind']} {r['share']:.0%}" for r in top))
    return f"**{run}** ({mode or 'unknown mode'}): " + "; ".join(parts) + "." if parts else ""


def _rows(title: str, rows: list[dict], label: Callable[[dict], str]) -> tuple[str, list[dict]] | None:
    kept = [
        {"comparison": label(r), "metric": r.get("metric", ""), "n": r.get("seeds") or r.get("pairs"), **_ends(r)}
        for r in rows
    ]
    return (title, kept) if kept else None


def _ends(row: dict) -> dict:
    return {"mean": row["mean_difference"], "ci_low": row["ci_low"], "ci_high": row["ci_high"]}


def comparisons(results: dict[str, list[dict]]) -> list[tuple[str, list[dict]]]:
    """Every mode - uniform table the results hold, as (title, rows)."""
    found = []
    if results.get("paired_differences"):
        compare = results["paired_differences"]
        found.append(_rows("Compare: each mode minus uniform, paired by seed", compare, lambda r: r["mode"]))
    if results.get("replay_summary"):
        found.append(
            _rows(
                "Paired replay: each mode's update minus uniform's",
                results["replay_summary"],
                lambda r: r["difference"],
            )
        )
    aligned = [r for r in results.get("gradient_differences", []) if r["metric"] == "aligned"]
    if aligned:  # named by dial point, without writing into the results' rows
        name = lambda r: f"{Path(r['dataset']).name or 'dataset'}: {r['difference']}"  # noqa: E731
        found.append(_rows("Gradient alignment: each mode minus uniform", aligned, name))
    return [f for f in found if f]


def verdict(tables_: list[tuple[str, list[dict]]]) -> str:
    """One sentence: which differences have a 95% interval that excludes zero, if any."""
    every = [r for _, rows in tables_ for r in rows]
    rows = [
        (title, r) for title, rows in tables_ for r in rows if r["ci_low"] is not None and r["ci_low"] == r["ci_low"]
    ]
    separated = [(t, r) for t, r in rows if r["ci_low"] > 0 or r["ci_high"] < 0]
    if every and not rows:
        return "No interval could be computed: every comparison rests on a single seed or pair."
    if not rows:
        return ""
    if not separated:
        return f"No interval excludes zero: none of the {len(rows)} differences from uniform is resolved."
    named = ", ".join(f"{r['comparison']} ({r['metric']}, {r['mean']:+.3f})".replace(" ()", "") for _, r in separated)
    return f"{len(separated)} of {len(rows)} intervals exclude zero: {named}."


def summarize(results: dict[str, list[dict]], runs: dict[str, Path]) -> Summary:
    summary = Summary()
    for label, run in runs.items():
        line = _run_line(label, results, stage_seconds(run))
        if line:
            summary.lines.append(line)
    summary.comparisons = comparisons(results)
    sentence = verdict(summary.comparisons)
    if sentence:
        summary.lines.append(sentence)
    return summary
