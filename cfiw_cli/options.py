"""Command-line parameters from the config dataclasses, and the options that belong to no config.

A config field declared with `configs.flag(...)` becomes one Typer parameter: `--field-name`
(or the names it gives), the field's type and default, its help and limits, and for a choice
field a `StrEnum` of the allowed values, so a bad value exits 2 listing them and shell
completion offers them. `build_config` turns the parsed values back into the config.
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import MISSING, Field, fields
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer

from cfiw_cli.algo.weights import MODES, PROFILES
from cfiw_cli.errors import CfiwError
from cfiw_cli.modeling import TRAIN_DTYPES
from cfiw_cli.tracking import REPORT_TO


@cache
def choice_type(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """A choice flag from the tuple the code checks against: a bad value exits 2 listing them."""
    return StrEnum(name, [(value, value) for value in values])


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_")) + "Choice"


def ordered_fields(config_class: type) -> list[Field]:
    """The fields a command takes, required ones first; the shared groups (model, data,
    sampling) before the stage's own fields, each in declaration order."""
    classes = [c for c in config_class.__mro__[1:] if c is not object] + [config_class]
    declared = [name for c in classes for name in c.__dict__.get("__annotations__", {})]
    every = sorted(fields(config_class), key=lambda f: declared.index(f.name))
    return [f for f in every if f.default is MISSING] + [f for f in every if f.default is not MISSING]


def _annotation(config_class: type, item: Field) -> Any:
    meta = item.metadata
    declared = typing.get_type_hints(config_class)[item.name]
    optional = type(None) in typing.get_args(declared)
    base: Any = next(a for a in typing.get_args(declared) if a is not type(None)) if optional else declared
    extra: dict[str, Any] = {key: meta[key] for key in ("min", "max") if meta.get(key) is not None}
    help_text = meta["help"] + (f" [x>{meta['above']:g}]" if meta.get("above") is not None else "")
    if base is float or meta.get("check") or meta.get("above") is not None:
        extra["callback"] = _checker(base is float, meta.get("above"), meta.get("check"))
    if meta.get("choices"):
        base = choice_type(_camel(item.name), meta["choices"])
    elif meta.get("path"):
        base = Path
    if optional:
        base = base | None
    if meta.get("argument"):
        info = typer.Argument(help=help_text)
    else:
        info = typer.Option(*meta.get("names", ()), help=help_text, **extra)
    return Annotated[base, info]


def _checker(number: bool, above: float | None, check: Any) -> Any:
    """A Typer callback for what a range cannot say, as a bad flag value (exit 2): Typer parses
    `nan` and `inf` as floats, and no float setting takes them; a strict lower bound; a
    field's own check."""

    def checked(value: Any) -> Any:
        if value is None:
            return value
        if number and not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if above is not None and not value > above:
            raise typer.BadParameter(f"{value} is not above {above:g}")
        if check is not None:
            try:
                check(value)
            except CfiwError as exc:
                raise typer.BadParameter(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from None
        return value

    return checked


def parameters(config_class: type) -> list[inspect.Parameter]:
    """One keyword parameter per config field, for a Typer command's signature."""
    return [
        inspect.Parameter(
            item.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if item.default is MISSING else item.default,
            annotation=_annotation(config_class, item),
        )
        for item in ordered_fields(config_class)
    ]


def build_config(config_class: type, values: dict[str, Any]) -> Any:
    """The config from parsed parameters: choices as their values, paths as strings."""

    def plain(value: Any) -> Any:
        if isinstance(value, StrEnum):
            return value.value
        return str(value) if isinstance(value, Path) else value

    return config_class(**{name: plain(value) for name, value in values.items()})


# Options of commands without a config (loop's overrides, validate, sql, analyze).
Force = Annotated[
    bool,
    typer.Option(
        "--force",
        "-f",
        help="Recompute even if the output is up to date, and replace an output this command did not write "
        "(never an input).",
    ),
]
WeightingChoice = choice_type("WeightingChoice", MODES)
ProfileChoice = choice_type("ProfileChoice", PROFILES)
ReportToChoice = choice_type("ReportToChoice", REPORT_TO)
TrainDtypeChoice = choice_type("TrainDtypeChoice", TRAIN_DTYPES)
NO_TRACKING = ReportToChoice("none")
