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

What may be replaced (`guard_inputs`, `guard_outputs`): an output is never an input, never lies
inside an input directory and never holds an input, whatever `--force` says. An existing output
is replaced only when the same stage wrote it (its manifest says so), or with `--force`; a
directory the stage wrote keeps the files it did not write (a user's notes) when replaced. Each
output is locked while the stage runs, so a second cfiw process writing it stops at once.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from filelock import FileLock, Timeout

from cfiw_cli.artifacts import (
    DIRECTORY_MANIFEST,
    build_manifest,
    input_record,
    lies_inside,
    manifest_if_any,
    prepare_output,
    read_directory_manifest,
    read_manifest,
    recover_directory,
    remove_stale_temp_files,
    same_path,
    settings_of,
    staged_directory,
    up_to_date,
    write_directory_manifest,
    write_table,
    written_files,
)
from cfiw_cli.console import info
from cfiw_cli.errors import CfiwError
from cfiw_cli.modeling import resolve_revision
from cfiw_cli.tracking import tracking_directory


def _input_flag(key: str) -> str:
    return f"the input --{key.replace('_', '-')}"


def guard_inputs(
    outputs: dict[str, Path],
    refs: dict[str, str],
    *,
    in_place: Path | None = None,
    named: Callable[[str], str] = _input_flag,
) -> None:
    """No output may be an input, lie inside an input directory, or hold an input (a directory
    output replaced whole would delete it). `in_place`: the checkpoint a stage updates, which is
    its `model` input and its output at once; `named(key)` says what an input is in an error.
    `--force` does not lift any of this."""
    for flag, output in outputs.items():
        for key, ref in refs.items():
            source = Path(ref).expanduser()
            if not source.exists() or (in_place is not None and key == "model" and same_path(source, in_place)):
                continue
            name = named(key)
            if same_path(output, source):
                problem = f"{flag} {output} is {name} {ref}"
            elif source.is_dir() and lies_inside(output, source):
                problem = f"{flag} {output} lies inside {name} {ref}"
            elif lies_inside(source, output):
                problem = f"{flag} {output} holds {name} {ref}"
            else:
                continue
            raise CfiwError(problem, f"choose a path for {flag} that is not one of the inputs and holds none of them")


def guard_outputs(
    outputs: dict[str, Path], stage: str, *, directory: Path | None = None, replaces: bool = False, force: bool = False
) -> None:
    """An existing file output is replaced only when stage `stage` wrote it, and the directory
    output (`directory`) only when the stage `replaces` its own (a checkpoint trained again:
    a model or dataset that other commands may read is rebuilt with `force` alone)."""
    for flag, output in outputs.items():
        if force or not (output.exists() or output.is_symlink()):
            continue
        is_directory_output = directory is not None and same_path(output, directory)
        manifest = manifest_if_any(output)
        if is_directory_output and not output.is_dir():
            what = "is a file"
        elif not is_directory_output and output.is_dir():
            what = "is a directory"
        else:
            what = f"is not a cfiw {stage} output" if not output.is_dir() else "holds something else"
            if manifest and manifest.get("stage") == stage and (replaces or not is_directory_output):
                continue
            if manifest and output.is_dir() and manifest.get("stage") != stage:
                what = f"holds a cfiw {manifest.get('stage')} output, not a {stage} one"
            elif manifest and output.is_dir():
                what = f"holds a cfiw {stage} output made with other settings or inputs"
        raise CfiwError(
            f"{flag} {output} already exists and {what}", "pass --force to replace it, or choose another path"
        )


class OutputLocks:
    """An exclusive lock per output (`.NAME.lock` beside it) while a stage writes; the lock
    files are removed when released. A second process finds the lock taken and stops."""

    def __init__(self, outputs: list[Path]) -> None:
        self.locks: list[tuple[Path, FileLock]] = []
        for output in outputs:
            lock_path = output.parent / f".{output.name}.lock"
            lock = FileLock(str(lock_path), timeout=0)
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                lock.acquire()
            except Timeout:
                self.release()
                raise CfiwError(
                    f"another cfiw process is writing {output}", "wait for it to finish, or choose another output path"
                ) from None
            except OSError as exc:
                self.release()
                raise CfiwError(
                    f"cannot write to output directory {output.parent}: {exc.strerror or exc}",
                    "choose an output path in a writable directory",
                ) from exc
            self.locks.append((lock_path, lock))

    def release(self) -> None:
        for lock_path, lock in reversed(self.locks):
            lock_path.unlink(missing_ok=True)  # while still held: no other process can hold this file
            lock.release()
        self.locks = []


def _writes_here() -> bool:
    """Under `accelerate launch` only the main process (torchrun's RANK 0) writes outputs."""
    return os.environ.get("RANK", "0") in ("", "0")


def guard_tracking_dir(config: Any, inputs: dict[str, str | None]) -> None:
    """The tracking directory of a stage with `TrackingOptions` (train, sft) is an output like
    any other, checked before any work: not a file, not an input nor inside one (event files
    would change a model's hash), and not inside `--out` (replaced whole when the stage saves).
    It may hold inputs: it is written into, never replaced."""
    directory = tracking_directory(config)
    if directory is None:
        return
    flag = "--tracking-dir" if config.tracking_dir else "the tracking directory"
    if directory.exists() and not directory.is_dir():
        raise CfiwError(f"{flag} {directory} is a file", "pass a directory for the curves (created if missing)")
    places = {_input_flag(key): ref for key, ref in inputs.items() if ref}
    for what, ref in {**places, "the output --out": config.out}.items():
        source = Path(ref).expanduser()
        if source.is_dir() and (same_path(directory, source) or lies_inside(directory, source)):
            raise CfiwError(
                f"{flag} {directory} lies inside {what} {ref}", "pass a --tracking-dir outside the inputs and --out"
            )
    resolved = directory.expanduser().resolve()
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CfiwError(f"cannot write {flag} {directory}", "pass a --tracking-dir in a writable directory")


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
    `settings` stand in for the config; `recompute` writes it whatever its manifest says.

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
        recompute: bool = False,
    ) -> None:
        self.name, self.force, self.directory, self.replaces = name, force, directory, replaces
        self.recompute = recompute  # never up to date (a summary of parts that may have changed)
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
        return self.replaces and model is not None and same_path(Path(model), self.out)

    def __enter__(self) -> StageRun:
        self.guard_inputs()
        outputs = [p for p in self.outputs.values() if not (self.directory and lies_inside(p, self.out))]  # its lock
        self.locks = OutputLocks(outputs if _writes_here() else [])
        try:
            self._prepare()
        except BaseException:
            self.locks.release()
            raise
        return self

    def _prepare(self) -> None:
        if self.directory:
            recover_directory(self.out)  # a commit a kill interrupted is finished (or undone) first
        else:
            prepare_output(self.out)
            remove_stale_temp_files(self.out)
        if "model" in self.refs:
            self.commit = resolve_revision(self.refs["model"], self.revision)
        self.inputs = {
            key: input_record(ref, self.commit if key == "model" else None) for key, ref in self.refs.items()
        }
        compared = {k: v for k, v in self.inputs.items() if not (self.in_place and k == "model")}
        fresh = up_to_date(self.out, self.name, self.settings, compared, partial=self.in_place)
        self.up_to_date = fresh and all(p.exists() for p in self.requires) and not (self.force or self.recompute)
        if self.up_to_date:
            info(f"{self.out} is up to date (use --force to recompute)")
        else:
            self.guard_outputs()
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> bool:
        self.locks.release()
        return False

    def guard_inputs(self) -> None:
        guard_inputs(self.outputs, self.refs, in_place=self.out if self.in_place else None)

    def guard_outputs(self) -> None:
        """An existing output that is not up to date is replaced only when this stage wrote it;
        else only with --force. The checks of `guard_inputs` and these, without entering, are
        what a command that writes its output last (replay) runs first."""
        guard_outputs(
            self.outputs, self.name, directory=self.out if self.directory else None, replaces=self.replaces,
            force=self.force,
        )  # fmt: skip
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
            manifest["files"] = written_files(staging)
            keep_files_not_ours(self.out, staging, self.name)
            write_directory_manifest(staging, manifest)
        return StageResult(self.out, False, manifest["metrics"], model)


def keep_files_not_ours(out: Path, staging: Path, stage: str) -> None:
    """Files in the directory being replaced that stage `stage` did not write (its manifest
    lists what it wrote) move into the new version: a user's notes survive an update."""
    previous = read_directory_manifest(out) if out.is_dir() else None
    if not previous or previous.get("stage") != stage or not isinstance(previous.get("files"), list):
        return
    ours = set(previous["files"]) | {DIRECTORY_MANIFEST}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if not path.is_file() or str(relative) in ours or (staging / relative).exists():
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
