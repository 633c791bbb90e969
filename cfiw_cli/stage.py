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
    recover_directory,
    settings_of,
    staged_directory,
    up_to_date,
    write_directory_manifest,
    write_table,
)
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError
from cfiw_cli.modeling import holds_model, resolve_revision


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _inside(path: Path, directory: Path) -> bool:
    return directory.expanduser().resolve() in path.expanduser().resolve().parents


def _remove_stale_temp_files(out: Path) -> None:
    """Temp files a killed write of `out` left beside it (`.NAME.*.tmp`)."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)


@dataclass(frozen=True)
class StageResult:
    path: Path
    skipped: bool  # the output was up to date
    metrics: dict[str, Any]
    model: Any = None  # a policy the stage trained, in memory (train, for the loop)


class StageRun:
    """One run of stage `name` with `config` (a dataclass whose `out` is the output).

    `inputs` names each input path or hub id (hashed into the manifest; a hub `model` is
    recorded with the commit `revision` resolves to, which `commit` holds); `outputs` names the
    stage's other output files (flag -> path); `exclude` lists config fields that only say
    where those go; `requires` are files that must also exist for the output to count as up to
    date. For an output that is one part of a larger command (a replay cell), `out` and
    `settings` stand in for the config.

    Nothing is clobbered: an output may not be one of the inputs (or lie inside an input
    directory), and an existing output is replaced only when it is this stage's own artifact,
    or with `force`. A `directory` output that the stage `replaces` in place (a checkpoint
    trained again, `--out` = `--model`) is up to date when its manifest records the same
    settings and the same other inputs: the model it started from is gone by then."""

    def __init__(
        self,
        name: str,
        config: Any,
        inputs: dict[str, str | None],
        *,
        force: bool = False,
        revision: str | None = None,
        directory: bool = False,
        replaces: bool = False,
        outputs: dict[str, Path] | None = None,
        exclude: tuple[str, ...] = (),
        requires: tuple[Path, ...] = (),
        out: Path | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.force, self.directory, self.replaces = name, force, directory, replaces
        self.out = Path(out if out is not None else config.out)
        self.outputs = {"--out": self.out, **(outputs or {})}
        self.settings = settings if settings is not None else settings_of(config, *exclude)
        self.refs = {key: ref for key, ref in inputs.items() if ref}
        self.revision = revision
        self.commit: str | None = None  # of a hub model: what `revision` resolved to, to load and record
        self.requires = requires
        self.up_to_date = False
        self.started = 0.0

    @property
    def in_place(self) -> bool:
        model = self.refs.get("model")
        return self.replaces and model is not None and _same(Path(model), self.out)

    def __enter__(self) -> StageRun:
        self._refuse_clobbering_inputs()
        if self.directory:
            recover_directory(self.out)  # a commit a kill interrupted is finished (or undone) first
        else:
            prepare_output(self.out)
            _remove_stale_temp_files(self.out)
        if "model" in self.refs:
            self.commit = resolve_revision(self.refs["model"], self.revision)
        self.inputs = {
            key: input_record(ref, self.commit if key == "model" else None) for key, ref in self.refs.items()
        }
        compared = {k: v for k, v in self.inputs.items() if not (self.in_place and k == "model")}
        fresh = up_to_date(self.out, self.name, self.settings, compared, partial=self.in_place)
        self.up_to_date = fresh and all(p.exists() for p in self.requires) and not self.force
        if self.up_to_date:
            info(f"{self.out} is up to date (use --force to recompute)")
        else:
            self._refuse_clobbering_outputs()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> bool:
        return False

    def _refuse_clobbering_inputs(self) -> None:
        for flag, output in self.outputs.items():
            for key, ref in self.refs.items():
                source = Path(ref).expanduser()
                if not source.exists() or (self.in_place and key == "model" and _same(source, self.out)):
                    continue
                inside = source.is_dir() and _inside(output, source) and not (self.in_place and key == "model")
                if _same(output, source) or inside:
                    where = "is" if _same(output, source) else "lies inside"
                    raise CfiwError(
                        f"{flag} {output} {where} the input --{key.replace('_', '-')} {ref}",
                        f"choose a path for {flag} that is not one of the inputs",
                    )

    def _refuse_clobbering_outputs(self) -> None:
        """An existing output that is not up to date is replaced only when this stage wrote it
        (a file), or it is the checkpoint the stage trains again; else only with --force."""
        for flag, output in self.outputs.items():
            if self.force or not output.exists():
                continue
            if self.directory and output == self.out:
                ours = self.replaces and output.is_dir() and holds_model(output)
                what = "holds something else" if output.is_dir() else "is a file"
            else:
                ours = output.is_file() and (read_manifest(output) or {}).get("stage") == self.name
                what = f"is not a cfiw {self.name} output"
            if not ours:
                raise CfiwError(
                    f"{flag} {output} already exists and {what}", "pass --force to replace it, or choose another path"
                )
        if self.directory:
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
        self,
        *,
        rows: int,
        metrics: dict[str, Any],
        device: str | None = None,
        seed: int | None = None,
        dtype: str | None = None,
    ) -> dict[str, Any]:
        return build_manifest(
            self.name, self.settings, self.inputs, rows=rows, seconds=self.seconds, device=device, seed=seed,
            metrics=metrics, dtype=dtype,
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
