"""`--report-to tensorboard`: live curves written offline, read back as TensorBoard reads them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cfiw_cli.errors import CfiwError
from cfiw_cli.tracking import Tracker, check_report_to

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the event files in `directory`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tracker_writes_scalars_tensorboard_reads_back(tmp_path):
    tracker = Tracker("tensorboard", tmp_path / "tb", "unit")
    tracker.log({"train/loss": 0.5, "train/kl": 0.25, "label": "text", "nan": float("nan"), "flag": True}, step=3)
    tracker.log({"train/loss": 0.25}, step=4)
    tracker.close()
    # only finite numbers are curves; strings, booleans and NaN are left out
    assert scalars(tmp_path / "tb") == {"train/loss": [(3, 0.5), (4, 0.25)], "train/kl": [(3, 0.25)]}


def test_a_missing_tracker_package_is_an_error_before_any_work(cli, tmp_path):
    with pytest.raises(CfiwError, match="unknown --report-to .nope."):
        check_report_to("nope")
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here, so --report-to wandb is not an error")
    result = cli("loop", "--preset", "tiny", "--run", tmp_path / "run", "--report-to", "wandb")
    assert result.exit_code == 1
    assert (
        result.stderr.startswith("Error: --report-to wandb needs the wandb package")
        and "pip install wandb" in result.stderr
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_loop_train_and_sft_curves(tiny_model, mini_dataset, tmp_path):
    run = tmp_path / "run"
    argv = [BIN / "cfiw", "loop", "--preset", "tiny", "--run", run, "--model", tiny_model, "--iterations", "2"]
    argv += ["--eval-every", "1"]
    small = ["loop.questions=8", "rollout.group_size=4", "rollout.max_new_tokens=32", "loop.eval_limit=8"]
    small += ["loop.probe_questions=4", "loop.probe_samples=2"]
    # the random model earns no reward: keep its groups (and score them), so steps run
    small += ["train.dynamic_sampling=false", "score.groups=all"]
    argv += [word for value in small for word in ("--set", value)] + ["--report-to", "tensorboard"]
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    curves = scalars(run / "tracking")

    # every optimizer step of both updates, at its step, with the values of train_metrics
    rows = [r for i in (0, 1) for r in pq.read_table(run / f"iter-000{i}" / "train_metrics.parquet").to_pylist()]
    for name in ("loss", "kl", "entropy", "clip_frac_low", "clip_frac_high", "grad_norm", "weight_mean"):
        assert curves[f"train/{name}"] == [(r["step"], pytest.approx(r[name])) for r in rows]
    # rollout reward, greedy accuracy and the probe at the optimizer step they were measured at
    manifest = json.loads(pq.read_schema(run / "iter-0001" / "rollouts.parquet").metadata[b"cfiw"])
    steps_after_first = rows[len(rows) // 2 - 1]["step"]
    assert curves["rollout/mean_reward"][1] == (steps_after_first, pytest.approx(manifest["metrics"]["mean_reward"]))
    assert [step for step, _ in curves["eval/accuracy"]] == [0, steps_after_first, rows[-1]["step"]]
    assert len(curves["probe/accuracy"]) == 3
    for stage in ("rollout", "segment", "score", "train", "eval", "probe"):
        assert all(seconds > 0 for _, seconds in curves[f"time/{stage}_seconds"])

    # a separate update: its steps, beside its --out
    policy = tmp_path / "solo" / "policy"
    iteration = run / "iter-0000"
    train = [BIN / "cfiw", "train", "--model", tiny_model, "--rollouts", iteration / "rollouts.parquet"]
    train += ["--spans", iteration / "spans.parquet", "--scores", iteration / "scores.parquet", "--out", policy]
    train += ["--no-dynamic-sampling"]
    done = subprocess.run([str(a) for a in [*train, "--report-to", "tensorboard"]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    solo = pq.read_table(policy / "train_metrics.parquet").to_pylist()
    assert scalars(tmp_path / "solo" / "tracking")["train/loss"] == [
        (r["step"], pytest.approx(r["loss"])) for r in solo
    ]

    # the warm start's logged loss, at its steps
    sft = [BIN / "cfiw", "sft", "--model", tiny_model, "--dataset", mini_dataset, "--out", tmp_path / "sft" / "model"]
    sft += ["--steps", "4", "--batch-size", "4", "--max-length", "256", "--report-to", "tensorboard"]
    done = subprocess.run([str(a) for a in sft], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = scalars(tmp_path / "sft" / "tracking")["sft/loss"]
    history = json.loads((tmp_path / "sft" / "model" / "cfiw_manifest.json").read_text())["metrics"]["loss_curve"]
    assert losses == [(h["step"], pytest.approx(h["loss"])) for h in history]
