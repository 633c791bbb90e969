"""`cfiw validate`: does a Parquet file have the columns and types its stage needs?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfiw_cli.artifacts import infer_kind, is_parquet, read_artifact, read_manifest
from cfiw_cli.errors import CfiwError
from cfiw_cli.schemas import SCHEMAS


def check(path: Path, kind: str | None) -> tuple[str, int, dict[str, Any] | None]:
    """(kind, rows, manifest) of a valid artifact; a missing file or bad schema is a `CfiwError`."""
    if not path.exists():
        raise CfiwError(f"file not found: {path}", "check the path")
    if path.is_dir():
        raise CfiwError(
            f"{path} is a directory, not a Parquet file", "pass one artifact file, e.g. RUN/iter-0000/spans.parquet"
        )
    if not is_parquet(path):
        raise CfiwError(
            f"{path} is not a readable Parquet file", "pass an artifact written by cfiw or another Parquet writer"
        )
    manifest = read_manifest(path)
    kind = kind or infer_kind(path, manifest)
    if kind not in SCHEMAS:
        raise CfiwError(f"unknown kind {kind!r}", f"choose one of {', '.join(SCHEMAS)}")
    return kind, read_artifact(path, kind).num_rows, manifest
