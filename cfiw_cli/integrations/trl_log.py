"""The batches a `CFIWGRPOTrainer` weighed, written as a run's iterations.

Generated batch n (counted from 0 in each trainer, evaluation batches left out) becomes
`LOG_DIR/iter-NNNN/` with the stages' files in their schemas:

- `rollouts.parquet`: every process's rows (ids `n:process:row`, groups `n:process:group`),
  with TRL's reward (the weighted sum of its reward functions), the prompt and completion
  decoded with the tokenizer, the question (the dataset's `question` column, else the prompt),
  the gold answer (its `gold` or `answer` column, else empty), `pred` (the last number of the
  completion, as cfiw's GSM8K reward reads it) and `correct` (pred equals gold; without a gold
  answer, reward > 0). `completion_logprobs` are the sampler's when TRL has them (vLLM or
  continuous batching with their log-probs, or `old_per_token_logps`), else computed once
  here at TRL's temperature: the log-probs of the policy that sampled.
- `spans.parquet`, `scores.parquet` (modes that read scores), `weights.parquet`: what
  segment, score and train would write for these rollouts; `advantage` is TRL's, before the
  weights multiply it.

The main process writes, after gathering the other processes' rows; each file carries a
manifest (stage `trl-train`, the CFIW and TRL settings). `cfiw validate`, `cfiw sql LOG_DIR`
and `cfiw analyze LOG_DIR` read them as they read a run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from cfiw_cli.algo.weights import SCORED_MODES
from cfiw_cli.artifacts import build_manifest, write_table
from cfiw_cli.errors import CfiwError
from cfiw_cli.logprobs import completion_logprobs
from cfiw_cli.runs import iteration_name, iteration_of
from cfiw_cli.schemas import ROLLOUTS, SCORES_WRITTEN, SPANS, WEIGHTS_WRITTEN
from cfiw_cli.tasks.gsm8k import extract_answer, numbers_equal

SCHEMAS = {"rollouts": ROLLOUTS, "spans": SPANS, "scores": SCORES_WRITTEN, "weights": WEIGHTS_WRITTEN}


def check_empty(log_dir: str) -> None:
    """A log directory holds no logged batch yet: earlier batches are never overwritten."""
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise CfiwError(f"log_dir {log_dir} is a file", "pass a directory for the logged batches")
    taken = sorted(p.name for p in path.glob("iter-*") if iteration_of(p.name) is not None) if path.is_dir() else []
    if taken:
        raise CfiwError(
            f"log_dir {log_dir} already holds logged batches ({taken[0]} ...)",
            "choose a new log_dir, or move the old batches away",
        )


def _question(row: dict[str, Any]) -> str:
    if row.get("question") is not None:
        return str(row["question"])
    prompt = row.get("prompt")
    if isinstance(prompt, list):  # conversational: the last user message
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return "" if prompt is None else str(prompt)


def _sampled_logprobs(trainer: Any, output: dict[str, Any], rollouts: pa.Table) -> list[list[float]]:
    """Each completion's per-token log-probs under the policy that sampled it."""
    lengths = [len(c) for c in rollouts.column("completion_ids").to_pylist()]
    for key in ("sampling_per_token_logps", "old_per_token_logps"):
        if output.get(key) is not None:  # [B, T], left aligned
            return [row[:n].tolist() for row, n in zip(output[key].float().cpu(), lengths, strict=True)]
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    pairs = zip(rollouts.column("prompt_ids").to_pylist(), rollouts.column("completion_ids").to_pylist(), strict=True)
    sequences = [(prompt + completion, len(prompt)) for prompt, completion in pairs]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logprobs, _ = completion_logprobs(
                model, sequences, trainer.processing_class.pad_token_id, float(trainer.temperature)
            )  # [B, C], right aligned
    finally:
        model.train(training)
    width = logprobs.shape[1]
    return [row[width - n :].tolist() if n else [] for row, n in zip(logprobs.float().cpu(), lengths, strict=True)]


def rollout_rows(
    trainer: Any, output: dict[str, Any], inputs: list[dict[str, Any]], rollouts: pa.Table, rewards: list[float]
) -> list[dict[str, Any]]:
    """This process's rollouts rows, every column of the rollouts schema filled."""
    tokenizer = trainer.processing_class
    rows = rollouts.to_pylist()
    logprobs = _sampled_logprobs(trainer, output, rollouts)
    out = []
    for index, (row, source, reward, sampled) in enumerate(zip(rows, inputs, rewards, logprobs, strict=True)):
        completion = row["completion_ids"][:-1] if row["finish_reason"] == "stop" else row["completion_ids"]
        text = tokenizer.decode(completion, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pred = extract_answer(text)
        gold = row["gold"]
        out.append(
            {
                **row,
                "iteration": trainer._cfiw_batches,
                "sample_idx": index % trainer.num_generations,
                "question": _question(source),
                "prompt_text": tokenizer.decode(row["prompt_ids"], skip_special_tokens=False),
                "completion_text": text,
                "completion_logprobs": sampled,
                "pred": pred,
                "reward": reward,
                "correct": numbers_equal(pred, gold) if gold else reward > 0,
            }
        )
    return out


def process_rewards(trainer: Any, rows: int) -> list[float]:
    """This process's rewards: the weighted sum of TRL's reward functions (NaN-skipping, as TRL sums)."""
    import torch

    every = trainer._cfiw_rewards  # [N, F], every process's rows
    if every is None:  # a TRL path that rewards without `_calculate_rewards`: the reward is unknown
        return [math.nan] * rows
    weights = trainer.reward_weights.to(every.device)  # [F]
    summed = torch.nansum(every * weights.unsqueeze(0), dim=1)  # [N]
    start = trainer.accelerator.process_index * rows
    return summed[start : start + rows].tolist()


def write_batch(
    trainer: Any,
    output: dict[str, Any],
    inputs: list[dict[str, Any]],
    rollouts: pa.Table,
    weighed: Any,
    advantages: list[float],
    seconds: float,
) -> Path | None:
    """Write generated batch `trainer._cfiw_batches` (every process's rows) under the log directory."""
    from accelerate.utils import gather_object

    started = time.perf_counter()
    rewards = process_rewards(trainer, rollouts.num_rows)
    tables = {
        "rollouts": rollout_rows(trainer, output, inputs, rollouts, rewards),
        "spans": weighed.spans,
        "scores": weighed.scores,
        "weights": [{**row, "advantage": a} for row, a in zip(weighed.weights, advantages, strict=True)],
    }
    if trainer.accelerator.num_processes > 1:
        tables = {kind: gather_object(rows) for kind, rows in tables.items()}
    if not trainer.accelerator.is_main_process:
        return None
    directory = Path(trainer.cfiw.log_dir) / iteration_name(trainer._cfiw_batches)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {"cfiw": dataclasses.asdict(trainer.cfiw), "trl": trainer.args.to_dict()}
    manifest = build_manifest(
        "trl-train",
        settings,
        {},
        rows=0,
        seconds=seconds + time.perf_counter() - started,
        seed=trainer.args.seed,
        metrics={"global_step": trainer.state.global_step, "processes": trainer.accelerator.num_processes},
    )
    for kind, rows in tables.items():
        if kind == "scores" and trainer.cfiw.weighting not in SCORED_MODES:
            continue  # this mode scores nothing
        table = pa.Table.from_pylist(rows, schema=SCHEMAS[kind]) if rows else SCHEMAS[kind].empty_table()
        write_table(table, directory / f"{kind}.parquet", {**manifest, "rows": len(rows)})
    return directory
