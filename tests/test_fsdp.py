"""`cfiw train` under an accelerate FSDP setting (ACCELERATE_USE_FSDP=true), two CPU processes
with gloo: the saved checkpoint holds the gathered full parameters and a one-process optimizer
state, both equal to a one-process update's, and it resumes, sharded or not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FSDP = {**os.environ, "ACCELERATE_USE_FSDP": "true"}
# micro-batches of at most 64 padded tokens: the two processes get different numbers of them. Adam moves a
# weight by about lr whatever the size of its gradient, so float noise in a near-zero gradient shows at
# the scale of lr: 1e-4 keeps it below the 1e-5 the parameters are compared at.
UPDATE = ["--weighting", "uniform", "--lr", "1e-4", "--minibatches", "2", "--epochs", "2"]
UPDATE += ["--micro-batch-tokens", "64", "--temperature", "1.0"]


def launch(port: int, *args) -> list[str]:
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    return [*launcher, "--main_process_port", str(port), "-m", "cfiw_cli", *map(str, args)]


def run(argv: list[str], env=None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def rollouts(tiny_model, mini_dataset, tmp_path_factory) -> Path:
    """Rollouts of the tiny model whose rewards alternate, so every group has an advantage."""
    root = tmp_path_factory.mktemp("fsdp")
    sampled = root / "sampled.parquet"
    args = ["rollout", "--model", tiny_model, "--dataset", mini_dataset, "--limit", "4", "-g", "4"]
    run([str(BIN / "cfiw"), *map(str, args), "--max-new-tokens", "16", "--out", str(sampled)])
    table = pq.read_table(sampled)
    rewards = pa.array([float(i % 2) for i in range(table.num_rows)], type=table.schema.field("reward").type)
    path = root / "rollouts.parquet"
    pq.write_table(table.set_column(table.column_names.index("reward"), "reward", rewards), path)
    return path


@pytest.fixture(scope="module")
def updates(tiny_model, rollouts, tmp_path_factory) -> dict[str, Path]:
    """Two updates in a row, in one process (one-*) and sharded over two (fsdp-*)."""
    root = tmp_path_factory.mktemp("updates")
    out = {name: root / name for name in ("one-1", "one-2", "fsdp-1", "fsdp-2", "fsdp-then-one")}
    cfiw = [str(BIN / "cfiw"), "train", "--rollouts", str(rollouts), *UPDATE]
    run([*cfiw, "--model", str(tiny_model), "--out", str(out["one-1"])])
    run([*cfiw, "--model", str(out["one-1"]), "--out", str(out["one-2"])])
    sharded = ["train", "--rollouts", rollouts, *UPDATE]
    run(launch(29611, *sharded, "--model", tiny_model, "--out", out["fsdp-1"]), FSDP)
    run(launch(29612, *sharded, "--model", out["fsdp-1"], "--out", out["fsdp-2"]), FSDP)
    run([*cfiw, "--model", str(out["fsdp-1"]), "--out", str(out["fsdp-then-one"])])  # the same file layout
    return out


def assert_same_checkpoint(one: Path, sharded: Path) -> None:
    a, b = load_file(one / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert sorted(a) == sorted(b)  # the tied LM head written once, as one process writes it
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    saved = [torch.load(path / "optimizer.pt", weights_only=True) for path in (one, sharded)]
    assert saved[0]["param_groups"] == saved[1]["param_groups"]
    assert sorted(saved[0]["state"]) == sorted(saved[1]["state"])
    for index, moments in saved[0]["state"].items():
        for name, value in moments.items():
            assert torch.allclose(value, saved[1]["state"][index][name], atol=1e-6), (index, name)
    assert (one / "trainer_state.json").read_text() == (sharded / "trainer_state.json").read_text()
    assert (one / "config.json").read_text() == (sharded / "config.json").read_text()


def test_fsdp_saves_the_full_parameters_and_optimizer_state_of_one_process(updates, tiny_model):
    assert_same_checkpoint(updates["one-1"], updates["fsdp-1"])
    before = load_file(Path(tiny_model) / "model.safetensors")
    after = load_file(updates["fsdp-1"] / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the update did move the policy
    losses = [
        pq.read_table(updates[n] / "train_metrics.parquet").column("loss").to_pylist() for n in ("one-1", "fsdp-1")
    ]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and any(losses[0])
    manifest = json.loads((updates["fsdp-1"] / "cfiw_manifest.json").read_text())
    assert manifest["metrics"]["processes"] == 2


def test_an_fsdp_checkpoint_resumes_sharded_or_not(updates):
    assert json.loads((updates["fsdp-2"] / "trainer_state.json").read_text())["global_step"] == 8
    assert_same_checkpoint(updates["one-2"], updates["fsdp-2"])  # resumed under FSDP
    assert_same_checkpoint(updates["one-2"], updates["fsdp-then-one"])  # resumed in one process


def test_the_loop_refuses_fsdp(tiny_model, tmp_path):
    argv = launch(29613, "loop", "--preset", "tiny", "--model", tiny_model, "--run", tmp_path / "run")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=FSDP)
    assert done.returncode != 0 and "does not run under FSDP" in done.stderr
    assert not (tmp_path / "run").exists()
