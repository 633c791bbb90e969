"""`cfiw synth`: GSM8K-format synthetic problems whose solution sentences carry ground-truth labels.

Writes `<out>/train.jsonl` and `<out>/test.jsonl` (columns `question`, `answer`, `labels`) and
`<out>/cfiw_manifest.json`. The test split is drawn from its own seed and never repeats a
train question. See `cfiw_cli.tasks.arith` for the problems and the labels.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cfiw_cli.artifacts import build_manifest, prepare_directory, settings_of, staged_directory, write_directory_manifest
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError


@dataclass(frozen=True)
class SynthConfig:
    out: str
    n_train: int = 2000
    n_test: int = 200
    seed: int = 0
    max_steps: int = 3
    max_number: int = 20
    filler_rate: float = 0.3


def _check(config: SynthConfig) -> None:
    if config.n_train < 1 or config.n_test < 1:
        raise CfiwError("--n-train and --n-test must be at least 1", "e.g. --n-train 2000 --n-test 200")
    if config.max_steps < 1:
        raise CfiwError("--max-steps must be at least 1", "e.g. --max-steps 3")
    if config.max_number < 4:
        raise CfiwError("--max-number must be at least 4", "e.g. --max-number 20")
    if not 0 <= config.filler_rate <= 1:
        raise CfiwError("--filler-rate must lie in [0, 1]", "e.g. --filler-rate 0.3")


def generate(config: SynthConfig) -> dict[str, list[dict]]:
    """{"train": rows, "test": rows}; test questions that also occur in train are redrawn."""
    import random

    from cfiw_cli.tasks.arith import make_problem

    shape = dict(max_steps=config.max_steps, max_number=config.max_number, filler_rate=config.filler_rate)
    train_rng, test_rng = random.Random(config.seed), random.Random(config.seed + 1_000_003)
    train = [make_problem(train_rng, **shape) for _ in range(config.n_train)]
    seen, test = {row["question"] for row in train}, []
    for _ in range(100 * config.n_test):
        if len(test) == config.n_test:
            break
        row = make_problem(test_rng, **shape)
        if row["question"] not in seen:
            seen.add(row["question"])
            test.append(row)
    if len(test) < config.n_test:
        raise CfiwError(
            f"only {len(test)} distinct test problems exist beside {config.n_train} train problems at --max-number {config.max_number}",
            "raise --max-number or --max-steps, or lower --n-test",
        )
    return {"train": train, "test": test}


def run(config: SynthConfig, force: bool = False) -> Path:
    _check(config)
    out = Path(config.out)
    settings = settings_of(config)
    if not prepare_directory(out, "synth", settings, {}, force):
        return out
    started = time.perf_counter()
    splits = generate(config)
    with staged_directory(out) as tmp:
        for split, rows in splits.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        counts = {split: len(rows) for split, rows in splits.items()}
        labels = Counter(sentence["label"] for row in splits["train"] for sentence in row["labels"])
        manifest = build_manifest(
            "synth", settings, {}, rows=sum(counts.values()), seconds=time.perf_counter() - started,
            seed=config.seed, metrics={"rows": counts, "train_sentences_by_label": dict(labels)},
        )
        write_directory_manifest(tmp, manifest)
    info(f"wrote {counts['train']} train and {counts['test']} test problems to {out}")
    return out
