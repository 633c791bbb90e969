"""`cfiw segment` and `cfiw score` end to end on a tiny model, checked against naive forwards."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import COMPLETIONS, leftovers, write_rollouts
from test_errors import assert_clean_error

from cfiw_cli.algo.importance import naive_scores
from cfiw_cli.pipeline.score import build_items
from cfiw_cli.schemas import SCORES, SPANS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model, cli):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("run") / "iter-0000"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    golds = ["19", "6", "22.5", "5", "0", "27", "42"]  # the 6th rollout's own answer (26) is wrong
    write_rollouts(directory / "rollouts.parquet", tokenizer, COMPLETIONS, golds)
    result = cli(
        "segment",
        "--rollouts",
        directory / "rollouts.parquet",
        "--model",
        tiny_model,
        "--out",
        directory / "spans.parquet",
    )
    assert result.exit_code == 0, result.stderr
    return directory


def test_segment_writes_spans_for_rollouts_with_answers(run_dir):
    spans = pq.read_table(run_dir / "spans.parquet")
    for field in SPANS:
        assert spans.schema.field(field.name).type == field.type
    rows = spans.to_pylist()
    answers = [r for r in rows if r["kind"] == "answer"]
    assert len(answers) == 6  # the rollout without a number has no rows
    assert "0:q-2:0" not in {r["rollout_id"] for r in rows}
    assert {r["kind"] for r in rows} == {"calculation", "numeric", "scaffolding", "answer"}
    manifest = json.loads(pq.read_schema(run_dir / "spans.parquet").metadata[b"cfiw"])
    assert manifest["stage"] == "segment" and manifest["metrics"]["rollouts_with_answer"] == 6


@pytest.mark.parametrize("mask", ["pad", "delete", "knockout"])
@pytest.mark.parametrize("target", ["own", "gold"])
def test_score_matches_naive_forward_per_variant(cli, run_dir, tiny_model, mask, target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_dir / f"scores-{mask}-{target}.parquet"
    result = cli(
        "score",
        "--model",
        tiny_model,
        "--rollouts",
        run_dir / "rollouts.parquet",
        "--spans",
        run_dir / "spans.parquet",
        "--out",
        out,
        "--mask",
        mask,
        "--target",
        target,
        "--batch-tokens",
        "256",
    )
    assert result.exit_code == 0, result.stderr
    table = pq.read_table(out)
    for field in SCORES:
        assert table.schema.field(field.name).type == field.type
    scores = table.to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids, span_indices, items = build_items(
        pq.read_table(run_dir / "rollouts.parquet"), pq.read_table(run_dir / "spans.parquet"), target, tokenizer
    )
    expected = {}
    for rollout_id, indices, item in zip(ids, span_indices, items, strict=True):
        reference = naive_scores(model, item, mask, tokenizer.pad_token_id)
        for span_idx, delta in zip(indices, reference.deltas, strict=True):
            expected[(rollout_id, span_idx)] = (reference.base, delta)
    assert {(r["rollout_id"], r["span_idx"]) for r in scores} == set(expected)
    for row in scores:
        base, delta = expected[(row["rollout_id"], row["span_idx"])]
        assert row["mask"] == mask and row["target"] == target
        assert abs(row["base_logp"] - base) < 1e-4 and abs(row["delta"] - delta) < 1e-4
        assert abs(row["delta"] - (row["base_logp"] - row["masked_logp"])) < 1e-5


def test_gold_target_differs_only_where_the_answer_is_wrong(run_dir):
    own = {
        (r["rollout_id"], r["span_idx"]): r["base_logp"]
        for r in pq.read_table(run_dir / "scores-pad-own.parquet").to_pylist()
    }
    gold = {
        (r["rollout_id"], r["span_idx"]): r["base_logp"]
        for r in pq.read_table(run_dir / "scores-pad-gold.parquet").to_pylist()
    }
    wrong = "0:q-2:1"  # "... = 26 / #### 26" with gold 27
    for key in own:
        if key[0] == wrong:
            assert own[key] != gold[key]
        else:
            assert own[key] == pytest.approx(gold[key], abs=1e-6)


def test_rerun_is_up_to_date_and_force_recomputes(cli, run_dir, tiny_model):
    args = [
        "score",
        "--model",
        tiny_model,
        "--rollouts",
        run_dir / "rollouts.parquet",
        "--spans",
        run_dir / "spans.parquet",
        "--out",
        run_dir / "scores-rerun.parquet",
    ]
    assert cli(*args).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 0 and "up to date" in again.stderr
    forced = cli(*args, "--force")
    assert forced.exit_code == 0 and "up to date" not in forced.stderr


def test_spans_from_another_rollouts_file(cli, run_dir, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    other = write_rollouts(
        tmp_path / "other.parquet", AutoTokenizer.from_pretrained(tiny_model), COMPLETIONS[:2], iteration=1
    )
    out = tmp_path / "scores.parquet"
    result = cli(
        "score", "--model", tiny_model, "--rollouts", other, "--spans", run_dir / "spans.parquet", "--out", out
    )
    assert_clean_error(result, "different rollouts file")
    # without a manifest the rollout ids give it away
    stripped = tmp_path / "spans-no-manifest.parquet"
    pq.write_table(pq.read_table(run_dir / "spans.parquet").replace_schema_metadata(None), stripped)
    result = cli("score", "--model", tiny_model, "--rollouts", other, "--spans", stripped, "--out", out)
    assert_clean_error(result, "not in")
    assert leftovers(tmp_path) == ["other.parquet", "spans-no-manifest.parquet"]


def test_model_vocabulary_too_small(cli, run_dir, tmp_path):
    small = tmp_path / "small-model"
    assert cli("tiny-model", "--out", small, "--vocab-size", "300").exit_code == 0
    out = tmp_path / "scores.parquet"
    result = cli(
        "score",
        "--model",
        small,
        "--rollouts",
        run_dir / "rollouts.parquet",
        "--spans",
        run_dir / "spans.parquet",
        "--out",
        out,
    )
    assert_clean_error(result, "vocabulary")
    assert not out.exists()


def test_nothing_to_score_writes_an_empty_file(cli, run_dir, tiny_model, tmp_path):
    # a policy may stop writing answers or reasoning; the run goes on and every rollout then
    # weighs as in uniform
    answers_only = pq.read_table(run_dir / "spans.parquet").to_pylist()
    answers_only = [row for row in answers_only if row["kind"] == "answer"]
    for name, rows in (("no-spans.parquet", []), ("answers-only.parquet", answers_only)):
        spans = tmp_path / name
        pq.write_table(pa.Table.from_pylist(rows, schema=SPANS), spans)
        out = tmp_path / f"scores-{name}"
        result = cli(
            "score", "--model", tiny_model, "--rollouts", run_dir / "rollouts.parquet", "--spans", spans, "--out", out
        )
        assert result.exit_code == 0, result.stderr
        assert "nothing to score" in result.stderr
        assert pq.read_table(out).num_rows == 0


def test_two_processes_give_the_single_process_file(cli, run_dir, tiny_model, tmp_path):
    """`accelerate launch` with two CPU workers: each scores its share, the main one writes."""
    single_out = tmp_path / "single" / "scores.parquet"
    inputs = [
        "--model",
        tiny_model,
        "--rollouts",
        run_dir / "rollouts.parquet",
        "--spans",
        run_dir / "spans.parquet",
        "--batch-tokens",
        "256",
    ]
    assert cli("score", *inputs, "--out", single_out).exit_code == 0
    out = tmp_path / "scores.parquet"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    argv = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29533",
        "-m",
        "cfiw_cli",
        "score",
        "--model",
        str(tiny_model),
        "--rollouts",
        str(run_dir / "rollouts.parquet"),
        "--spans",
        str(run_dir / "spans.parquet"),
        "--out",
        str(out),
        "--batch-tokens",
        "256",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sharded = pq.read_table(out)
    single = pq.read_table(single_out)
    assert json.loads(sharded.schema.metadata[b"cfiw"])["metrics"]["processes"] == 2
    for column in ("rollout_id", "span_idx", "mask"):
        assert sharded.column(column).to_pylist() == single.column(column).to_pylist()
    for column in ("base_logp", "masked_logp", "delta"):
        for a, b in zip(sharded.column(column).to_pylist(), single.column(column).to_pylist(), strict=True):
            assert abs(a - b) < 1e-5
    assert leftovers(tmp_path) == ["scores.parquet", "single"]
