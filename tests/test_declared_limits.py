"""A field's declared limits and choices are the ones its stage enforces.

For every field of every stage config the loop plans, each value its declaration allows at
the edge (each choice, the minimum, the maximum, just above an exclusive bound) must both
construct and pass the stage's `check`; a value just outside must fail at construction. A
stage check stricter than the declaration (a `--top-p` declared from 0 that the check
refused at 0, a `--batch-tokens` declared from 1 that the check refused below 16) fails here.
Rules that tie two fields together, or need an optional package, are listed by name."""

from __future__ import annotations

import dataclasses

import pytest

from cfiw_cli.errors import CfiwError
from cfiw_cli.pipeline.loop import CHECKS, STAGE_CONFIGS

REQUIRED = {
    "model": "m",
    "dataset": "d",
    "out": "o",
    "rollouts": "r.parquet",
    "spans": "s.parquet",
    "scores": "c.parquet",
}
# (stage, field, value) the stage's check refuses for a reason beyond the field itself
BEYOND_THE_FIELD = {
    ("segment", "min_tokens", 100_000): "--min-tokens <= --max-tokens",
    ("segment", "max_tokens", 1): "--min-tokens <= --max-tokens",
    ("train", "report_to", "wandb"): "needs the wandb package, which is optional",
    ("train", "report_to", "trackio"): "needs the trackio package, which is optional",
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
    (stage, field) for stage, cls in STAGE_CONFIGS.items() for field in dataclasses.fields(cls) if any(edges(field))
]


def test_every_stage_config_is_walked():
    assert set(STAGE_CONFIGS) == set(CHECKS) - {"keep"}
    assert len(CASES) >= 40


@pytest.mark.parametrize("stage, field", CASES, ids=[f"{s}.{f.name}" for s, f in CASES])
def test_declared_limits_are_the_enforced_ones(stage, field):
    base = baseline(STAGE_CONFIGS[stage])
    CHECKS[stage](base)
    inside, outside = edges(field)
    for value in inside:
        config = dataclasses.replace(base, **{field.name: value})  # the declaration allows it
        if (stage, field.name, value) in BEYOND_THE_FIELD:
            with pytest.raises(CfiwError):
                CHECKS[stage](config)
            continue
        CHECKS[stage](config)  # and so does the stage
    for value in outside:
        with pytest.raises(CfiwError):
            dataclasses.replace(base, **{field.name: value})
