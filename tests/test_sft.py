"""`cfiw sft`: a warm start whose prompts are exactly the rollout prompts, loss on solutions only."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import leftovers
from test_errors import assert_clean_error

from cfiw_cli.artifacts import sha256_of


@pytest.fixture(scope="module")
def two_problems(tmp_path_factory):
    from cfiw_cli.tools.synth import SynthConfig, run

    return run(
        SynthConfig(
            out=str(tmp_path_factory.mktemp("synth") / "data"), n_train=2, n_test=1, max_steps=1, filler_rate=0.0
        )
    ).path


def sft(cli, model, dataset, out, *extra):
    return cli("sft", "--model", model, "--dataset", dataset, "--out", out, "--batch-size", "2", *extra)


@pytest.mark.slow
def test_memorizes_two_solutions_word_for_word_and_stops(cli, tiny_model, two_problems, tmp_path):
    """Overfitting two examples shows the prompt is the one rollout/eval send and that the
    solution ends with EOS: greedy decoding must then reproduce each solution exactly and stop."""
    out = tmp_path / "sft"
    result = sft(cli, tiny_model, two_problems, out, "--steps", "150", "--lr", "1e-2", "--lr-schedule", "constant")
    assert result.exit_code == 0, result.stderr
    # a checkpoint's files, as `tiny-model` writes them (the tokenizer's depend on the transformers version)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in Path(tiny_model).iterdir())
    manifest = json.loads((out / "cfiw_manifest.json").read_text())
    curve = manifest["metrics"]["loss_curve"]
    assert manifest["stage"] == "sft" and curve[-1]["loss"] < 0.05 < curve[0]["loss"]
    evaluated = cli(
        "eval",
        "--model",
        out,
        "--dataset",
        two_problems,
        "--split",
        "train",
        "--max-new-tokens",
        "64",
        "--out",
        tmp_path / "eval.parquet",
    )
    assert evaluated.exit_code == 0, evaluated.stderr
    rows = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    answers = [json.loads(line)["answer"] for line in (two_problems / "train.jsonl").read_text().splitlines()]
    assert [r["completion_text"] for r in rows] == answers
    assert all(r["finish_reason"] == "stop" and r["correct"] for r in rows)


def test_same_seed_same_weights_up_to_date_and_force(cli, tiny_model, two_problems, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert sft(cli, tiny_model, two_problems, out, "--steps", "3", "--lr", "1e-3").exit_code == 0
    assert sha256_of(first / "model.safetensors") == sha256_of(second / "model.safetensors")
    assert sha256_of(first / "model.safetensors") != sha256_of(tiny_model / "model.safetensors")
    again = sft(cli, tiny_model, two_problems, first, "--steps", "3", "--lr", "1e-3")
    assert again.exit_code == 0 and "up to date" in again.stderr
    assert_clean_error(sft(cli, tiny_model, two_problems, first, "--steps", "4", "--lr", "1e-3"), "already exists")
    assert sft(cli, tiny_model, two_problems, first, "--steps", "4", "--lr", "1e-3", "--force").exit_code == 0
    assert sha256_of(first / "model.safetensors") != sha256_of(second / "model.safetensors")


def test_bad_input(cli, tiny_model, two_problems, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(sft(cli, tmp_path / "no-model", two_problems, out), "model path does not exist")
    assert_clean_error(sft(cli, tiny_model, tmp_path / "none.jsonl", out), "dataset not found")
    wavy = sft(cli, tiny_model, two_problems, out, "--lr-schedule", "wavy")
    assert wavy.exit_code == 2 and "cosine" in wavy.stderr
    zero = sft(cli, tiny_model, two_problems, out, "--lr", "0")  # declared above 0: a usage error
    assert zero.exit_code == 2 and "not above 0" in zero.stderr and "Traceback" not in zero.stderr
    assert sft(cli, tiny_model, two_problems, out, "--steps", "0").exit_code == 2
    assert leftovers(tmp_path) == []
