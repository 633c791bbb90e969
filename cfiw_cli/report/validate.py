"""`cfiw validate`: does a Parquet file have the columns and types its stage needs?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cfiw_cli.artifacts import infer_kind, read_artifact, read_manifest
from cfiw_cli.errors import CfiwError
from cfiw_cli.schemas import SCHEMAS


def check(path: Path, kind: str | None) -> tuple[str, int, dict[str, Any] | None]:
    """(kind, rows, manifest) of a valid artifact; a missing file or bad schema is a `CfiwError`."""
    if not path.exists():
        raise CfiwError(f"file not found: {path}", "check the path")
    manifest = read_manifest(path)
    kind = kind or infer_kind(path, manifest)
    if kind not in SCHEMAS:
        raise CfiwError(f"unknown kind {kind!r}", f"choose one of {', '.join(SCHEMAS)}")
    return kind, read_artifact(path, kind).num_rows, manifest
