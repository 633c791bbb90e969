"""`cfiw synth`: GSM8K-format synthetic problems whose solution sentences carry ground-truth labels.

Writes `<out>/train.jsonl` and `<out>/test.jsonl` (columns `question`, `answer`, `labels`) and
`<out>/cfiw_manifest.json`. The test split is drawn from its own seed and never repeats a
train question. With `teacher_error_rate` > 0 it also writes `<out>/sft.jsonl`: the train
questions solved by a teacher with a systematic misconception (see `make_problem`), the
demonstrations of a warm start whose errors RL can find and unlearn; train and test keep the
correct solutions and answers. See `cfiw_cli.tasks.arith` for the problems and the labels.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from cfiw_cli.configs import SynthConfig
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError
from cfiw_cli.stage import StageResult, StageRun
from cfiw_cli.tasks.arith import make_problem
from cfiw_cli.tasks.gsm8k import parse_gold


def generate(config: SynthConfig) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows} (and "sft": the teacher's solutions of the train questions);
    test questions that also occur in train are redrawn."""

    shape = dict(
        max_steps=config.max_steps,
        max_number=config.max_number,
        filler_rate=config.filler_rate,
        distractors=config.distractors,
        filler_length=config.filler_length,
        filler_vocab=config.filler_vocab,
        noise_lines=config.noise_lines,
    )
    train_rng, test_rng = random.Random(config.seed), random.Random(config.seed + 1_000_003)
    # the dials' own generators: a problem's numbers and events are the same at every dial setting
    train_dial, test_dial = random.Random(config.seed + 3_000_003), random.Random(config.seed + 4_000_003)
    teacher = random.Random(config.seed + 2_000_003) if config.teacher_error_rate > 0 else None
    train = [
        make_problem(train_rng, teacher=teacher, teacher_error_rate=config.teacher_error_rate, dial=train_dial, **shape)
        for _ in range(config.n_train)
    ]
    sft = (
        [
            {"question": r["question"], "answer": r.pop("teacher_answer"), "labels": r.pop("teacher_labels")}
            for r in train
        ]
        if teacher
        else []
    )
    seen, test = {row["question"] for row in train}, []
    for _ in range(100 * config.n_test):
        if len(test) == config.n_test:
            break
        row = make_problem(test_rng, dial=test_dial, **shape)
        if row["question"] not in seen:
            seen.add(row["question"])
            test.append(row)
    if len(test) < config.n_test:
        raise CfiwError(
            f"only {len(test)} distinct test problems exist beside {config.n_train} train problems at "
            f"--max-number {config.max_number}",
            "raise --max-number or --max-steps, or lower --n-test",
        )
    return {"train": train, "test": test, **({"sft": sft} if sft else {})}


def run(config: SynthConfig, force: bool = False) -> StageResult:
    with StageRun("synth", config, {}, force=force, directory=True) as stage:
        if stage.up_to_date:
            return stage.skipped()
        splits = generate(config)
        counts = {split: len(rows) for split, rows in splits.items()}
        labels = Counter(sentence["label"] for row in splits["train"] for sentence in row["labels"])
        metrics = {"rows": counts, "train_sentences_by_label": dict(labels), **_teacher_metrics(splits)}
        manifest = stage.manifest(rows=sum(counts.values()), metrics=metrics, seed=config.seed)

        def fill(staging: Path) -> None:
            for split, rows in splits.items():
                (staging / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

        result = stage.write_directory(fill, manifest)
    teacher = " and the teacher's solutions" if "sft" in counts else ""
    info(f"wrote {counts['train']} train and {counts['test']} test problems{teacher} to {stage.out}")
    return result


def _teacher_metrics(splits: dict[str, list[dict]]) -> dict:
    """How wrong the teacher is: the share of its train solutions whose answer differs."""
    if "sft" not in splits:
        return {}

    wrong = sum(
        parse_gold(t["answer"]) != parse_gold(r["answer"]) for t, r in zip(splits["sft"], splits["train"], strict=True)
    )
    return {"teacher_wrong_share": wrong / len(splits["train"])}
