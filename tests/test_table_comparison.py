"""The helper that compares two runs' tables: every column exact, floats to 1e-4 absolute or 1e-5 relative."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import assert_same_tables


def write_run(run: Path, values: list[float], per_token: list[list[float]], names: list[str]) -> Path:
    run.mkdir()
    table = pa.table(
        {
            "value": pa.array(values, pa.float32()),
            "per_token": pa.array(per_token, pa.list_(pa.float32())),
            "name": names,
        }
    )
    pq.write_table(table, run / "t.parquet")
    return run


def test_floats_may_differ_in_their_last_bits_only(tmp_path):
    # .4428029 and .44280338: one score's delta in two processes, 5e-7 apart
    want = write_run(tmp_path / "a", [1.0, 0.4428029], [[1.0], [2.0, 3.0]], ["x", "y"])
    assert_same_tables(want, write_run(tmp_path / "b", [1.0, 0.44280338], [[1.0], [2.0, 3.0000002]], ["x", "y"]))
    for run, values, per_token, names in [
        ("value", [1.0, 0.4431], [[1.0], [2.0, 3.0]], ["x", "y"]),  # 3e-4 apart: a real difference
        ("per-token", [1.0, 0.4428029], [[1.0], [2.0, 3.01]], ["x", "y"]),
        ("lengths", [1.0, 0.4428029], [[1.0, 2.0], [3.0]], ["x", "y"]),  # same values, other rows
        ("names", [1.0, 0.4428029], [[1.0], [2.0, 3.0]], ["x", "z"]),
    ]:
        with pytest.raises(AssertionError):
            assert_same_tables(want, write_run(tmp_path / run, values, per_token, names))
