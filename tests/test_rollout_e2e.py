"""End to end on a tiny model: tiny-model -> rollout -> eval through the CLI."""

import json
import os
import subprocess
import sys

import duckdb
import pyarrow.parquet as pq
import pytest
import torch

from cfiw_cli.schemas import ROLLOUTS
from cfiw_cli.tasks.gsm8k import extract_answer, load_questions

pytestmark = pytest.mark.slow
MAX_NEW = 24


def teacher_forced_logprobs(model, prompt_ids, completion_ids):
    """log p(completion token | everything before it), one unpadded forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])  # [1, P + C]
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)  # [P + C, V]
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return logprobs[positions, torch.tensor(completion_ids)]  # [C]


@pytest.fixture(scope="module")
def cli_model(cli, tmp_path_factory, mini_dataset):
    """The model of these tests is built by the `tiny-model` command itself."""
    out = tmp_path_factory.mktemp("cli-model") / "model"
    result = cli("tiny-model", "--out", out, "--dataset", mini_dataset, "--vocab-size", "600")
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def rollout_args(cli_model, mini_dataset):
    def args(out, *extra):
        return [
            "rollout",
            "--model",
            cli_model,
            "--dataset",
            mini_dataset,
            "--limit",
            "8",
            "--group-size",
            "4",
            "--max-new-tokens",
            str(MAX_NEW),
            "--batch-size",
            "12",
            "--seed",
            "3",
            "--dtype",
            "float32",
            "--out",
            out,
            *extra,
        ]

    return args


def test_rollout_writes_every_column_consistently(cli, tmp_path, rollout_args, cli_model, mini_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "iter-0000" / "rollouts.parquet"
    result = cli(*rollout_args(out))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["rollouts.parquet"]
    table = pq.read_table(out)
    for field in ROLLOUTS:
        assert table.schema.field(field.name).type == field.type, field.name
    rows = table.to_pylist()
    assert len(rows) == 32
    questions = {q["prompt_id"]: q for q in load_questions(str(mini_dataset), limit=8)}
    assert {r["prompt_id"] for r in rows} == set(questions)
    tokenizer = AutoTokenizer.from_pretrained(cli_model)
    model = AutoModelForCausalLM.from_pretrained(cli_model, dtype=torch.float32).eval()
    worst = 0.0
    for row in rows:
        assert row["rollout_id"] == f"0:{row['prompt_id']}:{row['sample_idx']}"
        assert row["sample_idx"] in range(4) and row["iteration"] == 0
        assert row["gold"] == questions[row["prompt_id"]]["gold"]
        assert row["question"] == questions[row["prompt_id"]]["question"]
        assert 1 <= len(row["completion_ids"]) == len(row["completion_logprobs"]) <= MAX_NEW
        if row["finish_reason"] == "length":
            assert len(row["completion_ids"]) == MAX_NEW
        else:
            assert row["finish_reason"] == "stop" and row["completion_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(row["prompt_ids"]) == row["prompt_text"]
        assert row["pred"] == extract_answer(row["completion_text"])
        assert row["correct"] == (row["reward"] == 1.0) and row["reward"] in (0.0, 1.0)
        recomputed = teacher_forced_logprobs(model, row["prompt_ids"], row["completion_ids"])
        worst = max(worst, (recomputed - torch.tensor(row["completion_logprobs"])).abs().max().item())
    assert worst < 1e-4
    assert len({r["rollout_id"] for r in rows}) == 32
    assert len({tuple(r["completion_ids"]) for r in rows}) > 1  # sampling, not greedy copies

    # DuckDB reads the rows and the manifest
    count = duckdb.connect().execute(f"select count(*), count(distinct prompt_id) from '{out}'").fetchall()[0]
    assert count == (32, 8)
    raw = (
        duckdb.connect().execute(f"select value from parquet_kv_metadata('{out}') where key = 'cfiw'").fetchall()[0][0]
    )
    manifest = json.loads(raw)
    assert manifest["stage"] == "rollout" and manifest["rows"] == 32 and manifest["seed"] == 3
    assert manifest["config"]["group_size"] == 4 and manifest["inputs"]["model"]["sha256"]
    assert manifest["libraries"]["torch"] and manifest["device"] == "cpu"


def test_rerun_is_up_to_date_force_rewrites_and_seed_is_deterministic(cli, tmp_path, rollout_args):
    out = tmp_path / "rollouts.parquet"
    assert cli(*rollout_args(out)).exit_code == 0
    first = pq.read_table(out)
    stamp = out.stat().st_mtime_ns

    again = cli(*rollout_args(out))
    assert again.exit_code == 0 and "up to date" in again.stderr
    assert out.stat().st_mtime_ns == stamp

    forced = cli(*rollout_args(out, "--force"))
    assert forced.exit_code == 0 and "up to date" not in forced.stderr
    assert out.stat().st_mtime_ns != stamp
    assert pq.read_table(out).equals(first)  # same seed, same inputs: identical contents

    other = tmp_path / "other-seed.parquet"
    assert cli(*rollout_args(other, "--seed", "4")).exit_code == 0
    assert pq.read_table(other).column("completion_ids") != first.column("completion_ids")
    changed = cli(*rollout_args(out, "--temperature", "0.5"))
    assert "up to date" not in changed.stderr  # a changed flag invalidates the file


def test_two_processes_sample_what_one_process_samples(cli, tmp_path, rollout_args):
    """Each sequence samples from its own stream (seed, question, sample index), so sharding the
    questions over two `accelerate launch` workers draws the very same rollouts."""
    single = tmp_path / "single.parquet"
    assert cli(*rollout_args(single)).exit_code == 0
    sharded = tmp_path / "sharded.parquet"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29535"]
    argv = launch + ["-m", "cfiw_cli"] + [str(a) for a in rollout_args(sharded)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = pq.read_table(single), pq.read_table(sharded)
    assert json.loads(two.schema.metadata[b"cfiw"])["metrics"]["processes"] == 2
    for column in ROLLOUTS.names:
        if column != "completion_logprobs":
            assert two.column(column).to_pylist() == one.column(column).to_pylist(), column
    logprobs = zip(
        two.column("completion_logprobs").to_pylist(), one.column("completion_logprobs").to_pylist(), strict=True
    )
    for a, b in logprobs:
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_stop_tokens_end_completions_and_logprobs_stay_exact(tiny_model, mini_dataset, tmp_path):
    """Bias the model towards EOS so both finish reasons occur; also covers top-p and temperature."""
    from cfiw_cli.modeling import load_model, load_tokenizer
    from cfiw_cli.pipeline.rollout import RolloutConfig, run

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), "float32")
    eos_bias = torch.zeros(model.config.vocab_size)
    eos_bias[tokenizer.eos_token_id] = 3.5
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output + eos_bias)
    try:
        config = RolloutConfig(
            model=str(tiny_model),
            dataset=str(mini_dataset),
            out=str(tmp_path / "r.parquet"),
            limit=8,
            group_size=4,
            max_new_tokens=16,
            temperature=0.8,
            top_p=0.95,
            batch_size=32,
            seed=0,
        )
        run(config, model=model, tokenizer=tokenizer)
        rows = pq.read_table(config.out).to_pylist()
        reasons = {r["finish_reason"] for r in rows}
        assert reasons == {"stop", "length"}
        for row in rows:
            if row["finish_reason"] == "stop":
                assert row["completion_ids"][-1] == tokenizer.eos_token_id
                assert tokenizer.eos_token_id not in row["completion_ids"][:-1]
                assert "<|im_end|>" not in row["completion_text"]
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0] / 0.8  # [T, V] the sampling distribution before top-p
            start = len(row["prompt_ids"]) - 1
            steps = logits[start : start + len(row["completion_ids"])]  # [C, V]
            chosen = torch.tensor(row["completion_ids"])
            # top-p renormalizes over the nucleus, so the recorded log-prob is >= the untruncated one
            untruncated = steps.log_softmax(-1)[torch.arange(len(chosen)), chosen]
            assert (torch.tensor(row["completion_logprobs"]) >= untruncated - 1e-5).all()
    finally:
        handle.remove()


def test_eval_writes_accuracy_with_interval(cli, tmp_path, cli_model, mini_dataset):
    out = tmp_path / "eval" / "iter-0000.parquet"
    result = cli(
        "eval", "--model", cli_model, "--dataset", mini_dataset, "--limit", "6", "--max-new-tokens", "12", "--out", out
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("accuracy 0.")
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6 and {r["sample_idx"] for r in rows} == {0}
    metrics = json.loads(pq.read_schema(out).metadata[b"cfiw"])["metrics"]
    assert metrics["accuracy"] == sum(r["correct"] for r in rows) / 6
    assert 0.0 <= metrics["ci_low"] <= metrics["accuracy"] <= metrics["ci_high"] <= 1.0
    sampled = cli(
        "eval",
        "--model",
        cli_model,
        "--dataset",
        mini_dataset,
        "--limit",
        "4",
        "--max-new-tokens",
        "8",
        "--samples",
        "3",
        "--temperature",
        "1.0",
        "--out",
        tmp_path / "k.parquet",
    )
    assert sampled.exit_code == 0 and "pass@3" in sampled.stdout and "maj@3" in sampled.stdout
    assert pq.read_table(tmp_path / "k.parquet").num_rows == 12
