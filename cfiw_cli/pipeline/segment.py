"""`cfiw segment`: answer and reasoning spans of every rollout, aligned to its tokens."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from cfiw_cli.artifacts import (
    StageResult,
    build_manifest,
    input_record,
    prepare_output,
    read_artifact,
    settings_of,
    skip_if_done,
    write_table,
)
from cfiw_cli.configs import SegmentConfig
from cfiw_cli.console import info, progress_bar
from cfiw_cli.errors import CfiwError


def run(config: SegmentConfig, force: bool = False, tokenizer: Any = None) -> StageResult:
    import pyarrow as pa

    from cfiw_cli import modeling, schemas
    from cfiw_cli.algo.spans import find_spans

    if config.max_spans < 1 or config.min_tokens < 1 or config.max_tokens < config.min_tokens:
        raise CfiwError(
            "need --max-spans >= 1 and 1 <= --min-tokens <= --max-tokens",
            "e.g. --max-spans 10 --min-tokens 5 --max-tokens 50",
        )
    out = prepare_output(config.out)
    rollouts = read_artifact(config.rollouts, "rollouts")
    settings = settings_of(config)
    inputs = {"rollouts": input_record(config.rollouts), "model": input_record(config.model)}
    done = skip_if_done(out, "segment", settings, inputs, force)
    if done:
        return done

    started = time.perf_counter()
    tokenizer = tokenizer or modeling.load_tokenizer(config.model)
    ids = rollouts.column("completion_ids").to_pylist()
    largest = max((max(row) for row in ids if row), default=-1)
    if largest >= len(tokenizer):
        raise CfiwError(
            f"rollouts hold token id {largest}, but the tokenizer of {config.model} has {len(tokenizer)} tokens",
            "segment with the tokenizer of the model that produced the rollouts",
        )
    records = []
    with progress_bar("segment", total=rollouts.num_rows, unit="rollouts") as advance:
        for rollout_id, completion, reason in zip(
            rollouts.column("rollout_id").to_pylist(), ids, rollouts.column("finish_reason").to_pylist(), strict=True
        ):
            spans = find_spans(
                completion,
                tokenizer,
                max_spans=config.max_spans,
                min_tokens=config.min_tokens,
                max_tokens=config.max_tokens,
                ends_with_stop=reason == "stop",
            )
            for index, span in enumerate(spans):
                records.append({"rollout_id": rollout_id, "span_idx": index, **asdict(span)})
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
    seconds = time.perf_counter() - started
    write_table(
        table,
        out,
        build_manifest("segment", settings, inputs, rows=len(records), seconds=seconds, device="cpu", metrics=metrics),
    )
    info(
        f"wrote {metrics['spans']} reasoning spans ({counts['calculation']} calculation, {counts['numeric']} numeric, "
        f"{counts['scaffolding']} scaffolding) for {with_answer} of {rollouts.num_rows} rollouts to {out}"
    )
    return StageResult(out, False, metrics)
