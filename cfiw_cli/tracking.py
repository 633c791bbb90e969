"""Live curves: scalars to TensorBoard (offline event files), Weights & Biases or trackio.

One small interface for the loop, `train` and `sft`: `Tracker(report_to, directory, name,
config)`, `log({name: value}, step)`, `close()`. Values that are not finite numbers are left
out. The x axis is the optimizer step, so the curves of the loop's stages line up.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cfiw_cli.errors import CfiwError

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "cfiw"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_report_to(report_to: str) -> None:
    """Fail before any work when the tracker's library is missing."""
    if report_to not in REPORT_TO:
        raise CfiwError(f"unknown --report-to {report_to!r}", f"choose one of {', '.join(REPORT_TO)}")
    package = _PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise CfiwError(f"--report-to {report_to} needs the {package} package", f"pip install {package}")


class Tracker:
    def __init__(self, report_to: str, directory: str | Path, name: str, config: dict[str, Any] | None = None):
        check_report_to(report_to)
        self.report_to = report_to
        self.directory = Path(directory)
        self._writer: Any = None
        self._run: Any = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.directory))
        elif report_to == "wandb":
            import wandb

            self.directory.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(project=PROJECT, name=name, dir=str(self.directory), config=config or {})
        elif report_to == "trackio":
            import trackio

            self._run = trackio.init(project=PROJECT, name=name, config=config or {})

    def log(self, values: dict[str, Any], step: int) -> None:
        scalars = {
            key: float(value)
            for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        }
        if not scalars:
            return
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()
        elif self.report_to == "wandb":
            self._run.log(scalars, step=step)
        elif self.report_to == "trackio":
            import trackio

            trackio.log(scalars, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        elif self.report_to == "wandb":
            self._run.finish()
        elif self.report_to == "trackio":
            import trackio

            trackio.finish()


def prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{key}": value for key, value in values.items()}


def tracking_directory(config: Any) -> Path | None:
    """Where a stage with `TrackingOptions` (train, sft) writes its curves: `--tracking-dir`,
    else a tracking/ directory beside `--out`; None with `--report-to none`."""
    if config.report_to == "none":
        return None
    return Path(config.tracking_dir) if config.tracking_dir else Path(config.out).parent / "tracking"


def beside_output(config: Any) -> Tracker | None:
    """The tracker of a stage with `TrackingOptions` (train, sft): in `tracking_directory`."""
    directory = tracking_directory(config)
    if directory is None:
        return None
    return Tracker(config.report_to, directory, Path(config.out).name, asdict(config))


def log_train_steps(tracker: Tracker, rows: list[dict[str, Any]]) -> int | None:
    """Each train_metrics row under train/ at its optimizer step; returns the last step."""
    for row in rows:
        tracker.log(prefixed("train", {key: value for key, value in row.items() if key != "step"}), row["step"])
    return rows[-1]["step"] if rows else None
