"""`cfiw sql`: DuckDB over every artifact of a run, one view per artifact kind.

Views: `rollouts`, `spans`, `scores`, `weights`, `train_metrics` (all iterations, with an
`iteration` column taken from the `iter-NNNN` directory), `eval` (from `eval/iter-NNNN.parquet`),
`probe` (from `probe/iter-NNNN.parquet`), `replay` (`replay/replay.parquet` of `cfiw replay`) and `manifests` (`file`, `stage`, `manifest` JSON of every Parquet file of the run).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cfiw_cli.errors import CfiwError

KINDS = ("rollouts", "spans", "scores", "weights", "train_metrics")
FORMATS = ("table", "csv", "json")


def connect(run: str | Path) -> Any:
    """An in-memory DuckDB connection with the run's views."""
    import duckdb

    run = Path(run)
    if not run.is_dir():
        raise CfiwError(f"run directory not found: {run}", "pass a directory such as runs/NAME")
    con = duckdb.connect()
    for kind in KINDS:
        files = sorted(run.glob(f"iter-*/{kind}.parquet"))
        if files:
            con.execute(_view(kind, [str(f) for f in files], "regexp_extract(filename, 'iter-(\\d+)', 1)"))
    for kind in ("eval", "probe"):
        evals = sorted(run.glob(f"{kind}/iter-*.parquet"))
        if evals:
            con.execute(_view(kind, [str(f) for f in evals], "regexp_extract(filename, 'iter-(\\d+)\\.parquet', 1)"))
    if (run / "replay" / "replay.parquet").exists():
        con.execute(f"create view replay as select * from read_parquet('{run / 'replay' / 'replay.parquet'}')")
    every = sorted(str(f) for f in run.rglob("*.parquet"))
    if every:
        listing = ", ".join(f"'{f}'" for f in every)
        con.execute(
            "create view manifests as select file_name as file, json_extract_string(decode(value), '$.stage') as stage, "
            f"decode(value) as manifest from parquet_kv_metadata([{listing}]) where decode(key) = 'cfiw'"
        )
    return con


def _view(name: str, files: list[str], iteration_expr: str) -> str:
    listing = ", ".join(f"'{f}'" for f in files)
    source = f"read_parquet([{listing}], filename = true, union_by_name = true)"
    return (
        f"create view {name} as select * exclude (filename, iteration), cast({iteration_expr} as integer) as iteration from "
        f"(select *, null::integer as iteration from {source})"
        if name != "rollouts"
        else f"create view {name} as select * exclude (filename) from {source}"
    )


def query(run: str | Path, sql: str) -> tuple[list[str], list[tuple]]:
    import duckdb

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
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, show_lines=False)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(table)
    return buffer.getvalue()
