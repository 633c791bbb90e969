"""`cfiw eval`: accuracy on GSM8K-format questions, greedy or with k samples (pass@k, maj@k).

`accuracy` is the share of correct completions (greedy: of questions). With `--samples k`,
`pass@k` is the share of questions with at least one correct sample and `maj@k` the share
whose most frequent extracted answer (ties: the earliest) is correct. Each comes with its 95%
Wilson interval; for `accuracy` with k > 1 the interval treats all samples as independent.
`mean@k` is the mean over questions of each question's share of correct samples (the sampled
reward), with its standard error over questions and the normal 95% interval from it: samples
of one question are not independent, so this is the interval to quote for a sampled reward.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

from cfiw_cli import distributed, modeling, schemas
from cfiw_cli.checks import sampling_questions
from cfiw_cli.configs import EvalConfig
from cfiw_cli.console import info
from cfiw_cli.samplers import sampler
from cfiw_cli.stage import StageResult, StageRun
from cfiw_cli.stats import Z_95, mean_and_standard_error, wilson_interval
from cfiw_cli.tasks.gsm8k import extract_answer, numbers_equal, reward


def accuracy_metrics(records: list[dict]) -> dict[str, Any]:
    by_question: dict[str, list[dict]] = {}
    for record in records:
        by_question.setdefault(record["prompt_id"], []).append(record)
    n_rows, n_questions = len(records), len(by_question)
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, n_rows)
    metrics: dict[str, Any] = {
        "n": n_rows,
        "questions": n_questions,
        "accuracy": correct / n_rows,
        "ci_low": low,
        "ci_high": high,
    }
    samples = max(len(v) for v in by_question.values())
    if samples > 1:
        passed = sum(any(r["correct"] for r in group) for group in by_question.values())
        majority = 0
        for group in by_question.values():
            votes = Counter(r["pred"] for r in group if r["pred"] is not None)
            if votes:
                top = max(votes.values())
                winner = next(r["pred"] for r in group if r["pred"] is not None and votes[r["pred"]] == top)
                majority += numbers_equal(winner, group[0]["gold"])
        for name, hits in ((f"pass@{samples}", passed), (f"maj@{samples}", majority)):
            lo, hi = wilson_interval(hits, n_questions)
            metrics.update({name: hits / n_questions, f"{name}_ci_low": lo, f"{name}_ci_high": hi})
        shares = [sum(r["correct"] for r in group) / len(group) for group in by_question.values()]
        mean, se = mean_and_standard_error(shares)
        name = f"mean@{samples}"
        metrics.update(
            {
                name: mean,
                f"{name}_se": se,
                f"{name}_ci_low": max(0.0, mean - Z_95 * se),
                f"{name}_ci_high": min(1.0, mean + Z_95 * se),
            }
        )
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    interval = f"95% CI {metrics['ci_low']:.3f}-{metrics['ci_high']:.3f}"
    text = f"accuracy {metrics['accuracy']:.3f} ({interval}, n={metrics['n']})"
    for key in sorted(
        k for k in metrics if k.startswith(("pass@", "maj@", "mean@")) and "_ci_" not in k and not k.endswith("_se")
    ):
        text += f", {key} {metrics[key]:.3f}"
    return text


def run(
    config: EvalConfig, force: bool = False, model: Any = None, tokenizer: Any = None, shard: bool = True
) -> StageResult:
    """`model`/`tokenizer`: an already loaded policy (the loop's); else loaded from `config.model`.
    Under `accelerate launch` the questions are split across the processes, unless `shard` is
    off: then this process evaluates them all, alone (a replay measures on its main process)."""
    with modeling.pinned_revisions():  # a hub id is resolved once, before the dataset loads
        rows = sampling_questions(config, model, config.samples, "--samples")
        inputs = {"model": config.model, "dataset": config.dataset}
        with StageRun("eval", config, inputs, force=force, revision=config.revision) as stage:
            if stage.up_to_date:
                return stage.skipped()
            return _evaluate(config, stage, rows, model, tokenizer, shard)


def _evaluate(
    config: EvalConfig, stage: StageRun, rows: list[dict], model: Any, tokenizer: Any, shard: bool
) -> StageResult:
    model, tokenizer, dev = modeling.policy(config.model, config.dtype, model, tokenizer, stage.commit)
    mine = distributed.my_share(rows) if shard else range(len(rows))  # under accelerate launch: a share each
    samples = sampler(config.backend, model, tokenizer).sample(
        [rows[i] for i in mine], config, config.seed, samples=config.samples, description="eval"
    )
    records = [
        {
            "prompt_id": s.row["prompt_id"],
            "sample_idx": s.sample_idx,
            "question": s.row["question"],
            "gold": s.row["gold"],
            "completion_text": s.text,
            "finish_reason": s.completion.finish_reason,
            "pred": extract_answer(s.text),
            "correct": reward(s.text, s.row["gold"]) == 1.0,
        }
        for s in samples
    ]
    if shard:
        order = {row["prompt_id"]: i for i, row in enumerate(rows)}
        records = distributed.gather_rows(records, order=lambda r: (order[r["prompt_id"]], r["sample_idx"]))
        if not distributed.is_main():
            distributed.finish()
            return StageResult(stage.out, False, {})
    metrics = accuracy_metrics(records)
    manifest = stage.manifest(
        rows=len(records), metrics=metrics, device=modeling.describe_device(dev), seed=config.seed,
        dtype=modeling.model_dtype(model),
    )  # fmt: skip
    result = stage.write_table(pa.Table.from_pylist(records, schema=schemas.EVAL), manifest)
    if shard:
        distributed.finish()
    info(f"wrote {len(records)} evaluations to {stage.out}")
    return result
