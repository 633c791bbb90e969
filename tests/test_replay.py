"""`cfiw replay`: the loop's kept policies updated again in every mode, on the same rollouts.

The run is the sharpening task (groups whose rewards differ, so every iteration updates),
3 iterations in cfiw mode with every starting policy kept."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_errors import assert_clean_error

from cfiw_cli.artifacts import sha256_of

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def table(path, drop=("seconds",)):
    data = pq.read_table(path)
    return data.drop([c for c in drop if c in data.column_names]).to_pylist()


@pytest.fixture(scope="module")
def looped(tmp_path_factory, sharpening_task, cli):
    policy, task = sharpening_task
    root = tmp_path_factory.mktemp("replay")
    config = root / "task.toml"
    config.write_text(
        f'[model]\nid = "{policy}"\n[data]\ndataset = "{task}"\n'
        "[loop]\niterations = 3\nquestions = 8\neval_every = 100\neval_limit = 4\nprobe_questions = "
        "6\nprobe_samples = 4\nseed = 0\nkeep_policies = 1\n"
        "[rollout]\ngroup_size = 8\nmax_new_tokens = 16\nbatch_size = 128\n"
        "[train]\nlr = 1e-3\nminibatches = 2\n"
    )
    run = root / "run"
    result = cli("loop", "--config", config, "--run", run, "--weighting", "cfiw")
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def replayed(looped, cli):
    result = cli("replay", looped, "--modes", "uniform,cfiw,random")
    assert result.exit_code == 0, result.stderr
    return looped


def test_kept_policies_share_config_and_tokenizer(looped):
    policies = looped / "policies"
    assert sorted(p.name for p in policies.iterdir() if p.is_dir()) == ["iter-0001", "iter-0002"]
    for kept in ("iter-0001", "iter-0002"):
        assert {p.name for p in (policies / kept).iterdir()} == {
            "model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "trainer_state.json",
            "cfiw_manifest.json",
        }
    assert (policies / "config.json").exists() and (policies / "tokenizer.json").exists()
    assert "keep_policies = 1" in (looped / "config.toml").read_text()


def test_replay_in_the_loops_mode_is_the_loops_update(replayed):
    rows = {(r["iteration"], r["mode"]): r for r in table(replayed / "replay" / "replay.parquet")}
    assert sorted(rows) == [(i, m) for i in range(3) for m in ("cfiw", "random", "uniform")]
    loop_updates = [replayed / "policies" / "iter-0001", replayed / "policies" / "iter-0002", replayed / "policy"]
    for iteration, after in enumerate(loop_updates):
        # bit-identical weights: the same update as the loop's, optimizer state included
        assert rows[(iteration, "cfiw")]["weights_sha256_after"] == sha256_of(after / "model.safetensors")
        assert rows[(iteration, "uniform")]["weights_sha256_after"] != rows[(iteration, "cfiw")]["weights_sha256_after"]
    for iteration in range(2):
        assert (
            rows[(iteration, "cfiw")]["loglik_per_token_after"]
            == rows[(iteration + 1, "cfiw")]["loglik_per_token_before"]
        )
    assert all(r["reward_before"] == rows[(r["iteration"], "cfiw")]["reward_before"] for r in rows.values())
    for row in rows.values():
        assert row["reward_gain"] == pytest.approx(row["reward_after"] - row["reward_before"])


def test_modes_differ_only_in_the_weights(replayed, cli, tmp_path):
    """The uniform replay of iteration 1 equals `cfiw train --weighting uniform` from policy_1."""
    from cfiw_cli.policies import policy_at

    policy_1 = policy_at(replayed, 1, "unused", optimizer=True, work=tmp_path / "policy-1")
    iteration = replayed / "iter-0001"
    out = tmp_path / "uniform"
    result = cli(
        "train",
        "--model",
        policy_1,
        "--rollouts",
        iteration / "rollouts.parquet",
        "--spans",
        iteration / "spans.parquet",
        "--scores",
        iteration / "scores.parquet",
        "--out",
        out,
        "--weighting",
        "uniform",
        "--lr",
        "1e-3",
        "--minibatches",
        "2",
    )
    assert result.exit_code == 0, result.stderr
    rows = {(r["iteration"], r["mode"]): r for r in table(replayed / "replay" / "replay.parquet")}
    assert rows[(1, "uniform")]["weights_sha256_after"] == sha256_of(out / "model.safetensors")
    replay = replayed / "replay"
    assert table(out / "weights.parquet") == table(replay / "uniform" / "iter-0001" / "weights.parquet")
    assert table(out / "train_metrics.parquet") == table(replay / "uniform" / "iter-0001" / "train_metrics.parquet")
    # across modes: the same rollouts kept, the same advantages, the same minibatches; other weights
    by_mode = {m: table(replay / m / "iter-0001" / "weights.parquet") for m in ("uniform", "cfiw")}
    assert [(r["rollout_id"], r["advantage"], r["kept"]) for r in by_mode["uniform"]] == [
        (r["rollout_id"], r["advantage"], r["kept"]) for r in by_mode["cfiw"]
    ]
    assert [r["token_weights"] for r in by_mode["uniform"]] != [r["token_weights"] for r in by_mode["cfiw"]]
    steps = {
        m: [(r["step"], r["sequences"], r["tokens"]) for r in table(replay / m / "iter-0001" / "train_metrics.parquet")]
        for m in ("uniform", "cfiw")
    }
    assert steps["uniform"] == steps["cfiw"]


def test_a_killed_replay_resumes(looped, replayed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(looped, run, ignore=shutil.ignore_patterns("replay"))
    argv = [str(BIN / "cfiw"), "replay", str(run), "--modes", "uniform,cfiw,random"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "replay" / "uniform" / "iter-0000" / "result.parquet"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists() and not (run / "replay" / "replay.parquet").exists()  # it really was interrupted
    stamp = first.stat().st_mtime_ns
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert first.stat().st_mtime_ns == stamp  # finished cells are not redone
    assert table(run / "replay" / "replay.parquet") == table(replayed / "replay" / "replay.parquet")
    assert not (run / "replay" / ".updated").exists() and not (run / "replay" / ".policy").exists()


def test_the_likelihood_probe_matches_a_plain_forward(sharpening_task):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfiw_cli.likelihood import reference_likelihood, reference_sequences
    from cfiw_cli.tasks.gsm8k import build_prompt, load_questions

    policy, task = sharpening_task
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    rows = load_questions(str(task), "test", limit=3)
    rows[1] = {**rows[1], "answer": "2 + 2 = 4.\n#### 4"}  # a different solution too
    measured = reference_likelihood(model, tokenizer, reference_sequences(tokenizer, rows), batch_size=2)
    for row, got in zip(rows, measured["per_question"], strict=True):
        prompt = tokenizer(build_prompt(row["question"], tokenizer), add_special_tokens=False)["input_ids"]
        solution = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + solution])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)  # [T, V], one sequence, no padding
        values = [logprobs[len(prompt) + j - 1, token].item() for j, token in enumerate(solution)]
        # the answer line: from the first token whose text reaches into "####"
        mark = row["answer"].rfind("####")
        start = next(j for j in range(len(solution)) if len(tokenizer.decode(solution[: j + 1])) > mark)
        assert got["tokens"] == len(solution)
        assert got["loglik"] == pytest.approx(sum(values), abs=1e-4)
        assert got["answer_loglik"] == pytest.approx(sum(values[start:-1]), abs=1e-4)
    total = sum(q["loglik"] for q in measured["per_question"])
    assert measured["loglik_per_token"] == pytest.approx(total / measured["tokens"])


def test_bad_replays_are_clean_errors(looped, cli, tmp_path):
    assert_clean_error(cli("replay", tmp_path / "missing"), "run directory not found")
    assert_clean_error(cli("replay", tmp_path), "not a loop run")
    for flag, value, fragment in (("--modes", "uniform,best", "unknown mode 'best'"), ("--iterations", "3-1", "empty")):
        bad = cli("replay", looped, flag, value)  # a bad flag value: exit 2
        assert bad.exit_code == 2 and fragment in bad.stderr, bad.stderr
    assert_clean_error(cli("replay", looped, "--iterations", "0-5"), "iteration 3")
    old = cli("replay", looped, "--optimizer-state", "old")
    assert old.exit_code == 2 and "fresh" in old.stderr  # a choice flag: the choices are listed
    for modes in ("cfiw@2", "cfiw@x", "best@0"):
        assert cli("replay", looped, "--modes", modes).exit_code == 2
    assert_clean_error(cli("replay", looped, "--optimizer", "sgd"), "kept optimizer state")
    unscored = tmp_path / "unscored"  # a loop stopped before it scored its first iteration: nothing to replay
    shutil.copytree(looped, unscored, ignore=shutil.ignore_patterns("policies", "replay"))
    (unscored / "iter-0000" / "scores.parquet").unlink()
    assert_clean_error(cli("replay", unscored), "no kept policy or no scored rollouts")
    assert not (unscored / "replay").exists()


def test_replay_sweeps_floors_and_controls_into_the_replay_weights_view(looped, cli, tmp_path):
    """`MODE@F` replays a mode at importance floor F; a fresh SGD may replace the loop's AdamW;
    every replayed update's weights are in the replay_weights view."""
    run = tmp_path / "run"
    shutil.copytree(looped, run, ignore=shutil.ignore_patterns("replay"))
    result = cli(
        "replay", run, "--modes", "cfiw,cfiw@0,entropy", "--iterations", "1", "--optimizer-state", "fresh",
        "--optimizer", "sgd", "--momentum", "0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = table(run / "replay" / "replay.parquet")
    assert [(r["mode"], r["optimizer"], r["optimizer_state"]) for r in rows] == [
        (mode, "sgd", "fresh") for mode in ("cfiw", "cfiw@0", "entropy")
    ]
    query = (
        "select mode, min(weighting) as weighting, count(*) as rollouts, min(list_min(token_weights)) as low, "
        "max(list_max(token_weights)) as high from replay_weights where kept group by mode order by mode"
    )
    shares = cli("sql", run, query, "--format", "json")
    assert shares.exit_code == 0, shares.stderr
    by_mode = {r["mode"]: r for r in json.loads(shares.stdout)}
    assert sorted(by_mode) == ["cfiw", "cfiw@0", "entropy"]
    assert by_mode["cfiw@0"]["weighting"] == "cfiw" and by_mode["entropy"]["weighting"] == "entropy"
    # floor 0 spreads the weights wider than the paper's 0.5; entropy weights are 0 or 1
    assert by_mode["cfiw@0"]["high"] / by_mode["cfiw@0"]["low"] > by_mode["cfiw"]["high"] / by_mode["cfiw"]["low"]
    assert (by_mode["entropy"]["low"], by_mode["entropy"]["high"]) == (0.0, 1.0)
    manifest = json.loads(pq.read_schema(run / "replay" / "cfiw@0" / "iter-0001" / "weights.parquet").metadata[b"cfiw"])
    assert manifest["config"]["importance_floor"] == 0.0 and manifest["config"]["optimizer"] == "sgd"


def test_two_processes_replay_as_one(looped, replayed, tmp_path):
    """Under `accelerate launch` each update is sharded over the processes; the measures agree
    with the single-process replay to float precision."""
    import os

    run = tmp_path / "run"
    shutil.copytree(looped, run, ignore=shutil.ignore_patterns("replay"))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    argv = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29561",
        "-m",
        "cfiw_cli",
        "replay",
        str(run),
        "--modes",
        "uniform,cfiw",
        "--iterations",
        "0-1",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = {(r["iteration"], r["mode"]): r for r in table(replayed / "replay" / "replay.parquet")}
    two = table(run / "replay" / "replay.parquet")
    assert sorted((r["iteration"], r["mode"]) for r in two) == [
        (0, "cfiw"),
        (0, "uniform"),
        (1, "cfiw"),
        (1, "uniform"),
    ]
    for row in two:
        expected = one[(row["iteration"], row["mode"])]
        assert row["loglik_per_token_before"] == expected["loglik_per_token_before"]  # policy_k, unchanged
        assert row["loglik_per_token_after"] == pytest.approx(expected["loglik_per_token_after"], rel=1e-4)
        assert row["answer_loglik_after"] == pytest.approx(expected["answer_loglik_after"], rel=1e-3, abs=1e-4)
