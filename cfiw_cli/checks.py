"""Input checks that more than one stage makes, kept below the stages so that no stage imports
a sibling: sampling settings and questions (rollout, eval), the manifest chain rollouts -> spans -> scores
(score, train) and finite rewards and log-probs."""

from __future__ import annotations

import math
from typing import Any

from cfiw_cli import memory, modeling
from cfiw_cli.artifacts import input_record, read_manifest
from cfiw_cli.errors import CfiwError
from cfiw_cli.tasks.gsm8k import load_questions


def sampling_questions(config: Any, model: Any, samples: int, samples_flag: str) -> list[dict]:
    """The questions a sampling stage (rollout, eval) draws from, after what needs no model
    loaded: a local model exists and a hub id resolves (both before the dataset loads), and,
    when the stage loads the model itself, the sampling fits in memory. Call it inside
    `modeling.pinned_revisions()`, so that the stage loads the commit resolved here."""
    if model is None:
        modeling.check_model_ref(config.model)
        modeling.resolve_revision(config.model, config.revision)
    rows = load_questions(config.dataset, config.split, config.offset, config.limit)
    if model is None:
        memory.check_stage_fits(config, rows, samples, memory.flags(samples_flag))
    return rows


def check_spans_match(rollouts: Any, spans: Any, rollouts_path: str, spans_path: str) -> None:
    """Spans must come from these rollouts: same file hash when the manifest says, and in any
    case known rollout ids and token ranges inside each completion."""
    manifest = read_manifest(spans_path) or {}
    recorded = manifest.get("inputs", {}).get("rollouts", {}).get("sha256")
    hint = f"run `cfiw segment --rollouts {rollouts_path}` again, or pass the rollouts the spans were made from"
    if recorded and recorded != input_record(rollouts_path)["sha256"]:
        raise CfiwError(f"{spans_path} was computed from a different rollouts file than {rollouts_path}", hint)
    lengths = dict(
        zip(
            rollouts.column("rollout_id").to_pylist(),
            (len(c) for c in rollouts.column("completion_ids").to_pylist()),
            strict=True,
        )
    )
    for rollout_id, start, end in zip(
        *(spans.column(c).to_pylist() for c in ("rollout_id", "tok_start", "tok_end")), strict=True
    ):
        if rollout_id not in lengths:
            raise CfiwError(f"{spans_path} has spans of rollout {rollout_id!r}, which is not in {rollouts_path}", hint)
        if not 0 <= start < end <= lengths[rollout_id]:
            raise CfiwError(f"span [{start}, {end}) of rollout {rollout_id!r} lies outside its completion", hint)


def check_scores_match(scores_path: str, spans_path: str, rollouts_path: str) -> None:
    """Scores must come from these spans and these rollouts, when their manifest says which:
    a score of one span applied to another span with the same index would be silent nonsense."""
    manifest = read_manifest(scores_path) or {}
    recorded = manifest.get("inputs", {})
    for name, path in (("spans", spans_path), ("rollouts", rollouts_path)):
        expected = (recorded.get(name) or {}).get("sha256")
        if expected and expected != input_record(path)["sha256"]:
            raise CfiwError(
                f"{scores_path} was computed from a different {name} file than {path}",
                f"run `cfiw score` again on {spans_path}, or pass the {name} the scores were made from",
            )


def check_finite_rollouts(rollouts: Any, path: str) -> None:
    """Rewards and sampled log-probs must be finite numbers (NaN would poison every gradient)."""
    ids = rollouts.column("rollout_id").to_pylist()
    for rollout_id, reward in zip(ids, rollouts.column("reward").to_pylist(), strict=True):
        if not math.isfinite(reward):
            raise CfiwError(f"rollout {rollout_id!r} in {path} has reward {reward}", "rewards must be finite numbers")
    for rollout_id, logprobs in zip(ids, rollouts.column("completion_logprobs").to_pylist(), strict=True):
        if not all(value is not None and math.isfinite(value) for value in logprobs):
            raise CfiwError(
                f"rollout {rollout_id!r} in {path} has a non-finite completion log-prob",
                "sample the rollouts again (log-probs must be finite numbers)",
            )


def require_rollouts(rollouts: Any, path: str) -> None:
    """Every stage that reads rollouts needs at least one."""
    if rollouts.num_rows == 0:
        raise CfiwError(f"{path} holds no rollouts", "sample some with cfiw rollout")
