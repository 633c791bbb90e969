"""Every command that builds a config, described once.

A stage descriptor says which config class its flags come from, where its `run` lives
(imported on first use, so `cfiw --help` loads no stage), which artifact kind it writes
(and so which schema its file has), whether `accelerate launch` splits its work across processes, and
whether the loop runs it on the loop's model. The CLI, the loop, `validate` and the tests
read these; nothing else keeps a table keyed by stage name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from cfiw_cli import configs


@dataclass(frozen=True)
class StageDescriptor:
    name: str  # the command, `cfiw NAME`
    config: type  # its flags are this class's fields
    module: str  # where `run(config, ...)` lives
    # the artifact kind of its output file, whose schema is schemas.SCHEMAS[writes] (not imported
    # here: pyarrow would slow `cfiw --help`); None for a directory
    writes: str | None = None
    shards: bool = False  # under accelerate launch each process samples, scores or trains its share
    in_loop: bool = False  # a stage of every loop iteration (or evaluation)
    takes_model: bool = False  # the loop hands it the loaded policy, not only the tokenizer

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def check_environment(self, config: Any) -> None:
        """What the config cannot check itself (an installed library); a stage without such a
        rule has no `check`."""
        check = getattr(self.load(), "check", None)
        if check is not None:
            check(config)


STAGES: dict[str, StageDescriptor] = {
    stage.name: stage
    for stage in (
        StageDescriptor("tiny-model", configs.TinyModelConfig, "cfiw_cli.tools.tiny_model"),
        StageDescriptor("synth", configs.SynthConfig, "cfiw_cli.tools.synth"),
        StageDescriptor("sft", configs.SftConfig, "cfiw_cli.tools.sft"),
        StageDescriptor("rollout", configs.RolloutConfig, "cfiw_cli.pipeline.rollout", "rollouts", True, True, True),
        StageDescriptor("segment", configs.SegmentConfig, "cfiw_cli.pipeline.segment", "spans", False, True),
        StageDescriptor("score", configs.ScoreConfig, "cfiw_cli.pipeline.score", "scores", True, True, True),
        StageDescriptor("train", configs.TrainConfig, "cfiw_cli.pipeline.train", None, True, True, True),
        StageDescriptor("eval", configs.EvalConfig, "cfiw_cli.pipeline.eval", "eval", True, True, True),
        StageDescriptor("replay", configs.ReplayConfig, "cfiw_cli.pipeline.replay"),
        StageDescriptor("gradients", configs.GradientsConfig, "cfiw_cli.pipeline.gradients"),
    )
}
LOOP_STAGES = {name: stage for name, stage in STAGES.items() if stage.in_loop}


def stage_of_kind(kind: str) -> StageDescriptor | None:
    """The stage whose output file is of this artifact kind."""
    return next((stage for stage in STAGES.values() if stage.writes == kind), None)
