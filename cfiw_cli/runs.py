"""A run directory: where `cfiw loop` puts every file, and DuckDB views over one or many runs.

    RUN/config.toml                    the resolved configuration (a restart must match it)
    RUN/loop_state.json                iterations completed
    RUN/iter-NNNN/rollouts.parquet     also spans, scores, train_metrics, weights
    RUN/policy/                        the current policy (checkpoint with optimizer state)
    RUN/eval/iter-NNNN.parquet         greedy accuracy before iteration NNNN (and after the last)
    RUN/probe/iter-NNNN.parquet        the probe, sampled, at the same points
    RUN/policies/iter-NNNN/            kept starting policies, for `cfiw replay`
    RUN/replay/                        `cfiw replay`: MODE/iter-NNNN/ and replay.parquet

`loop` and `replay` write through `RunLayout`; `sql` and `analyze` read through `create_views`,
so a file moved here moves everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ITERATION_KINDS = ("rollouts", "spans", "scores", "weights", "train_metrics")  # RUN/iter-NNNN/KIND.parquet
EVALUATION_KINDS = ("eval", "probe")  # RUN/KIND/iter-NNNN.parquet


def iteration_name(iteration: int) -> str:
    return f"iter-{iteration:04d}"


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


def _files(runs: list[Path], pattern: str) -> list[str]:
    return sorted(str(f) for run in runs for f in run.glob(pattern))


def create_views(con: Any, runs: list[Path], *, run_column: bool) -> None:
    """One view per artifact kind over every iteration of `runs`, with an `iteration` column
    (from the directory or file name) and, with `run_column`, a `run` column (the run
    directory's name): rollouts, spans, scores, weights, train_metrics, eval, probe, replay."""
    run_expr = "regexp_extract(filename, '([^/]+)/{anchor}', 1) as run, " if run_column else ""
    for kind in ITERATION_KINDS:
        files = _files(runs, f"iter-*/{kind}.parquet")
        if not files:
            continue
        source = f"read_parquet({files}, filename = true, union_by_name = true)"
        iteration = "cast(regexp_extract(filename, 'iter-(\\d+)/', 1) as integer) as iteration"
        if kind == "rollouts" and not run_column:  # rollouts carry their own iteration column
            con.execute(f"create view {kind} as select * exclude (filename) from {source}")
        elif kind == "rollouts":
            run = run_expr.format(anchor="iter-\\d+/")
            con.execute(f"create view {kind} as select * exclude (filename, iteration), {run}{iteration} from {source}")
        else:
            run = run_expr.format(anchor="iter-\\d+/")
            con.execute(
                f"create view {kind} as select * exclude (filename, iteration), {run}{iteration} "
                f"from (select *, null::integer as iteration from {source})"
            )
    for kind in EVALUATION_KINDS:
        files = _files(runs, f"{kind}/iter-*.parquet")
        if files:
            run = run_expr.format(anchor=f"{kind}/")
            con.execute(
                f"create view {kind} as select * exclude (filename, iteration), {run}"
                "cast(regexp_extract(filename, 'iter-(\\d+)\\.parquet', 1) as integer) as iteration "
                f"from (select *, null::integer as iteration "
                f"from read_parquet({files}, filename = true, union_by_name = true))"
            )
    replays = _files(runs, "replay/replay.parquet")
    if replays:
        run = run_expr.format(anchor="replay/replay\\.parquet").removesuffix(", ")
        columns = f"* exclude (filename), {run}" if run_column else "* exclude (filename)"
        con.execute(
            f"create view replay as select {columns} from read_parquet({replays}, filename = true, union_by_name "
            f"= true)"
        )
