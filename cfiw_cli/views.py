"""DuckDB over runs, sealed: one view per artifact kind, and no way to touch any other file.

`connect(runs)` returns an in-memory connection that sees each run directory through a
read-only filesystem of its own (`cfiwrun0://`, `cfiwrun1://`, ...), with DuckDB's local
filesystem switched off, extensions neither installed nor loaded, and the settings locked
before any view exists. So a query, whatever it says (`COPY ... TO`, `EXPLAIN ANALYZE COPY`,
`ATTACH`, `read_csv('/etc/passwd')`), can read files inside the runs and write none, and a
file name is never pasted into SQL: every path in a view is a fixed layout name
(`iter-0003/scores.parquet`) under a run's protocol, and a run's label is an escaped string.

Views: `rollouts`, `spans`, `scores`, `weights`, `train_metrics` (all iterations, with an
`iteration` column taken from the `iter-NNNN` directory), `eval`, `probe` (from
`KIND/iter-NNNN.parquet`), `replay` (`replay/replay.parquet`), `replay_weights` (the token
weights of every replayed update, `replay/MODE/iter-NNNN/weights.parquet`, with `mode` and
`iteration` columns), `gradients` (`gradients/gradients.parquet` of `cfiw gradients`) and, with
`manifests`, a
`manifests` table (`file`, `stage`, `manifest` JSON of every Parquet file under the run).
With `labels`, each view also has a `run` column naming the run it came from.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import duckdb
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from cfiw_cli.artifacts import manifest_if_any
from cfiw_cli.configs import split_mode
from cfiw_cli.errors import CfiwError
from cfiw_cli.runs import EVALUATION_KINDS, ITERATION_KINDS, iteration_of

PROTOCOL = "cfiwrun"
# Applied in this order: external access is closed while the local filesystem still answers
# (DuckDB checks its temp directory), then the local filesystem goes, then the lock.
_SEAL = (
    "set temp_directory = ''",
    "set autoinstall_known_extensions = false",
    "set autoload_known_extensions = false",
    "set allow_community_extensions = false",
    "set allowed_directories = {protocols}",
    "set enable_external_access = false",
    "set disabled_filesystems = 'LocalFileSystem'",
    "set lock_configuration = true",
)


def sql_string(text: str) -> str:
    """`text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


class ReadOnlyRun(DirFileSystem):
    """A run directory as an fsspec filesystem that reads and never writes: every path is
    resolved (links and `..` included) and must stay inside the run."""

    cachable = False
    protocol = PROTOCOL

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self._inside: set[str] = set()  # joined paths already resolved to inside the run
        super().__init__(path=self.root, fs=LocalFileSystem())

    def _join(self, path: Any) -> Any:
        joined = super()._join(path)
        for real in joined if isinstance(joined, list) else [joined]:
            if real in self._inside:
                continue
            resolved = os.path.realpath(real)
            if resolved != self.root and not resolved.startswith(self.root + os.sep):
                raise PermissionError(f"{path} lies outside the run")
            self._inside.add(real)
        return joined

    def open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if any(flag in mode for flag in "wax+"):
            raise PermissionError(f"the run is read-only: cannot write {path}")
        if mode == "rb":
            return PositionalReader(self._join(path))
        return super().open(path, mode, *args, **kwargs)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError("the run is read-only")

    rm = rm_file = _rm = delete = rmdir = _refuse
    cp_file = copy = mv = put = put_file = pipe = pipe_file = write_text = touch = _refuse
    mkdir = makedirs = _refuse


class PositionalReader:
    """A read-only binary file whose position belongs to each thread, read with `os.pread`.

    DuckDB reads a Python filesystem's file at an offset as `seek(offset)` then `read(n)`, from
    several scan threads on one handle. It holds the GIL across the pair, but Python code hands
    the GIL to another thread at its switch interval, so with an ordinary file another thread's
    seek can land between them and the read returns bytes from elsewhere in the file (DuckDB then
    fails with "Out of buffer" or a Thrift error, or reads wrong values). Here each thread's
    seek moves only its own position, and a read at a position is one system call."""

    def __init__(self, path: str) -> None:
        self.name, self.closed = path, True  # until the file is open
        self._fd = os.open(path, os.O_RDONLY)
        self.closed = False
        self._size = os.fstat(self._fd).st_size
        self._local = threading.local()

    @property
    def _position(self) -> int:
        return getattr(self._local, "position", 0)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._local.position = base + offset
        return self._local.position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        start = self._position
        wanted = max(0, self._size - start) if size is None or size < 0 else size
        chunks, done = [], 0
        while done < wanted:
            chunk = os.pread(self._fd, wanted - done, start + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        self._local.position = start + done
        return b"".join(chunks)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def __enter__(self) -> PositionalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _filesystem(index: int, root: Path) -> ReadOnlyRun:
    """Run `index`'s filesystem: DuckDB tells filesystems apart by their protocol."""
    cls = type(f"ReadOnlyRun{index}", (ReadOnlyRun,), {"protocol": f"{PROTOCOL}{index}"})
    return cls(root)


def labels_of(runs: list[Path]) -> list[str]:
    """A label per run: its directory name, or where two runs share a name, as many trailing
    path components as tell them apart. The same directory passed twice is an error."""
    resolved = [run.resolve() for run in runs]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            first = runs[resolved.index(path)]
            raise CfiwError(f"the run {runs[index]} is passed twice (as {first} too)", "pass each run directory once")
    depth = 1
    while depth < max(len(p.parts) for p in resolved):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [str(p) for p in resolved]


def connect(runs: list[Path], *, labels: list[str] | None = None, manifests: bool = False) -> Any:
    """A sealed connection over `runs` with their views (see the module docstring); `labels`
    adds a `run` column. A file the views cannot read is a `CfiwError`."""
    con = duckdb.connect()
    protocols = []
    for index, run in enumerate(runs):
        con.register_filesystem(_filesystem(index, run))
        protocols.append(f"{PROTOCOL}{index}://")
    for statement in _SEAL:
        con.execute(statement.format(protocols="[" + ", ".join(map(sql_string, protocols)) + "]"))
    try:
        create_views(con, runs, labels)
    except duckdb.Error as exc:
        raise CfiwError(
            f"cannot read the run's files: {message_of(exc)}",
            "check each file with `cfiw validate FILE` (a killed copy or a foreign file?)",
        ) from exc
    if manifests:
        _create_manifests(con, runs)
    return con


def has_view(con: Any, name: str) -> bool:
    """Whether the connection holds a table or view of that name (a run without that artifact has none)."""
    query = "select count(*) from information_schema.tables where table_name = ?"
    return bool(con.execute(query, [name]).fetchall()[0][0])


def has_column(con: Any, view: str, column: str) -> bool:
    return any(row[0] == column for row in con.execute(f"describe {view}").fetchall())


def message_of(exc: BaseException) -> str:
    """The one line of a DuckDB error that says what went wrong (an error raised by the
    Python filesystem arrives as a traceback: its last line)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Traceback") or "Traceback (most recent call last)" in lines[0]:
        return next((line for line in reversed(lines) if "Error" in line.split(":")[0]), lines[-1])
    return lines[0]


def _is_mode(name: str) -> bool:
    """A replay cell directory: a weighting mode, perhaps with its floor (`cfiw@0`)."""
    try:
        split_mode(name)
    except CfiwError:
        return False
    return True


def layout_files(run: Path, kind: str) -> list[str]:
    """The run's files of one kind, as paths under its protocol: only names of the layout
    (`iter-NNNN/KIND.parquet`, `KIND/iter-NNNN.parquet`, `replay/replay.parquet`)."""
    if kind in ITERATION_KINDS:
        found = [f"{d.name}/{kind}.parquet" for d in run.glob("iter-*") if iteration_of(d.name) is not None]
    elif kind in EVALUATION_KINDS:
        found = [f"{kind}/{f.name}" for f in run.glob(f"{kind}/iter-*.parquet") if iteration_of(f.stem) is not None]
    elif kind == "replay_weights":
        found = [
            f"replay/{d.parent.name}/{d.name}/weights.parquet"
            for d in run.glob("replay/*/iter-*")
            if iteration_of(d.name) is not None and _is_mode(d.parent.name)
        ]
    elif kind == "gradients":
        found = ["gradients/gradients.parquet"]
    else:
        found = ["replay/replay.parquet"]
    return sorted(name for name in found if (run / name).is_file())


def _union(con: Any, name: str, runs: list[Path], labels: list[str] | None, kind: str, select: str) -> None:
    """`create view name` as the union, by column name, of `select` over each run's files of
    `kind` (`{source}`: its read_parquet; `{run}`: its label column, or nothing)."""
    parts = []
    for index, run in enumerate(runs):
        files = layout_files(run, kind)
        if not files:
            continue
        paths = ", ".join(sql_string(f"{PROTOCOL}{index}://{f}") for f in files)
        source = f"read_parquet([{paths}], filename = true, union_by_name = true)"
        label = f", {sql_string(labels[index])} as run" if labels is not None else ""
        parts.append(select.format(source=source, run=label))
    if parts:
        con.execute(f"create view {name} as " + " union all by name ".join(parts))


def create_views(con: Any, runs: list[Path], labels: list[str] | None = None) -> None:
    iteration = "cast(regexp_extract(filename, 'iter-(\\d+)/', 1) as integer) as iteration"
    for kind in ITERATION_KINDS:
        if kind == "rollouts" and labels is None:  # rollouts carry their own iteration column
            select = "select * exclude (filename) from {source}"
        elif kind == "rollouts":
            select = f"select * exclude (filename, iteration){{run}}, {iteration} from {{source}}"
        else:
            select = (
                f"select * exclude (filename, iteration){{run}}, {iteration} "
                "from (select *, null::integer as iteration from {source})"
            )
        _union(con, kind, runs, labels, kind, select)
    evaluated = "cast(regexp_extract(filename, 'iter-(\\d+)\\.parquet', 1) as integer) as iteration"
    for kind in EVALUATION_KINDS:
        select = (
            f"select * exclude (filename, iteration){{run}}, {evaluated} "
            "from (select *, null::integer as iteration from {source})"
        )
        _union(con, kind, runs, labels, kind, select)
    _union(con, "replay", runs, labels, "replay", "select * exclude (filename){run} from {source}")
    replayed = (
        "select * exclude (filename){run}, regexp_extract(filename, 'replay/([^/]+)/iter-', 1) as mode, "
        f"{iteration} from {{source}}"
    )
    _union(con, "replay_weights", runs, labels, "replay_weights", replayed)
    _union(con, "gradients", runs, labels, "gradients", "select * exclude (filename){run} from {source}")


def _create_manifests(con: Any, runs: list[Path]) -> None:
    """`manifests(file, stage, manifest)`: read here from each file's footer (an unreadable or
    foreign file has nulls), so no file name reaches SQL."""
    rows = []
    for run in runs:
        root = os.path.realpath(run)
        for path in sorted(run.rglob("*.parquet")):
            if not os.path.realpath(path).startswith(root + os.sep):
                continue  # a link out of the run
            manifest = manifest_if_any(path) if path.is_file() else None
            stage = manifest.get("stage") if manifest else None
            rows.append((str(path), stage, json.dumps(manifest) if manifest is not None else None))
    con.execute("create table manifests (file varchar, stage varchar, manifest varchar)")
    if rows:
        con.executemany("insert into manifests values (?, ?, ?)", rows)
