"""`cfiw segment`: answer and reasoning spans of every rollout, aligned to its tokens.

`--profile cfiw` cuts spans as `cfiw_cli.algo.spans` states; `--profile authors` as the
authors' trainer does (`cfiw_cli.algo.authors`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pyarrow as pa

from cfiw_cli import modeling, schemas
from cfiw_cli.algo.authors import authors_spans
from cfiw_cli.algo.spans import find_spans
from cfiw_cli.artifacts import read_artifact
from cfiw_cli.checks import require_rollouts
from cfiw_cli.configs import SegmentConfig
from cfiw_cli.console import info, progress_bar
from cfiw_cli.stage import StageResult, StageRun


def spans_of(completion: list[int], tokenizer: Any, config: SegmentConfig, ends_with_stop: bool) -> list[Any]:
    """One completion's spans under the config's profile (the authors' detector, or cfiw's)."""
    detector = authors_spans if config.profile == "authors" else find_spans
    return detector(
        completion,
        tokenizer,
        max_spans=config.max_spans,
        min_tokens=config.min_tokens,
        max_tokens=config.max_tokens,
        ends_with_stop=ends_with_stop,
    )


def run(config: SegmentConfig, force: bool = False, tokenizer: Any = None) -> StageResult:
    rollouts = read_artifact(config.rollouts, "rollouts")
    require_rollouts(rollouts, config.rollouts)
    inputs = {"rollouts": config.rollouts, "model": config.model}
    with StageRun("segment", config, inputs, force=force, revision=config.revision) as stage:
        if stage.up_to_date:
            return stage.skipped()
        return _segment(config, stage, rollouts, tokenizer or modeling.load_tokenizer(config.model, stage.commit))


def _segment(config: SegmentConfig, stage: StageRun, rollouts: pa.Table, tokenizer: Any) -> StageResult:
    ids = rollouts.column("completion_ids").to_pylist()
    modeling.check_token_ids(
        ids,
        len(tokenizer),
        f"rollouts hold token id {{largest}}, but the tokenizer of {config.model} has {{size}} tokens",
        "segment with the tokenizer of the model that produced the rollouts",
    )
    records = []
    found: dict[tuple, list[dict]] = {}  # a group's samples often write the same completion: cut it once
    with progress_bar("segment", total=rollouts.num_rows, unit="rollouts") as advance:
        for rollout_id, completion, reason in zip(
            rollouts.column("rollout_id").to_pylist(), ids, rollouts.column("finish_reason").to_pylist(), strict=True
        ):
            key = (tuple(completion), reason == "stop")
            if key not in found:
                found[key] = [asdict(span) for span in spans_of(completion, tokenizer, config, ends_with_stop=key[1])]
            for index, span in enumerate(found[key]):
                records.append({"rollout_id": rollout_id, "span_idx": index, **span})
            advance()
    table = pa.Table.from_pylist(records, schema=schemas.SPANS)
    with_answer = len({r["rollout_id"] for r in records})
    counts = {kind: sum(r["kind"] == kind for r in records) for kind in ("calculation", "numeric", "scaffolding")}
    metrics = {
        "rollouts": rollouts.num_rows,
        "rollouts_with_answer": with_answer,
        "spans": len(records) - with_answer,
        **counts,
    }
    result = stage.write_table(table, stage.manifest(rows=len(records), metrics=metrics, device="cpu"))
    info(
        f"wrote {metrics['spans']} reasoning spans ({counts['calculation']} calculation, {counts['numeric']} numeric, "
        f"{counts['scaffolding']} scaffolding) for {with_answer} of {rollouts.num_rows} rollouts to {stage.out}"
    )
    return result
