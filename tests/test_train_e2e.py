"""`cfiw train` end to end on a tiny model: every mode, lr 0, ratio 1, no-signal batches, resume, two processes."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from conftest import COMPLETIONS, write_rollouts
from test_errors import assert_clean_error

pytestmark = pytest.mark.slow
GOLDS = ["19", "7", "22.5", "4", "0", "26", "42", "2"]  # two samples per question, one right and one wrong


def parameters(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_model, cli):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("train") / "iter-0000"
    write_rollouts(
        directory / "rollouts.parquet", AutoTokenizer.from_pretrained(tiny_model), COMPLETIONS + ["#### 1"], GOLDS
    )
    files = {name: directory / f"{name}.parquet" for name in ("rollouts", "spans", "scores")}
    assert (
        cli("segment", "--rollouts", files["rollouts"], "--model", tiny_model, "--out", files["spans"]).exit_code == 0
    )
    assert (
        cli(
            "score",
            "--rollouts",
            files["rollouts"],
            "--spans",
            files["spans"],
            "--model",
            tiny_model,
            "--out",
            files["scores"],
        ).exit_code
        == 0
    )
    return files


def train_args(batch, model, out, *extra):
    return [
        "train",
        "--model",
        model,
        "--rollouts",
        batch["rollouts"],
        "--spans",
        batch["spans"],
        "--scores",
        batch["scores"],
        "--out",
        out,
        "--metrics-out",
        out.parent / f"{out.name}-metrics.parquet",
        "--weights-out",
        out.parent / f"{out.name}-weights.parquet",
        "--lr",
        "1e-3",
        "--minibatches",
        "2",
        *extra,
    ]


@pytest.mark.parametrize("mode", ["cfiw", "uniform", "inverted", "shuffled"])
def test_each_mode_updates_the_policy(cli, batch, tiny_model, tmp_path, mode):
    out = tmp_path / "policy"
    result = cli(*train_args(batch, tiny_model, out, "--weighting", mode))
    assert result.exit_code == 0, result.stderr
    assert max_change(parameters(out), parameters(tiny_model)) > 1e-4
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "cfiw_manifest.json",
    ):
        assert (out / name).exists(), name
    assert not (tmp_path / "policy.tmp").exists()
    metrics = pq.read_table(tmp_path / "policy-metrics.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["ratio_mean"] == 1.0  # old log-probs come from the loaded policy, same micro-batches
    assert metrics[0]["clip_frac_low"] == metrics[0]["clip_frac_high"] == 0.0
    weights = pq.read_table(tmp_path / "policy-weights.parquet").to_pylist()
    assert len(weights) == 8 and all(w["weighting"] == mode for w in weights)
    lengths = {r["rollout_id"]: len(r["completion_ids"]) for r in pq.read_table(batch["rollouts"]).to_pylist()}
    for row in weights:
        assert len(row["token_weights"]) == lengths[row["rollout_id"]]
        if mode == "uniform":
            assert set(row["token_weights"]) == {1.0}
        else:
            assert sum(row["token_weights"]) / len(row["token_weights"]) == pytest.approx(1.0, abs=1e-5)


def test_zero_learning_rate_changes_nothing(cli, batch, tiny_model, tmp_path):
    out = tmp_path / "policy"
    assert cli(*train_args(batch, tiny_model, out, "--lr", "0")).exit_code == 0
    assert max_change(parameters(out), parameters(tiny_model)) == 0.0


def test_equal_rewards_give_a_message_and_no_update(cli, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    rollouts = write_rollouts(
        tmp_path / "iter-0000" / "rollouts.parquet",
        AutoTokenizer.from_pretrained(tiny_model),
        COMPLETIONS[:4],
        ["19", "6", "22.5", "5"],
    )
    out = tmp_path / "policy"
    result = cli(
        "train", "--model", tiny_model, "--rollouts", rollouts, "--weighting", "uniform", "--out", out, "--lr", "1e-3"
    )
    assert result.exit_code == 0 and "equal rewards" in result.stderr and "no update" in result.stderr
    assert max_change(parameters(out), parameters(tiny_model)) == 0.0
    assert pq.read_table(out / "train_metrics.parquet").num_rows == 0  # by default inside the checkpoint


def test_two_modes_on_one_batch_keep_their_own_files(cli, batch, tiny_model, tmp_path):
    """Without --metrics-out/--weights-out each update's files go inside its own checkpoint, so
    replaying one batch in two modes overwrites nothing (nothing lands beside the rollouts)."""
    before = set(batch["rollouts"].parent.iterdir())
    for mode in ("cfiw", "uniform"):
        args = [
            "train",
            "--model",
            tiny_model,
            "--rollouts",
            batch["rollouts"],
            "--spans",
            batch["spans"],
            "--scores",
            batch["scores"],
            "--out",
            tmp_path / mode,
            "--lr",
            "1e-3",
            "--weighting",
            mode,
        ]
        assert cli(*args).exit_code == 0
    assert set(batch["rollouts"].parent.iterdir()) == before
    for mode in ("cfiw", "uniform"):
        assert {row["weighting"] for row in pq.read_table(tmp_path / mode / "weights.parquet").to_pylist()} == {mode}
        assert pq.read_table(tmp_path / mode / "train_metrics.parquet").num_rows == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_second_iteration_resumes_optimizer_state(cli, batch, tiny_model, tmp_path):
    first, second = tmp_path / "policy-1", tmp_path / "policy-2"
    assert cli(*train_args(batch, tiny_model, first)).exit_code == 0
    assert cli(*train_args(batch, first, second)).exit_code == 0
    assert json.loads((second / "trainer_state.json").read_text())["global_step"] == 4
    state = torch.load(second / "optimizer.pt", weights_only=True)["state"]
    assert int(next(iter(state.values()))["step"]) == 4  # Adam moments carried over two iterations
    metrics = pq.read_table(tmp_path / "policy-2-metrics.parquet").to_pylist()
    assert [m["step"] for m in metrics] == [3, 4]


def test_weighting_needs_scores(cli, batch, tiny_model, tmp_path):
    result = cli(
        "train", "--model", tiny_model, "--rollouts", batch["rollouts"], "--out", tmp_path / "p", "--weighting", "cfiw"
    )
    assert_clean_error(result, "--spans and --scores")
    assert not (tmp_path / "p").exists()


def test_two_processes_end_with_the_same_parameters(cli, batch, tiny_model, tmp_path):
    single = tmp_path / "single"
    assert cli(*train_args(batch, tiny_model, single)).exit_code == 0
    double = tmp_path / "double"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    argv = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "29547",
        "-m",
        "cfiw_cli",
    ]
    done = subprocess.run(
        argv + [str(a) for a in train_args(batch, tiny_model, double)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The loss and the all-reduced gradient norm of every step agree to float precision, so the
    # step's gradient is the single-process one, scale included.
    one, two = (pq.read_table(tmp_path / f"{name}-metrics.parquet").to_pylist() for name in ("single", "double"))
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Adam moves every parameter by about lr (1e-3) per step whatever its gradient's size, so
    # float noise in a near-zero gradient element shows up as ~1e-5 in the parameters; a wrong
    # direction would show as ~1e-3.
    assert max_change(parameters(single), parameters(double)) < 1e-4
    assert max_change(parameters(single), parameters(tiny_model)) > 1e-4
    assert json.loads((double / "cfiw_manifest.json").read_text())["metrics"]["processes"] == 2


# A worker whose loss turns NaN on process 1 only, as an overflow in one shard of the batch would.
NAN_ON_ONE_PROCESS = """
from accelerate import PartialState
from cfiw_cli.cli import main
from cfiw_cli import update

if PartialState(cpu=True).process_index == 1:
    policy_loss = update.policy_loss
    def poisoned(*args, **kwargs):
        loss, metrics = policy_loss(*args, **kwargs)
        return loss * float("nan"), metrics
    update.policy_loss = poisoned
main()
"""


def test_a_non_finite_loss_on_one_process_stops_every_process(batch, tiny_model, tmp_path):
    """The loss is summed over the processes before the optimizer step, so every process sees
    it: both stop with the one-line error instead of one waiting for the other."""
    worker = tmp_path / "worker.py"
    worker.write_text(NAN_ON_ONE_PROCESS)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29548"]
    out = tmp_path / "policy"
    argv = [*launch, str(worker), *map(str, train_args(batch, tiny_model, out))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    # both processes print it (their lines may interleave on the shared stderr; the launcher
    # then reports its failed children in a traceback of its own): the poisoned one names its
    # rollouts and finds every input finite, the other says where it happened
    assert done.stderr.count("Error: the loss became nan at step 1") == 2
    assert done.stderr.count("from finite inputs: nothing was saved") == 1
    assert done.stderr.count("at step 1 on another process: nothing was saved") == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_model, mini_dataset, cli):
    """Rollouts sampled by `cfiw rollout` at T = 0.7, top-p 1 (CPU, float32)."""
    path = tmp_path_factory.mktemp("sampled") / "rollouts.parquet"
    result = cli(
        "rollout",
        "--model",
        tiny_model,
        "--dataset",
        mini_dataset,
        "--limit",
        "4",
        "--group-size",
        "4",
        "--max-new-tokens",
        "24",
        "--temperature",
        "0.7",
        "--top-p",
        "1.0",
        "--out",
        path,
    )
    assert result.exit_code == 0, result.stderr
    return path


def train_uniform(cli, model, rollouts, out, *extra):
    # a random-init model earns no reward: keep the equal-reward groups (advantage 0) and the
    # truncated completions so that every token is compared with what the sampler recorded
    return cli(
        "train",
        "--model",
        model,
        "--rollouts",
        rollouts,
        "--weighting",
        "uniform",
        "--out",
        out,
        "--metrics-out",
        out.parent / f"{out.name}-metrics.parquet",
        "--weights-out",
        out.parent / f"{out.name}-weights.parquet",
        "--no-dynamic-sampling",
        "--no-mask-truncated",
        "--minibatches",
        "2",
        "--lr",
        "1e-3",
        *extra,
    )


def test_train_is_on_policy_at_the_rollouts_temperature(cli, sampled, tiny_model, tmp_path):
    out = tmp_path / "policy"
    result = train_uniform(cli, tiny_model, sampled, out)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "cfiw_manifest.json").read_text())
    assert manifest["metrics"]["temperature"] == 0.7 and manifest["metrics"]["temperature_source"] == "rollouts"
    assert manifest["metrics"]["max_new_tokens"] == 24
    metrics = pq.read_table(tmp_path / "policy-metrics.parquet").to_pylist()
    # old log-probs of softmax(logits / 0.7) equal what the sampler recorded
    assert metrics[0]["tokens"] > 50
    assert max(m["rollout_logprob_diff"] for m in metrics) < 1e-4
    assert manifest["metrics"]["rollout_logprob_diff"] < 1e-4
    # the first minibatch is exactly on-policy
    assert metrics[0]["ratio_mean"] == 1.0
    assert metrics[0]["clip_frac_low"] == metrics[0]["clip_frac_high"] == 0.0


def test_a_wrong_temperature_shows_in_the_rollout_logprob_diff(cli, sampled, tiny_model, tmp_path):
    out = tmp_path / "policy"
    result = train_uniform(cli, tiny_model, sampled, out, "--temperature", "1.0")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "cfiw_manifest.json").read_text())["metrics"]["temperature_source"] == "--temperature"
    assert min(m["rollout_logprob_diff"] for m in pq.read_table(tmp_path / "policy-metrics.parquet").to_pylist()) > 1e-2


def test_dr_grpo_normalizes_by_the_rollouts_max_new_tokens(cli, sampled, batch, tiny_model, tmp_path):
    out = tmp_path / "policy"
    assert train_uniform(cli, tiny_model, sampled, out, "--loss-type", "dr_grpo").exit_code == 0
    assert json.loads((out / "cfiw_manifest.json").read_text())["metrics"]["max_new_tokens"] == 24
    # rollouts written by another tool without the limit: a clear error, and the flag fixes it
    result = cli(
        "train",
        "--model",
        tiny_model,
        "--rollouts",
        batch["rollouts"],
        "--weighting",
        "uniform",
        "--loss-type",
        "dr_grpo",
        "--out",
        tmp_path / "p2",
    )
    assert_clean_error(result, "dr_grpo needs the length limit")
    assert "--max-new-tokens" in result.stderr and not (tmp_path / "p2").exists()
    result = cli(
        "train",
        "--model",
        tiny_model,
        "--rollouts",
        batch["rollouts"],
        "--weighting",
        "uniform",
        "--loss-type",
        "dr_grpo",
        "--max-new-tokens",
        "64",
        "--out",
        tmp_path / "p3",
        "--metrics-out",
        tmp_path / "p3.parquet",
        "--weights-out",
        tmp_path / "w3.parquet",
    )
    assert result.exit_code == 0, result.stderr
    assert "does not record its sampling temperature" in result.stderr


@pytest.mark.parametrize("profile", ["cfiw", "authors"])
@pytest.mark.parametrize("mode", ["random", "inverted"])
def test_profiles_and_random_mode(cli, batch, tiny_model, tmp_path, profile, mode):
    out = tmp_path / "policy"
    result = cli(*train_args(batch, tiny_model, out, "--weighting", mode, "--profile", profile))
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "cfiw_manifest.json").read_text())
    assert manifest["config"]["profile"] == profile and manifest["config"]["weighting"] == mode
    assert manifest["config"]["min_spread"] == 1e-3
    weights = pq.read_table(tmp_path / "policy-weights.parquet").to_pylist()
    rollouts = {r["rollout_id"]: r for r in pq.read_table(batch["rollouts"]).to_pylist()}
    reweighted = [w for w in weights if set(w["token_weights"]) != {1.0}]
    assert reweighted, "some rollout has scored spans"
    for row in reweighted:
        assert row["token_weights"][-1] == 1.0  # EOS
        body = row["token_weights"][:-1]
        assert sum(body) / len(body) == pytest.approx(1.0, abs=1e-5)
        assert len(row["token_weights"]) == len(rollouts[row["rollout_id"]]["completion_ids"])
    again = tmp_path / "again"
    assert cli(*train_args(batch, tiny_model, again, "--weighting", mode, "--profile", profile)).exit_code == 0
    assert pq.read_table(tmp_path / "again-weights.parquet").to_pylist() == weights  # seeded


def test_bad_temperature(cli, batch, tiny_model, tmp_path):  # a bad --profile exits 2 at parsing (test_cli_help)
    done = cli(*train_args(batch, tiny_model, tmp_path / "p", "--temperature", "0"))
    assert done.exit_code == 2 and "'--temperature': 0.0 is not above 0" in done.stderr
    assert not (tmp_path / "p").exists()


def test_scoring_only_mixed_groups_trains_the_same_policy(cli, tiny_model, tmp_path):
    """`score --groups mixed` leaves the groups with equal rewards unscored; train's dynamic
    sampling drops those groups, so the update is the one from every rollout's scores."""
    from transformers import AutoTokenizer

    directory = tmp_path / "iter-0000"
    # q-0: both right, q-2: both wrong (equal rewards); q-1 and q-3: one right, one wrong
    golds = ["19", "6", "22.5", "4", "0", "0", "42", "2"]
    rollouts = write_rollouts(
        directory / "rollouts.parquet", AutoTokenizer.from_pretrained(tiny_model), COMPLETIONS + ["#### 1"], golds
    )
    spans = directory / "spans.parquet"
    assert cli("segment", "--rollouts", rollouts, "--model", tiny_model, "--out", spans).exit_code == 0
    scores = {}
    for groups in ("all", "mixed"):
        scores[groups] = directory / f"scores-{groups}.parquet"
        result = cli("score", "--rollouts", rollouts, "--spans", spans, "--model", tiny_model,
                     "--out", scores[groups], "--groups", groups)  # fmt: skip
        assert result.exit_code == 0, result.stderr
    assert "(4 rollouts of groups with equal rewards left unscored)" in result.stderr
    manifest = json.loads(pq.read_schema(scores["mixed"]).metadata[b"cfiw"])
    assert manifest["metrics"]["unscored_equal_reward_rollouts"] == 4
    every = {(r["rollout_id"], r["span_idx"]): r for r in pq.read_table(scores["all"]).to_pylist()}
    mixed = {(r["rollout_id"], r["span_idx"]): r for r in pq.read_table(scores["mixed"]).to_pylist()}
    assert {rollout for rollout, _ in every} > {rollout for rollout, _ in mixed}
    assert set(mixed) == {key for key in every if key[0].split(":")[1] in ("q-1", "q-3")}
    for key, row in mixed.items():
        assert row["delta"] == pytest.approx(every[key]["delta"], abs=1e-5)

    policies = {}
    for groups, scores_file in scores.items():
        out = tmp_path / f"policy-{groups}"
        args = ["train", "--model", tiny_model, "--rollouts", rollouts, "--spans", spans, "--scores", scores_file,
                "--out", out, "--weights-out", tmp_path / f"weights-{groups}.parquet", "--optimizer", "sgd",
                "--lr", "1e-2"]  # fmt: skip
        assert cli(*args).exit_code == 0
        policies[groups] = parameters(out)
    # SGD: the step is linear in the gradient, so the deltas' last-digit differences (different
    # batches in score) stay last-digit differences (AdamW's first step would amplify them)
    step = max_change(policies["all"], parameters(tiny_model))
    assert step > 1e-5 and max_change(policies["all"], policies["mixed"]) < 1e-3 * step
    weights = {g: pq.read_table(tmp_path / f"weights-{g}.parquet").to_pylist() for g in scores}
    for full, partial in zip(weights["all"], weights["mixed"], strict=True):
        if full["kept"]:
            assert partial["token_weights"] == pytest.approx(full["token_weights"], abs=1e-4)
        else:  # an unscored rollout weighs as in uniform; dynamic sampling drops it either way
            assert not partial["kept"] and set(partial["token_weights"]) == {1.0}
