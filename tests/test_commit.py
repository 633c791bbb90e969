"""A staged directory is committed whole: after a kill at any moment, the next run finishes the
commit or keeps the previous directory, never a mix; standalone `train` in place resumes to
exactly the files of an uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cfiw_cli import artifacts
from cfiw_cli.artifacts import COMPLETE, PENDING, recover_directory, stage_file, staged_directory
from tests.conftest import COMPLETIONS, run_cli, write_rollouts


def _contents(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def _staged(tmp_path: Path, complete: bool) -> tuple[Path, Path]:
    """`final` holding the old version, and `<final>.tmp` holding the new one (with a file
    bound for `outside/metrics.txt`), as a kill before the swap leaves them."""
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "weights").write_text("old")
    staging = tmp_path / "ckpt.tmp"
    staging.mkdir()
    (staging / "weights").write_text("new")
    stage_file(staging, tmp_path / "outside" / "metrics.txt").write_text("new metrics")
    (tmp_path / "outside").mkdir()
    if complete:
        (staging / COMPLETE).write_text("")
    return final, tmp_path / "outside" / "metrics.txt"


def test_an_incomplete_staging_copy_is_dropped(tmp_path):
    final, metrics = _staged(tmp_path, complete=False)
    recover_directory(final)
    assert _contents(final) == {"weights": "old"} and not metrics.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "outside"]


def test_a_complete_staging_copy_is_swapped_in(tmp_path):
    final, metrics = _staged(tmp_path, complete=True)
    recover_directory(final)
    assert _contents(final) == {"weights": "new"} and metrics.read_text() == "new metrics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "outside"]


def test_a_kill_between_the_two_renames_is_finished(tmp_path):
    final, metrics = _staged(tmp_path, complete=True)
    final.rename(tmp_path / "ckpt.old")  # the first rename of the swap, then the kill
    recover_directory(final)
    assert _contents(final) == {"weights": "new"} and metrics.read_text() == "new metrics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "outside"]


def test_a_kill_after_the_swap_moves_the_staged_files_out(tmp_path):
    final, metrics = _staged(tmp_path, complete=True)
    final.rename(tmp_path / "ckpt.old")
    (tmp_path / "ckpt.tmp").rename(final)  # swapped; .complete and .pending still inside
    recover_directory(final)
    assert _contents(final) == {"weights": "new"} and metrics.read_text() == "new metrics"
    assert not (final / PENDING).exists() and not (tmp_path / "ckpt.old").exists()


def test_a_commit_without_a_kill(tmp_path):
    final = tmp_path / "ckpt"
    with staged_directory(final) as staging:
        (staging / "weights").write_text("v1")
        stage_file(staging, tmp_path / "m.txt").write_text("m1")
    assert _contents(final) == {"weights": "v1"} and (tmp_path / "m.txt").read_text() == "m1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.txt"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_model):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("commit")
    rollouts = write_rollouts(
        directory / "rollouts.parquet", AutoTokenizer.from_pretrained(tiny_model), COMPLETIONS + ["#### 1"]
    )
    return rollouts


def _train_in_place(model: Path, rollouts: Path, metrics: Path):
    return run_cli(
        "train", "--model", model, "-r", rollouts, "--weighting", "uniform", "--out", model,
        "--metrics-out", metrics, "--lr", "1e-3",
    )  # fmt: skip


def _weights(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


def _metrics(path: Path) -> list[dict]:
    return pq.read_table(path).drop_columns(["seconds"]).to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["_swap_in", "_finish_pending"])
def test_train_in_place_killed_mid_commit_resumes_to_the_uninterrupted_files(
    batch, tiny_model, tmp_path, monkeypatch, kill_at
):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(tiny_model, reference)
    shutil.copytree(tiny_model, killed)
    assert _train_in_place(reference, batch, tmp_path / "reference.parquet").exit_code == 0

    real = getattr(artifacts, kill_at)

    def killed_here(final: Path) -> None:
        """_swap_in: killed before the swap; _finish_pending: after it, before the metrics move out."""
        if kill_at == "_swap_in" or (final / PENDING).exists():
            raise KeyboardInterrupt
        real(final)

    monkeypatch.setattr(artifacts, kill_at, killed_here)
    assert _train_in_place(killed, batch, tmp_path / "killed.parquet").exit_code == 130
    monkeypatch.setattr(artifacts, kill_at, real)
    if kill_at == "_swap_in":
        assert _weights(killed) == _weights(Path(tiny_model))  # nothing of the update landed
    again = _train_in_place(killed, batch, tmp_path / "killed.parquet")
    assert again.exit_code == 0, again.stderr
    assert ("up to date" in again.stderr) == (kill_at == "_finish_pending")  # finished, not trained twice
    assert _weights(killed) == _weights(reference)
    assert _metrics(tmp_path / "killed.parquet") == _metrics(tmp_path / "reference.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "killed.parquet", "reference", "reference.parquet"]
    assert not any(p.name.startswith(".") for p in killed.iterdir())


@pytest.mark.slow
def test_training_in_place_again_on_the_same_rollouts_is_up_to_date(batch, tiny_model, tmp_path):
    model = tmp_path / "policy"
    shutil.copytree(tiny_model, model)
    assert _train_in_place(model, batch, tmp_path / "m.parquet").exit_code == 0
    trained = _weights(model)
    again = _train_in_place(model, batch, tmp_path / "m.parquet")
    assert again.exit_code == 0 and "up to date" in again.stderr
    assert _weights(model) == trained
