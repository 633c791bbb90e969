"""`cfiw rollout`: G sampled completions per GSM8K question, with per-token log-probs and rewards."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from cfiw_cli import distributed, guard, modeling, schemas
from cfiw_cli.checks import sampling_questions
from cfiw_cli.configs import RolloutConfig
from cfiw_cli.console import info
from cfiw_cli.samplers import sampler
from cfiw_cli.stage import StageResult, StageRun
from cfiw_cli.tasks.gsm8k import extract_answer, reward


def sampling_seed(seed: int, iteration: int) -> int:
    """Different iterations of one run draw different samples from the same --seed."""
    return (seed * 1_000_003 + iteration * 10_007) % (2**31)


def run(config: RolloutConfig, force: bool = False, model: Any = None, tokenizer: Any = None) -> StageResult:
    """`model`/`tokenizer`: an already loaded policy (the loop's); else loaded from `config.model`."""
    with modeling.pinned_revisions():  # a hub id is resolved once, before the dataset loads
        rows = sampling_questions(config, model, config.group_size, "--group-size")
        inputs = {"model": config.model, "dataset": config.dataset}
        with StageRun("rollout", config, inputs, force=force, revision=config.revision) as stage:
            if stage.up_to_date:
                return stage.skipped()
            return _sample(config, stage, rows, model, tokenizer)


def _sample(config: RolloutConfig, stage: StageRun, rows: list[dict], model: Any, tokenizer: Any) -> StageResult:
    model, tokenizer, dev = modeling.policy(config.model, config.dtype, model, tokenizer, stage.commit)
    mine = distributed.my_share(rows)  # under accelerate launch, each process samples its share
    samples = sampler(config.backend, model, tokenizer).sample(
        [rows[i] for i in mine],
        config,
        sampling_seed(config.seed, config.iteration),  # each sequence's stream: this, its question and index
        samples=config.group_size,
        description=f"rollout iter {config.iteration}",
    )
    records = []
    order = {row["prompt_id"]: i for i, row in enumerate(rows)}
    for sample in samples:
        row, completion = sample.row, sample.completion
        pred = extract_answer(sample.text)
        score = reward(sample.text, row["gold"])
        records.append(
            {
                "rollout_id": f"{config.iteration}:{row['prompt_id']}:{sample.sample_idx}",
                "iteration": config.iteration,
                "prompt_id": row["prompt_id"],
                "sample_idx": sample.sample_idx,
                "question": row["question"],
                "gold": row["gold"],
                "prompt_text": sample.prompt_text,
                "completion_text": sample.text,
                "prompt_ids": sample.prompt_ids,
                "completion_ids": completion.ids,
                "completion_logprobs": completion.logprobs,
                "finish_reason": completion.finish_reason,
                "pred": pred,
                "reward": score,
                "correct": score == 1.0,
                **({"labels": row["labels"]} if "labels" in row else {}),
            }
        )
    records = distributed.gather_rows(records, order=lambda r: (order[r["prompt_id"]], r["sample_idx"]))
    guard.check_sampled(records)  # every process holds every row now: all stop, or none
    if not distributed.is_main():
        distributed.finish()
        return StageResult(stage.out, False, {})
    table = pa.Table.from_pylist(records, schema=schemas.ROLLOUTS)
    if "labels" in records[0]:  # ground-truth sentence labels of a `cfiw synth` dataset, for analyze
        table = table.append_column("labels", pa.array([r["labels"] for r in records]))
    seconds = stage.seconds
    tokens = sum(len(r["completion_ids"]) for r in records)
    metrics = {
        "prompts": len(rows),
        "rollouts": len(records),
        "mean_reward": sum(r["reward"] for r in records) / len(records),
        "completion_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "stop_fraction": sum(r["finish_reason"] == "stop" for r in records) / len(records),
        "processes": distributed.processes(),
    }
    manifest = stage.manifest(
        rows=len(records), metrics=metrics, device=modeling.describe_device(dev), seed=config.seed,
        dtype=modeling.model_dtype(model),
    )  # fmt: skip
    result = stage.write_table(table, manifest)
    distributed.finish()
    info(
        f"wrote {len(records)} rollouts ({len(rows)} questions x {config.group_size}) to {stage.out}: "
        f"mean reward {metrics['mean_reward']:.3f}, {tokens} tokens in {seconds:.1f}s"
    )
    return result
