"""`cfiw sql`: DuckDB over every artifact of a run, one view per artifact kind, read-only.

Views: `rollouts`, `spans`, `scores`, `weights`, `train_metrics` (all iterations, with an
`iteration` column taken from the `iter-NNNN` directory), `eval` (from `eval/iter-NNNN.parquet`),
`probe` (from `probe/iter-NNNN.parquet`), `replay` (`replay/replay.parquet` of `cfiw replay`),
`replay_weights`, `gradients` (`gradients/gradients.parquet` of `cfiw gradients`) and
`manifests` (`file`, `stage`, `manifest` JSON of every Parquet file of the run).

Two walls keep a query from changing anything. The statement must be one that reads: DuckDB's
parser classes it as SELECT, or as an EXPLAIN of a SELECT (`EXPLAIN ANALYZE` runs what it
explains, so what it explains is checked too). And the connection itself cannot write: it sees
the run through a read-only filesystem and nothing else (`cfiw_cli.views`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.table import Table

from cfiw_cli.errors import CfiwError
from cfiw_cli.views import connect as connect_views
from cfiw_cli.views import message_of

FORMATS = ("table", "csv", "json")


def connect(run: str | Path, manifests: bool = True) -> Any:
    """A sealed in-memory DuckDB connection with the run's views (and the manifests table,
    which reads every file's footer: `query` builds it only for a query that names it)."""
    run = Path(run)
    if not run.is_dir():
        what = "is a file, not a run directory" if run.exists() else "not found"
        raise CfiwError(f"run directory {what}: {run}", "pass a directory such as runs/NAME")
    try:
        return connect_views([run], manifests=manifests)
    except CfiwError as exc:
        raise CfiwError(f"query failed: {exc.message}", exc.hint) from exc


_EXPLAIN = re.compile(r"^\s*explain\s+(analyze\s+)?", re.IGNORECASE)


def statement_kind(con: Any, sql: str) -> str:
    """DuckDB's class of the one statement in `sql`; for an EXPLAIN, `EXPLAIN <class of what it
    explains>`, so `EXPLAIN ANALYZE COPY ...` is not mistaken for a read."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise CfiwError(f"query failed: {message_of(exc)}", "check the SQL syntax") from exc
    if len(statements) != 1:
        raise CfiwError(f"cfiw sql runs one statement, not {len(statements)}", "pass a single select query")
    kind = statements[0].type.name
    if kind != "EXPLAIN":
        return kind
    inner = _EXPLAIN.sub("", statements[0].query, count=1)
    # what cannot be peeled (a comment between the words, say) stays EXPLAIN: refused below
    return "EXPLAIN " + (statement_kind(con, inner) if inner != statements[0].query else "EXPLAIN")


READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN SELECT")


def query(run: str | Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Columns and rows of one read-only statement over the run's views."""
    con = connect(run, manifests="manifests" in sql.lower())
    kind = statement_kind(con, sql)
    if kind not in READ_ONLY_STATEMENTS:
        raise CfiwError(
            f"cfiw sql is read-only: {'an' if kind[0] in 'AEIOU' else 'a'} {kind} statement is refused",
            "query the views with select; write results with --format csv > FILE",
        )
    try:
        result = con.execute(con.extract_statements(sql)[0])
    except duckdb.Error as exc:
        names = "select table_name from information_schema.tables where table_schema = 'main'"
        views = sorted({row[0] for row in con.execute(names).fetchall()} | {"manifests"})
        raise CfiwError(f"query failed: {message_of(exc)}", f"this run's views: {', '.join(views) or 'none'}") from exc
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
