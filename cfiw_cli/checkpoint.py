"""A policy checkpoint as `cfiw train` writes it, and the one place that knows its files.

    DIR/                   the model (or a LoRA policy's adapters) and its tokenizer files
    DIR/optimizer.pt       the optimizer's state_dict() in one process's layout
    DIR/scheduler.pt       the learning-rate schedule's state_dict()
    DIR/trainer_state.json {"global_step": optimizer steps so far, "optimizer": "adamw" | "sgd"}
    DIR/cfiw_manifest.json what made it (written by the stage's commit)

A checkpoint is committed whole: everything is written into a staged directory that replaces
DIR in one step, so a kill at any moment leaves either the old policy or the whole update;
`recover` finishes a commit that a kill interrupted before DIR is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from cfiw_cli import adapters, sharding
from cfiw_cli.artifacts import (
    read_directory_manifest,
    recorded_value,
    recover_directory,
    sha256_of,
    stage_file,
    write_table,
)
from cfiw_cli.configs import OPTIMIZERS
from cfiw_cli.stage import StageResult, StageRun

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
# what resumes an optimizer rather than defining the policy: left out of a fresh start or of best/
STATE_FILES = (OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE_FILE)


@dataclass(frozen=True)
class Checkpoint:
    """What an update saves besides the tokenizer."""

    policy: Any
    weights: dict[str, Any] | None  # a full state dict gathered from a sharded policy, else None (the policy's own)
    optimizer: dict[str, Any]  # the optimizer's state_dict(), one process's layout
    scheduler: dict[str, Any]
    optimizer_name: str = "adamw"


def save(
    stage: StageRun,
    checkpoint: Checkpoint,
    tokenizer: Any,
    global_step: int,
    manifest: dict[str, Any],
    tables: dict[Path, pa.Table],
) -> StageResult:
    """The checkpoint and each of `tables`, committed together: everything is written into the
    staged directory (tables that belong elsewhere are staged with it and moved out as the last
    step of the commit), so a kill at any moment leaves either the old policy or the whole
    update (see `staged_directory`)."""
    import torch

    def fill(staging: Path) -> None:
        if checkpoint.weights is not None:
            sharding.save(checkpoint.policy, checkpoint.weights, staging)
        else:
            adapters.save(checkpoint.policy, staging)
        tokenizer.save_pretrained(staging)
        torch.save(checkpoint.optimizer, staging / OPTIMIZER_FILE)
        torch.save(checkpoint.scheduler, staging / SCHEDULER_FILE)
        state = {"global_step": global_step, "optimizer": checkpoint.optimizer_name}
        (staging / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2))
        for path, table in tables.items():
            inside = path.parent.resolve() == stage.out.resolve()
            write_table(table, staging / path.name if inside else stage_file(staging, path), manifest)

    return stage.write_directory(fill, manifest, model=None if checkpoint.weights is not None else checkpoint.policy)


def recover(directory: str | Path) -> None:
    """A checkpoint whose commit a kill interrupted is made whole (the old or the new one)."""
    recover_directory(Path(directory))


def is_saved(directory: str | Path, rollouts: str) -> bool:
    """Whether `directory` already holds the update trained on `rollouts` (a loop killed after
    saving it resumes without training twice). An interrupted commit is finished first."""
    recover(directory)
    manifest = read_directory_manifest(Path(directory)) or {}
    recorded = manifest.get("inputs", {}).get("rollouts", {}).get("sha256")
    return recorded == sha256_of(rollouts)


def holds_optimizer_state(directory: str | Path) -> bool:
    return (Path(directory) / OPTIMIZER_FILE).exists()


def saved_optimizer(directory: str | Path) -> str | None:
    """The optimizer whose state a checkpoint holds (None: no state); checkpoints written
    before SGD existed hold AdamW's."""
    state = Path(directory) / TRAINER_STATE_FILE
    if not holds_optimizer_state(directory) or not state.exists():
        return None
    hint = f"train from a checkpoint cfiw train wrote, or one without {OPTIMIZER_FILE}"
    return recorded_value(state, "optimizer", lambda name: name in OPTIMIZERS, hint, default="adamw")


def global_step(directory: str | Path) -> int:
    """Optimizer steps taken to reach this checkpoint (0 for a model no update wrote)."""
    state = Path(directory) / TRAINER_STATE_FILE
    return int(json.loads(state.read_text()).get("global_step", 0)) if state.exists() else 0


def optimizer_state(directory: str | Path) -> tuple[dict[str, Any] | None, int]:
    """(the saved optimizer state_dict, the steps it has taken), or (None, 0) without one."""
    import torch

    if not holds_optimizer_state(directory):
        return None, 0
    saved = torch.load(Path(directory) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return saved, global_step(directory)
