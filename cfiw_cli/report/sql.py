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
    """An in-memory DuckDB connection with the run's views."""

    run = Path(run)
    if not run.is_dir():
        raise CfiwError(f"run directory not found: {run}", "pass a directory such as runs/NAME")
    con = duckdb.connect()
    create_views(con, [run], run_column=False)
    every = sorted(str(f) for f in run.rglob("*.parquet"))
    if every:
        listing = ", ".join(f"'{f}'" for f in every)
        con.execute(
            "create view manifests as select file_name as file, json_extract_string(decode(value), '$.stage') as "
            "stage, "
            f"decode(value) as manifest from parquet_kv_metadata([{listing}]) where decode(key) = 'cfiw'"
        )
    return con


def query(run: str | Path, sql: str) -> tuple[list[str], list[tuple]]:

    con = connect(run)
    try:
        result = con.execute(sql)
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
