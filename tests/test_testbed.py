"""The offline testbed end to end: `just full-run model=tiny` (a short variant: a 150-step warm
start, 2 iterations) writes exactly the expected artifacts and a report in which calculation
spans out-score filler; started again, every stage is up to date and nothing changes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tokenizer_files

from cfiw_cli.artifacts import sha256_of

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "cfiw_manifest.json"} | tokenizer_files()
ITERATION_FILES = {"rollouts.parquet", "spans.parquet", "scores.parquet", "weights.parquet", "train_metrics.parquet"}
REPORT_TABLES = {
    "accuracy",
    "accuracy_by_mode",
    "final_accuracy_by_mode",
    "iterations_to_uniform",
    "reward",
    "delta_by_kind",
    "delta_by_label",
    "importance_auroc",
    "weight_by_kind",
    "probe",
    "probe_by_mode",
    "probe_runs",
    "mode_comparison",
    "paired_differences",
}


def just() -> str:
    path = Path(sys.executable).parent / "just"
    assert path.exists(), f"`just` is not installed beside {sys.executable} (pip install rust-just)"
    return str(path)


def files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def full_run(run: Path, sft: Path) -> subprocess.CompletedProcess:
    command = [
        just(),
        "--justfile",
        str(ROOT / "Justfile"),
        "full-run",
        "model=tiny",
        "iters=2",
        "sft_steps=150",
        f"run={run}",
        f"sft={sft}",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_full_run_tiny_writes_the_whole_chain_then_resumes_as_up_to_date(tmp_path):
    run, sft = tmp_path / "run", tmp_path / "sft"
    first = full_run(run, sft)
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"report: {run}/report/report.html" in first.stdout

    assert files(Path(f"{sft}-base")) == MODEL_FILES
    assert files(sft) == MODEL_FILES  # model and tokenizer, no optimizer state
    sft_manifest = json.loads((sft / "cfiw_manifest.json").read_text())
    assert sft_manifest["stage"] == "sft" and sft_manifest["config"]["steps"] == 150
    report = {f"report/{name}.json" for name in REPORT_TABLES} | {
        "report/report.md",
        "report/report.html",
        "report/cfiw_manifest.json",
        "report/accuracy.png",
        "report/reward.png",
        "report/probe.png",
        "report/delta_by_kind.png",
        "report/weight_by_kind.png",
        "report/curves.parquet",
        "report/curves_by_mode.parquet",
    }
    expected = (
        {
            "config.toml",
            "loop_state.json",
            "eval/iter-0000.parquet",
            "eval/iter-0002.parquet",
            "probe/iter-0000.parquet",
            "probe/iter-0002.parquet",
        }
        | {f"iter-{i:04d}/{name}" for i in range(2) for name in ITERATION_FILES}
        | {f"policy/{name}" for name in MODEL_FILES | {"optimizer.pt", "scheduler.pt", "trainer_state.json"}}
        | {f"best/{name}" for name in MODEL_FILES | {"best.json"}}  # the policy after iteration 2 is the only candidate
        | report
    )
    assert files(run) == expected

    # the warm model scores calculation spans above filler (fixed seeds throughout)
    auroc = json.loads((run / "report/importance_auroc.json").read_text())
    first_iteration = next(row for row in auroc if row["iteration"] == 0)
    # at T = 0.7 the warm model writes filler in fewer samples than its teacher (13 of 256 here)
    assert first_iteration["calculation_spans"] > 20 and first_iteration["filler_spans"] >= 10
    assert first_iteration["auroc"] > 0.5, first_iteration
    labels = {row["label"]: row for row in json.loads((run / "report/delta_by_label.json").read_text())}
    assert labels["calculation"]["mean_delta"] > labels["filler"]["mean_delta"]
    accuracy = json.loads((run / "report/accuracy.json").read_text())
    assert [row["iteration"] for row in accuracy] == [0, 2] and all(row["n"] == 100 for row in accuracy)
    probe = json.loads((run / "report/probe.json").read_text())
    import pyarrow.parquet as pq

    steps = sum(pq.read_metadata(run / f"iter-{i:04d}/train_metrics.parquet").num_rows for i in range(2))
    assert [(row["iteration"], row["step"], row["questions"], row["samples"]) for row in probe] == [
        (0, 0, 64, 8),
        (2, steps, 64, 8),
    ]

    before = {name: sha256_of(run / name) for name in expected if not name.startswith("report/")}
    again = full_run(run, sft)
    assert again.returncode == 0, again.stderr[-4000:]
    for finished in (f"{sft}-base", sft, run / "eval/iter-0002.parquet"):  # the loop itself knows it is done
        assert f"{finished} is up to date" in again.stderr
    assert "trained" not in again.stderr and "fine-tuned" not in again.stderr
    assert {name: sha256_of(run / name) for name in before} == before
    assert files(run) == expected


@pytest.mark.parametrize(
    "environment, pip_line",
    [
        ({}, 'pip install -q  "torch"'),
        (
            {"CFIW_TORCH": "torch==2.13.0", "CFIW_TORCH_INDEX": "https://download.pytorch.org/whl/cpu"},
            'pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"',
        ),
    ],
)
def test_setup_installs_torch_from_the_index_given(environment, pip_line):
    """`just setup` takes PyTorch's CPU build from its own index when told to (PyPI serves
    Linux the CUDA build); `--dry-run` prints the commands without running them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFIW_TORCH")} | environment
    done = subprocess.run(
        [just(), "--justfile", str(ROOT / "Justfile"), "--dry-run", "setup"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert pip_line in done.stderr.splitlines()[1]
