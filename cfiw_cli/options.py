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
from dataclasses import MISSING, Field, dataclass, fields
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer

from cfiw_cli.errors import CfiwError
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


def _annotation(
    config_class: type, item: Field, names: tuple[str, ...] | None = None, optional: bool = False, note: str = ""
) -> Any:
    """The Typer parameter of a declared field; `names`, `optional` (default None) and `note`
    (after the help) for a flag that sets the field from elsewhere (`cfiw loop`'s overrides)."""
    meta = item.metadata
    declared = typing.get_type_hints(config_class)[item.name]
    optional = optional or type(None) in typing.get_args(declared)
    base: Any = next((a for a in typing.get_args(declared) if a is not type(None)), declared)
    extra: dict[str, Any] = {key: meta[key] for key in ("min", "max") if meta.get(key) is not None}
    help_text = meta["help"] + (f" [x>{meta['above']:g}]" if meta.get("above") is not None else "") + note
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
        info = typer.Option(*(names or meta.get("names", ())), help=help_text, **extra)
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


def _plain(value: Any) -> Any:
    """A parsed value as the config holds it: a choice as its value, a path as a string."""
    if isinstance(value, StrEnum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def build_config(config_class: type, values: dict[str, Any]) -> Any:
    """The config from parsed parameters."""
    return config_class(**{name: _plain(value) for name, value in values.items()})


@dataclass(frozen=True)
class SectionFlag:
    """A flag that sets config keys of a run (`cfiw loop --iterations 3` sets loop.iterations):
    its type, limits, choices and help are those of the field `declared_in.field`."""

    name: str  # the parameter, --name on the command line
    declared_in: type
    field: str
    keys: tuple[str, ...]  # SECTION.KEY set to its value
    short: str | None = None

    def parameter(self) -> inspect.Parameter:
        item = next(f for f in fields(self.declared_in) if f.name == self.field)
        flag = "--" + self.name.replace("_", "-")
        if item.type in (bool, "bool"):  # a switch both ways: given either way, it overrides the preset
            flag = f"{flag}/--no-{flag[2:]}"
        names = (flag, *([self.short] if self.short else []))
        annotation = _annotation(self.declared_in, item, names, optional=True, note=f" ({', '.join(self.keys)})")
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def section_overrides(flags: tuple[SectionFlag, ...], values: dict[str, Any]) -> dict[str, Any]:
    """{SECTION.KEY: value} of every flag given (None: not given)."""
    return {key: _plain(values[flag.name]) for flag in flags if values[flag.name] is not None for key in flag.keys}


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
ReportToChoice = choice_type("ReportToChoice", REPORT_TO)
NO_TRACKING = ReportToChoice("none")
