"""Typer option aliases shared by the commands, so a flag means the same thing everywhere."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from cfiw_cli.algo.importance import MASK_MODES, TARGETS
from cfiw_cli.algo.loss import LOSS_TYPES, REWARD_SCALINGS
from cfiw_cli.algo.weights import MODES, PROFILES
from cfiw_cli.modeling import DTYPES


def _choices(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """A choice flag from the tuple the code checks against: a bad value exits 2 listing them."""
    return StrEnum(name, [(value, value) for value in values])


DtypeChoice = _choices("DtypeChoice", DTYPES)
MaskChoice = _choices("MaskChoice", MASK_MODES)
TargetChoice = _choices("TargetChoice", TARGETS)
WeightingChoice = _choices("WeightingChoice", MODES)
ProfileChoice = _choices("ProfileChoice", PROFILES)
LossTypeChoice = _choices("LossTypeChoice", LOSS_TYPES)
RewardScalingChoice = _choices("RewardScalingChoice", REWARD_SCALINGS)

Model = Annotated[str, typer.Option("--model", "-m", help="Hugging Face hub id or local model directory.")]
Dataset = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="'gsm8k' (hub openai/gsm8k, config main), a .jsonl/.parquet file with question and answer "
        "columns, or a directory holding <split>.jsonl.",
    ),
]
Split = Annotated[str, typer.Option(help="Dataset split (hub datasets, or <split>.jsonl in a directory).")]
Limit = Annotated[int | None, typer.Option(help="Use at most this many questions (default: all).")]
Offset = Annotated[int, typer.Option(help="Skip this many questions first.")]
Seed = Annotated[int, typer.Option(help="Random seed; same seed and inputs give the same results on CPU.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Recompute even if the output is up to date.")]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Longest completion, in tokens.")]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass (1.0 = off).")]
BatchSize = Annotated[int, typer.Option(min=1, help="Sequences per generate call.")]
Dtype = Annotated[
    DtypeChoice,
    typer.Option(help="Model dtype: auto (bfloat16 on a bf16 GPU, else float32), float32, bfloat16, float16."),
]
PromptTemplate = Annotated[
    str | None,
    typer.Option(
        help="User message with a {question} placeholder (default: the question plus an instruction to end with '#### <number>')."
    ),
]
ChatTemplate = Annotated[
    bool,
    typer.Option(
        "--chat-template/--no-chat-template", help="Wrap the prompt in the tokenizer's chat template when it has one."
    ),
]
Rollouts = Annotated[
    Path, typer.Option("--rollouts", "-r", help="rollouts.parquet (from cfiw rollout or another tool).")
]
Spans = Annotated[
    Path, typer.Option("--spans", "-s", help="spans.parquet written by cfiw segment from the same rollouts.")
]
