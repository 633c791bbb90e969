"""A staged directory is committed whole: after a kill at any moment, the next run finishes the
commit or keeps the previous directory, never a mix; standalone `train` in place resumes to
exactly the files of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cfiw_cli import artifacts
from cfiw_cli.artifacts import COMPLETE, PENDING, recover_directory, stage_file, staged_directory
from tests.conftest import COMPLETIONS, assert_same_tables, run_cli, write_rollouts


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
    """A second update of a train checkpoint, in place (another seed than the first's, so that
    it is not up to date)."""
    return run_cli(
        "train", "--model", model, "-r", rollouts, "--weighting", "uniform", "--out", model,
        "--metrics-out", metrics, "--lr", "1e-3", "--seed", "1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(batch, tiny_model, tmp_path_factory) -> Path:
    """A checkpoint `cfiw train` wrote (only such a directory is updated in place)."""
    out = tmp_path_factory.mktemp("checkpoint") / "policy"
    done = run_cli("train", "--model", tiny_model, "-r", batch, "--weighting", "uniform", "--out", out, "--lr", "1e-3")
    assert done.exit_code == 0, done.stderr
    return out


def _weights(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


def _metrics(path: Path) -> list[dict]:
    return pq.read_table(path).drop_columns(["seconds"]).to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["_swap_in", "between_renames", "_finish_pending"])
def test_train_in_place_killed_mid_commit_resumes_to_the_uninterrupted_files(
    batch, checkpoint, tmp_path, monkeypatch, kill_at
):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(checkpoint, reference)
    shutil.copytree(checkpoint, killed)
    assert _train_in_place(reference, batch, tmp_path / "reference.parquet").exit_code == 0
    real = artifacts._finish_pending if kill_at == "_finish_pending" else artifacts._swap_in

    def killed_here(final: Path) -> None:
        """_swap_in: killed before the swap; between_renames: after `final` -> `final.old`, before
        `final.tmp` -> `final` (so `--model` does not exist); _finish_pending: after the swap,
        before the metrics move out."""
        if kill_at == "between_renames":
            final.rename(final.with_name(final.name + ".old"))
            shutil.copytree(final.with_name(final.name + ".tmp"), tmp_path / "staged")  # a SIGKILL leaves it
        if kill_at != "_finish_pending" or (final / PENDING).exists():
            raise KeyboardInterrupt
        real(final)

    monkeypatch.setattr(artifacts, "_finish_pending" if kill_at == "_finish_pending" else "_swap_in", killed_here)
    assert _train_in_place(killed, batch, tmp_path / "killed.parquet").exit_code == 130
    monkeypatch.setattr(artifacts, "_finish_pending" if kill_at == "_finish_pending" else "_swap_in", real)
    if kill_at == "_swap_in":
        assert _weights(killed) == _weights(checkpoint)  # nothing of the update landed
    if kill_at == "between_renames":
        (tmp_path / "staged").rename(tmp_path / "killed.tmp")  # the interrupt's clean-up removed it; a kill would not
        assert not killed.exists() and (tmp_path / "killed.old").is_dir()
    again = _train_in_place(killed, batch, tmp_path / "killed.parquet")
    assert again.exit_code == 0, again.stderr
    assert ("up to date" in again.stderr) == (kill_at != "_swap_in")  # finished, not trained twice
    assert _weights(killed) == _weights(reference)
    assert _metrics(tmp_path / "killed.parquet") == _metrics(tmp_path / "reference.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "killed.parquet", "reference", "reference.parquet"]
    assert not any(p.name.startswith(".") for p in killed.iterdir())


@pytest.mark.slow
def test_training_in_place_again_on_the_same_rollouts_is_up_to_date(batch, checkpoint, tmp_path):
    model = tmp_path / "policy"
    shutil.copytree(checkpoint, model)
    assert _train_in_place(model, batch, tmp_path / "m.parquet").exit_code == 0
    trained = _weights(model)
    again = _train_in_place(model, batch, tmp_path / "m.parquet")
    assert again.exit_code == 0 and "up to date" in again.stderr
    assert _weights(model) == trained


LOOP_CONFIG = """\
[model]
id = "{policy}"
[data]
dataset = "{task}"
[loop]
iterations = 2
questions = 8
eval_every = 100
eval_limit = 4
probe_questions = 0
seed = 0
[rollout]
group_size = 8
max_new_tokens = 16
batch_size = 128
[train]
lr = 1e-3
minibatches = 2
"""


@pytest.fixture(scope="module")
def loop_config(sharpening_task, tmp_path_factory) -> Path:
    policy, task = sharpening_task
    path = tmp_path_factory.mktemp("loop-commit") / "loop.toml"
    path.write_text(LOOP_CONFIG.format(policy=policy, task=task))
    return path


@pytest.fixture(scope="module")
def uninterrupted_loop(loop_config) -> Path:
    run = loop_config.parent / "uninterrupted"
    done = run_cli("loop", "--config", loop_config, "--run", run)
    assert done.exit_code == 0, done.stderr
    return run


def _global_step(run: Path) -> int:
    return json.loads((run / "policy" / "trainer_state.json").read_text())["global_step"]


def _assert_same_run(expected: Path, got: Path) -> None:
    assert_same_tables(expected, got)
    assert _weights(got / "policy") == _weights(expected / "policy")
    assert _global_step(got) == _global_step(expected)
    assert json.loads((got / "loop_state.json").read_text()) == {"completed": 2}
    assert not [p.name for p in got.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["before_the_state", "between_the_policy_renames"])
def test_a_loop_killed_in_its_commit_window_does_not_train_twice(
    loop_config, uninterrupted_loop, tmp_path, monkeypatch, kill_at
):
    """Killed after iteration 1's policy commit and before loop_state.json is replaced (a stale
    temp file of the state left behind), or between the two renames of policy/'s swap: the
    rerun recognises the committed policy and ends with the files of an uninterrupted run."""
    from cfiw_cli.pipeline import loop

    run = tmp_path / "killed"
    real_write, real_swap = loop.write_text_atomic, artifacts._swap_in
    commits = []

    def write_state(path: Path, text: str) -> None:
        if path.name == "loop_state.json" and json.loads(text) == {"completed": 2}:
            (path.parent / ".loop_state.json.k1ll3d.tmp").write_text(text[:5])  # mid-replace
            raise KeyboardInterrupt
        real_write(path, text)

    def swap(final: Path) -> None:
        commits.append(final.name)
        if final.name == "policy" and commits.count("policy") == 2:  # iteration 1's update
            final.rename(final.with_name("policy.old"))
            shutil.copytree(final.with_name("policy.tmp"), tmp_path / "staged")  # what a kill leaves
            raise KeyboardInterrupt
        real_swap(final)

    if kill_at == "before_the_state":
        monkeypatch.setattr(loop, "write_text_atomic", write_state)
    else:
        monkeypatch.setattr(artifacts, "_swap_in", swap)
    assert run_cli("loop", "--config", loop_config, "--run", run).exit_code == 130
    monkeypatch.undo()
    if kill_at == "between_the_policy_renames":
        (tmp_path / "staged").rename(run / "policy.tmp")
        assert not (run / "policy").exists()
    assert json.loads((run / "loop_state.json").read_text()) == {"completed": 1}  # the state is one behind
    again = run_cli("loop", "--config", loop_config, "--run", run)
    assert again.exit_code == 0, again.stderr
    assert "iteration 1: rollout" not in again.stderr  # iteration 1 is not sampled (nor trained) again
    _assert_same_run(uninterrupted_loop, run)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["kill", "full_disk"])
def test_analyze_replaces_its_report_whole_or_not_at_all(uninterrupted_loop, tmp_path, monkeypatch, failure):
    """The report is built beside --out and swapped in: killed, or out of disk space, mid-write,
    the earlier report stays byte for byte and nothing half-written is left."""
    import errno

    from cfiw_cli.report import analyze

    out = tmp_path / "report"
    assert run_cli("analyze", uninterrupted_loop, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        if failure == "kill":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "curves.parquet"))

    monkeypatch.setattr(analyze, "_write_curves", fail)  # after the JSON tables, before plots and HTML
    done = run_cli("analyze", uninterrupted_loop, "--out", out)
    assert done.exit_code == (130 if failure == "kill" else 1)
    if failure == "full_disk":
        assert "no space left" in done.stderr and "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
