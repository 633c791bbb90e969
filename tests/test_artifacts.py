"""Atomic Parquet writes, footer manifests (also read from DuckDB), schema checks, up-to-date skips."""

import json

import duckdb
import pyarrow as pa
import pytest

from cfiw_cli.artifacts import (
    build_manifest,
    input_record,
    prepare_output,
    read_artifact,
    read_manifest,
    sha256_of,
    up_to_date,
    write_table,
)
from cfiw_cli.errors import CfiwError
from cfiw_cli.schemas import SCHEMAS, validate


def scores_table(n=3):
    return pa.table(
        {
            "rollout_id": [f"0:p-{i}:0" for i in range(n)],
            "span_idx": pa.array(range(n), pa.int32()),
            "mask": ["pad"] * n,
            "base_logp": pa.array([-1.0] * n, pa.float32()),
            "masked_logp": pa.array([-2.0] * n, pa.float32()),
            "delta": pa.array([1.0] * n, pa.float32()),
        }
    )


def test_manifest_round_trip_and_duckdb(tmp_path):
    path = tmp_path / "scores.parquet"
    manifest = build_manifest(
        "score", {"mask": "pad"}, {"rollouts": {"path": "r", "sha256": "abc"}}, rows=3, seconds=0.5, seed=7
    )
    write_table(scores_table(), path, manifest)
    assert read_manifest(path) == json.loads(json.dumps(manifest))
    for key in (
        "stage",
        "version",
        "git_commit",
        "config",
        "seed",
        "inputs",
        "rows",
        "wall_seconds",
        "libraries",
        "device",
    ):
        assert key in manifest
    raw = duckdb.sql(f"select value from parquet_kv_metadata('{path}') where key = 'cfiw'").fetchall()[0][0]
    assert json.loads(raw)["stage"] == "score"
    assert duckdb.sql(f"select sum(delta) from '{path}'").fetchall()[0][0] == 3.0
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pq, "write_table", explode)
    with pytest.raises(RuntimeError):
        write_table(scores_table(), tmp_path / "scores.parquet", {})
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    path = tmp_path / "scores.parquet"
    write_table(scores_table(2), path, {"stage": "score"})
    monkeypatch.setattr(pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        write_table(scores_table(5), path, {"stage": "score"})
    monkeypatch.undo()
    assert read_artifact(path, "scores").num_rows == 2
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "scores.parquet"
    write_table(scores_table().drop(["delta"]), path, {})
    with pytest.raises(CfiwError, match="no column 'delta'"):
        read_artifact(path, "scores")


def test_mistyped_column_is_named():
    table = scores_table().set_column(1, "span_idx", pa.array(["a", "b", "c"]))
    with pytest.raises(CfiwError, match="column 'span_idx'.*string.*int32"):
        validate(table, "scores")


def test_safe_casts_and_extra_columns_are_kept():
    table = (
        scores_table()
        .set_column(1, "span_idx", pa.array([0, 1, 2], pa.int64()))
        .append_column("note", pa.array(["x"] * 3))
    )
    checked = validate(table, "scores")
    assert checked.schema.field("span_idx").type == pa.int32()
    assert "note" in checked.column_names


def test_every_schema_validates_its_own_empty_table():
    for kind, schema in SCHEMAS.items():
        assert validate(schema.empty_table(), kind).num_rows == 0


def test_up_to_date_needs_same_stage_config_and_inputs(tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("a")
    inputs = {"data": input_record(str(data))}
    path = tmp_path / "scores.parquet"
    assert not up_to_date(path, "score", {"k": 1}, inputs)
    write_table(scores_table(), path, build_manifest("score", {"k": 1}, inputs, rows=3, seconds=0))
    assert up_to_date(path, "score", {"k": 1}, inputs)
    assert not up_to_date(path, "score", {"k": 2}, inputs)
    assert not up_to_date(path, "rollout", {"k": 1}, inputs)
    data.write_text("b")
    assert not up_to_date(path, "score", {"k": 1}, {"data": input_record(str(data))})


def test_directory_hash_changes_with_any_file(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("2")
    before = sha256_of(tmp_path)
    (tmp_path / "sub" / "b").write_text("3")
    assert sha256_of(tmp_path) != before


def test_prepare_output_rejects_unwritable_places(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CfiwError, match="cannot write"):
        prepare_output(blocker / "out.parquet")
    with pytest.raises(CfiwError, match="is a directory"):
        prepare_output(tmp_path)
    assert prepare_output(tmp_path / "new" / "x.parquet").parent.is_dir()
