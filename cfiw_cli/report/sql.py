"""`cfiw sql`: DuckDB over every artifact of a run, one view per artifact kind.

Views: `rollouts`, `spans`, `scores`, `weights`, `train_metrics` (all iterations, with an
`iteration` column taken from the `iter-NNNN` directory), `eval` (from `eval/iter-NNNN.parquet`),
`probe` (from `probe/iter-NNNN.parquet`), `replay` (`replay/replay.parquet` of `cfiw replay`)
and `manifests` (`file`, `stage`, `manifest` JSON of every Parquet file of the run). The
views are `cfiw_cli.runs.create_views` over this one run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.table import Table

from cfiw_cli.errors import CfiwError
from cfiw_cli.runs import create_views

FORMATS = ("table", "csv", "json")


def connect(run: str | Path) -> Any:
    """An in-memory DuckDB connection with the run's views, sealed: it reads files under the
    run directory only, writes none, loads no extension, and its settings are locked."""
    run = Path(run)
    if not run.is_dir():
        raise CfiwError(f"run directory not found: {run}", "pass a directory such as runs/NAME")
    con = duckdb.connect()
    try:
        create_views(con, [run], run_column=False)
        every = sorted(str(f) for f in run.rglob("*.parquet"))
        if every:
            listing = ", ".join(f"'{f}'" for f in every)
            con.execute(
                "create view manifests as select file_name as file, json_extract_string(decode(value), '$.stage') "
                "as stage, "
                f"decode(value) as manifest from parquet_kv_metadata([{listing}]) where decode(key) = 'cfiw'"
            )
    except duckdb.Error as exc:
        raise CfiwError(
            f"query failed: cannot read the run's files: {str(exc).strip().splitlines()[0]}",
            "check each file with `cfiw validate FILE` (a killed copy or a foreign file?)",
        ) from exc
    con.execute("set allowed_directories = ?", [[str(run) + "/", str(run.resolve()) + "/"]])
    con.execute("set enable_external_access = false")  # no file outside the run, no extension
    con.execute("set lock_configuration = true")  # and the query cannot undo either
    return con


# DuckDB's own parser classifies the statement; a query is one statement that reads.
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def query(run: str | Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Columns and rows of one read-only statement over the run's views."""
    con = connect(run)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise CfiwError(f"query failed: {str(exc).strip().splitlines()[0]}", "check the SQL syntax") from exc
    if len(statements) != 1:
        raise CfiwError(f"cfiw sql runs one statement, not {len(statements)}", "pass a single select query")
    kind = statements[0].type.name
    if kind not in READ_ONLY_STATEMENTS:
        raise CfiwError(
            f"cfiw sql is read-only: a {kind} statement is refused",
            "query the views with select; write results with --format csv > FILE",
        )
    try:
        result = con.execute(statements[0])
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        views = [
            row[0]
            for row in con.execute("select view_name from duckdb_views() where not internal order by 1").fetchall()
        ]
        raise CfiwError(f"query failed: {first}", f"this run's views: {', '.join(views) or 'none'}") from exc
    columns = [d[0] for d in result.description or []]
    return columns, result.fetchall()


def render(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt not in FORMATS:
        raise CfiwError(f"unknown --format {fmt!r}", "choose table, csv or json")
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "json":
        return json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str, indent=2) + "\n"

    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(table)
    return buffer.getvalue()
