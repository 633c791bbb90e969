"""The envelope every stage runs in: inputs hashed, the up-to-date skip, the clock, the
manifest, the atomic write, and one result type.

    with StageRun("segment", config, inputs={"rollouts": config.rollouts}, force=force) as stage:
        if stage.up_to_date:
            return stage.skipped()
        table = ...                                      # the stage's own work
        return stage.write_table(table, stage.manifest(rows=table.num_rows, metrics=metrics))

A file output (`--out x.parquet`) is checked writable on entry and written to a temp file
renamed into place; a directory output (a checkpoint, a dataset) is built in `<out>.tmp` and
swapped in whole. Either way a killed stage leaves nothing under the final name. "Up to date"
means the output's manifest records the same stage, settings and input hashes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from cfiw_cli.artifacts import (
    build_manifest,
    input_record,
    prepare_output,
    read_directory_manifest,
    read_manifest,
    settings_of,
    staged_directory,
    up_to_date,
    write_directory_manifest,
    write_table,
)
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError


@dataclass(frozen=True)
class StageResult:
    path: Path
    skipped: bool  # the output was up to date
    metrics: dict[str, Any]
    model: Any = None  # a policy the stage trained, in memory (train, for the loop)


class StageRun:
    """One run of stage `name` with `config` (a dataclass whose `out` is the output).

    `inputs` names each input path or hub id (hashed into the manifest); `exclude` lists config
    fields that only say where other outputs go; `requires` are files that must also exist for
    the output to count as up to date. A `directory` output is refused when something else is
    already there, unless the stage `replaces` it (a checkpoint updated in place) or `force`.
    For an output that is one part of a larger command (a replay cell), `out` and `settings`
    stand in for the config."""

    def __init__(
        self,
        name: str,
        config: Any,
        inputs: dict[str, str | None],
        *,
        force: bool = False,
        directory: bool = False,
        replaces: bool = False,
        exclude: tuple[str, ...] = (),
        requires: tuple[Path, ...] = (),
        out: Path | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.force, self.directory, self.replaces = name, force, directory, replaces
        self.out = Path(out if out is not None else config.out)
        self.settings = settings if settings is not None else settings_of(config, *exclude)
        self.inputs = {key: input_record(ref) for key, ref in inputs.items() if ref}
        self.requires = requires
        self.up_to_date = False
        self.started = 0.0

    def __enter__(self) -> StageRun:
        if not self.directory:
            prepare_output(self.out)
        fresh = up_to_date(self.out, self.name, self.settings, self.inputs) and all(p.exists() for p in self.requires)
        self.up_to_date = fresh and not self.force
        if self.up_to_date:
            info(f"{self.out} is up to date (use --force to recompute)")
        elif self.directory:
            self._prepare_directory()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def _prepare_directory(self) -> None:
        if self.out.exists() and not self.force and not self.replaces:
            raise CfiwError(
                f"{self.out} already exists and holds something else",
                "pass --force to replace it or choose another --out",
            )
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CfiwError(
                f"cannot create {self.out.parent}: {exc.strerror or exc}", "choose a writable --out"
            ) from exc

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def skipped(self, model: Any = None) -> StageResult:
        """The result of an up-to-date output: its recorded metrics."""
        manifest = read_directory_manifest(self.out) if self.directory else read_manifest(self.out)
        return StageResult(self.out, True, (manifest or {}).get("metrics", {}), model)

    def manifest(
        self, *, rows: int, metrics: dict[str, Any], device: str | None = None, seed: int | None = None
    ) -> dict[str, Any]:
        return build_manifest(
            self.name, self.settings, self.inputs, rows=rows, seconds=self.seconds, device=device, seed=seed,
            metrics=metrics,
        )  # fmt: skip

    def write_table(self, table: pa.Table, manifest: dict[str, Any], model: Any = None) -> StageResult:
        """The output file, written atomically with `manifest` in its footer."""
        write_table(table, self.out, manifest)
        return StageResult(self.out, False, manifest["metrics"], model)

    def write_directory(self, fill: Callable[[Path], None], manifest: dict[str, Any], model: Any = None) -> StageResult:
        """The output directory: `fill` writes into a staging copy (and may add to `manifest`),
        then the manifest is written and the copy replaces `out`."""
        with staged_directory(self.out) as staging:
            fill(staging)
            write_directory_manifest(staging, manifest)
        return StageResult(self.out, False, manifest["metrics"], model)
