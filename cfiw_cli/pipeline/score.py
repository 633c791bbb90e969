"""`cfiw score`: base and masked answer log-probs, and their difference, for every span."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from cfiw_cli import distributed, modeling, schemas
from cfiw_cli.algo.importance import ScoringItem, score_items
from cfiw_cli.algo.loss import equal_reward_groups
from cfiw_cli.artifacts import read_artifact
from cfiw_cli.checks import check_spans_match, require_rollouts
from cfiw_cli.configs import ScoreConfig
from cfiw_cli.console import info, progress_bar
from cfiw_cli.errors import CfiwError
from cfiw_cli.stage import StageResult, StageRun
from cfiw_cli.tasks.gsm8k import locate_answer


def gold_target(answer_text: str, gold: str, tokenizer: Any) -> list[int]:
    """The answer span's text with its number replaced by the gold number, tokenized."""
    match = locate_answer(answer_text)
    text = answer_text[: match.number_start] + gold + answer_text[match.number_end :] if match else answer_text
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_items(
    rollouts: Any, spans: Any, target: str, tokenizer: Any, profile: str = "cfiw"
) -> tuple[list[str], list[list[int]], list[Any]]:
    """One scoring item per rollout that has an answer span: (rollout ids, span indices, items).

    Profile `cfiw` scores exactly the answer span's tokens. Profile `authors` scores what
    their trainer does: positions reasoning_end + 1 .. seq_len - 1 of the rollout, that is
    every completion token after the answer's first one, EOS included (their batch's right
    padding too, which a rollout read alone does not have); a rollout with nothing after
    the answer's first token is not scored."""
    by_rollout: dict[str, list[dict]] = {}
    for span in spans.select(["rollout_id", "span_idx", "kind", "tok_start", "tok_end", "text"]).to_pylist():
        by_rollout.setdefault(span["rollout_id"], []).append(span)
    ids, span_indices, items = [], [], []
    for rollout in rollouts.select(["rollout_id", "prompt_ids", "completion_ids", "gold"]).to_pylist():
        rollout_spans = sorted(by_rollout.get(rollout["rollout_id"], []), key=lambda s: s["tok_start"])
        answers = [s for s in rollout_spans if s["kind"] == "answer"]
        reasoning = [s for s in rollout_spans if s["kind"] != "answer"]
        if not answers or not reasoning:
            continue
        answer, prompt = answers[0], rollout["prompt_ids"]
        completion = rollout["completion_ids"]
        answer_ids = completion[answer["tok_start"] : answer["tok_end"]]
        if target == "gold":
            answer_ids = gold_target(answer["text"], rollout["gold"], tokenizer)
        offset = len(prompt)
        if profile == "authors":
            tokens, target_start = prompt + completion, offset + answer["tok_start"] + 1
            if target_start >= len(tokens):
                continue
        else:
            tokens, target_start = prompt + completion[: answer["tok_start"]] + answer_ids, offset + answer["tok_start"]
        items.append(
            ScoringItem(
                tokens=tokens,
                target_start=target_start,
                spans=[(offset + s["tok_start"], offset + s["tok_end"]) for s in reasoning],
                prompt_length=len(prompt),
            )
        )
        ids.append(rollout["rollout_id"])
        span_indices.append([s["span_idx"] for s in reasoning])
    return ids, span_indices, items


def mixed_groups(rollouts: pa.Table) -> pa.Table:
    """The rollouts of groups whose rewards differ: the only ones train learns from when its
    dynamic sampling drops the groups with equal rewards."""
    prompt_ids = rollouts.column("prompt_id").to_pylist()
    flat = equal_reward_groups(rollouts.column("reward").to_pylist(), prompt_ids)
    return rollouts.filter(pa.array([prompt_id not in flat for prompt_id in prompt_ids], pa.bool_()))


def score_row(rollout_id: str, span_idx: int, base: float, masked: float, mask: str, target: str) -> dict:
    """One scores.parquet row: a span's answer log-prob with it and without it, and their difference."""
    return {
        "rollout_id": rollout_id,
        "span_idx": span_idx,
        "mask": mask,
        "base_logp": base,
        "masked_logp": masked,
        "delta": base - masked,
        "target": target,
    }


def run(config: ScoreConfig, force: bool = False, model: Any = None, tokenizer: Any = None) -> StageResult:
    """`model`/`tokenizer`: an already loaded policy (the loop's); else loaded from `config.model`."""
    rollouts = read_artifact(config.rollouts, "rollouts")
    require_rollouts(rollouts, config.rollouts)
    spans = read_artifact(config.spans, "spans")
    check_spans_match(rollouts, spans, config.rollouts, config.spans)
    inputs = {"model": config.model, "rollouts": config.rollouts, "spans": config.spans}
    with StageRun("score", config, inputs, force=force, revision=config.revision) as stage:
        if stage.up_to_date:
            return stage.skipped()
        return _score(config, stage, rollouts, spans, model, tokenizer)


def _score(
    config: ScoreConfig, stage: StageRun, rollouts: pa.Table, spans: pa.Table, model: Any, tokenizer: Any
) -> StageResult:
    model, tokenizer, dev = modeling.policy(config.model, config.dtype, model, tokenizer, stage.commit)
    modeling.check_vocabulary(
        model,
        rollouts.column("prompt_ids").to_pylist() + rollouts.column("completion_ids").to_pylist(),
        config.rollouts,
    )
    unscored = 0
    if config.groups == "mixed":
        scored = mixed_groups(rollouts)
        unscored, rollouts = len(rollouts) - len(scored), scored
    rollout_ids, span_indices, items = build_items(rollouts, spans, config.target, tokenizer, config.profile)
    if not items:  # e.g. a policy that has stopped writing reasoning: every rollout will weigh as in uniform
        which = "of a group with unequal rewards " if config.groups == "mixed" else ""
        info(
            f"Warning: no rollout {which}in {config.spans} has both reasoning spans and an answer: nothing to "
            f"score, the scores file is empty"
        )
    mine = distributed.my_share(items)
    with progress_bar(f"score ({config.mask})", total=len(mine), unit="rollouts") as advance:
        scores = score_items(
            model,
            [items[i] for i in mine],
            config.mask,
            tokenizer.pad_token_id,
            batch_tokens=config.batch_tokens,
            on_items=advance,
        )
    records = []
    for i, result in zip(mine, scores, strict=True):
        for position, (span_idx, masked) in enumerate(zip(span_indices[i], result.masked, strict=True)):
            row = score_row(rollout_ids[i], span_idx, result.base, masked, config.mask, config.target)
            records.append({**row, "order": (i, position)})
    records = distributed.gather_rows(records, order=lambda r: r["order"])
    bad = [r for r in records if not all(map(math.isfinite, (r["base_logp"], r["masked_logp"])))]
    if bad:
        raise CfiwError(
            f"non-finite log-prob for rollout {bad[0]['rollout_id']} span {bad[0]['span_idx']}",
            "score in float32 (--dtype float32)",
        )
    if not distributed.is_main():
        distributed.finish()
        return StageResult(stage.out, False, {})
    for record in records:
        del record["order"]
    table = pa.Table.from_pylist(records, schema=schemas.SCORES_WRITTEN)
    seconds = stage.seconds
    tokens = sum(len(item.tokens) for item in items)
    metrics = {
        "rollouts": len(items),
        "spans": len(records),
        "tokens": tokens,
        "processes": distributed.processes(),
        "unscored_equal_reward_rollouts": unscored,
        "mean_delta": sum(r["delta"] for r in records) / len(records) if records else None,
    }
    device, dtype = modeling.describe_device(dev), modeling.model_dtype(model)
    manifest = stage.manifest(rows=len(records), metrics=metrics, device=device, dtype=dtype)
    result = stage.write_table(table, manifest)
    distributed.finish()
    skipped = f" ({unscored} rollouts of groups with equal rewards left unscored)" if unscored else ""
    info(
        f"wrote {len(records)} span scores ({config.mask}, {config.target} target, {config.profile} profile) for "
        f"{len(items)} rollouts{skipped} to {stage.out} in {seconds:.1f}s"
    )
    return result
