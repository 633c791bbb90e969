"""A run directory: where `cfiw loop` puts every file.

    RUN/config.toml                    the resolved configuration (a restart must match it)
    RUN/loop_state.json                iterations completed
    RUN/iter-NNNN/rollouts.parquet     also spans, scores, train_metrics, weights
    RUN/policy/                        the current policy (checkpoint with optimizer state)
    RUN/eval/iter-NNNN.parquet         greedy accuracy before iteration NNNN (and after the last)
    RUN/probe/iter-NNNN.parquet        the probe, sampled, at the same points
    RUN/policies/iter-NNNN/            kept starting policies, for `cfiw replay`
    RUN/replay/                        `cfiw replay`: MODE/iter-NNNN/ and replay.parquet

`loop` and `replay` write through `RunLayout`; `sql` and `analyze` read through
`cfiw_cli.views`, which knows the same names, so a file moved here moves everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ITERATION_KINDS = ("rollouts", "spans", "scores", "weights", "train_metrics")  # RUN/iter-NNNN/KIND.parquet
EVALUATION_KINDS = ("eval", "probe")  # RUN/KIND/iter-NNNN.parquet


def iteration_name(iteration: int) -> str:
    return f"iter-{iteration:04d}"


def iteration_of(name: str) -> int | None:
    """The iteration an `iter-NNNN` name (a directory, or a file's stem) stands for, else None."""
    match = re.fullmatch(r"iter-(\d{4,})", name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def state(self) -> Path:
        return self.root / "loop_state.json"

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def policies(self) -> Path:
        return self.root / "policies"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    @property
    def best(self) -> Path:
        return self.root / "best"  # the best evaluated policy of the run (see policies.update_best)

    @property
    def tracking(self) -> Path:
        return self.root / "tracking"  # --report-to tensorboard event files

    def iteration(self, iteration: int) -> Path:
        return self.root / iteration_name(iteration)

    def artifact(self, iteration: int, kind: str) -> Path:
        return self.iteration(iteration) / f"{kind}.parquet"

    def evaluation(self, kind: str, iteration: int) -> Path:
        return self.root / kind / f"{iteration_name(iteration)}.parquet"

    def kept_policy(self, iteration: int) -> Path:
        return self.policies / iteration_name(iteration)
