"""A field's declared limits and choices are the ones its stage enforces.

For every field of every command's config (the stage registry), each value its declaration
allows at the edge (each choice, the minimum, the maximum, just above an exclusive bound) must
both construct and pass the stage's environment check; a value just outside must fail at
construction. A rule stricter than the declaration (a `--top-p` declared from 0 that a check
refused at 0, a `--batch-tokens` declared from 1 that a check refused below 16, an sft `--lr`
declared from 0 that a check refused at 0) fails here. Rules that tie two fields together, or
need an optional package, are listed by name."""

from __future__ import annotations

import dataclasses

import pytest

from cfiw_cli.errors import CfiwError
from cfiw_cli.registry import STAGES

REQUIRED = {
    "model": "m",
    "dataset": "d",
    "out": "o",
    "rollouts": "r.parquet",
    "spans": "s.parquet",
    "scores": "c.parquet",
    "run": "runs/x",
}
# (stage, field, value) the stage's check refuses for a reason beyond the field itself
BEYOND_THE_FIELD = {
    ("segment", "min_tokens", 100_000): "--min-tokens <= --max-tokens",
    ("segment", "max_tokens", 1): "--min-tokens <= --max-tokens",
    ("train", "report_to", "wandb"): "needs the wandb package, which is optional",
    ("train", "report_to", "trackio"): "needs the trackio package, which is optional",
    ("sft", "report_to", "wandb"): "needs the wandb package, which is optional",
    ("sft", "report_to", "trackio"): "needs the trackio package, which is optional",
}


def baseline(config_class: type) -> object:
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in REQUIRED.items() if k in names})


def edges(field: dataclasses.Field) -> tuple[list, list]:
    """(values the declaration allows at its edges, values just outside them)."""
    meta, number = field.metadata, "float" in str(field.type)
    inside, outside = list(meta.get("choices") or []), []
    if meta.get("choices"):
        outside.append("no-such-choice")
    step = 1e-6 if number else 1
    if meta.get("min") is not None:
        inside.append(meta["min"])
        outside.append(meta["min"] - step)
    if meta.get("max") is not None:
        inside.append(meta["max"])
        outside.append(meta["max"] + step)
    if meta.get("above") is not None:
        inside.append(meta["above"] + step)
        outside.append(meta["above"])
    return inside, outside


CASES = [
    (stage, field)
    for stage, descriptor in STAGES.items()
    for field in dataclasses.fields(descriptor.config)
    if any(edges(field))
]


def test_every_command_config_is_walked():
    assert {stage for stage, _ in CASES} == set(STAGES)
    assert len(CASES) >= 80


@pytest.mark.parametrize("stage, field", CASES, ids=[f"{s}.{f.name}" for s, f in CASES])
def test_declared_limits_are_the_enforced_ones(stage, field):
    descriptor = STAGES[stage]
    base = baseline(descriptor.config)
    descriptor.check_environment(base)
    inside, outside = edges(field)
    for value in inside:
        if (stage, field.name, value) in BEYOND_THE_FIELD:
            with pytest.raises(CfiwError):  # a rule of two fields at construction, or the environment
                descriptor.check_environment(dataclasses.replace(base, **{field.name: value}))
            continue
        config = dataclasses.replace(base, **{field.name: value})  # the declaration allows it
        descriptor.check_environment(config)  # and so does the stage
    for value in outside:
        with pytest.raises(CfiwError):
            dataclasses.replace(base, **{field.name: value})


def test_a_rule_of_two_fields_is_checked_when_the_config_is_built():
    from cfiw_cli.configs import ScoreConfig, TrainConfig

    with pytest.raises(CfiwError, match="needs --spans and --scores"):
        TrainConfig(model="m", rollouts="r", out="o", weighting="cfiw")
    with pytest.raises(CfiwError, match="cannot be used with LoRA"):
        TrainConfig(model="m", rollouts="r", out="o", weighting="uniform", lora_r=4, reference="ref")
    with pytest.raises(CfiwError, match="own answer"):
        ScoreConfig(model="m", rollouts="r", spans="s", out="o", profile="authors", target="gold")
