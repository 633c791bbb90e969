"""`cfiw gradients`: each mode's policy gradient at a kept policy, on train's own minibatches.

A hand-built model checks one gradient worked on paper; the end-to-end tests measure a loop on
the sharpening task whose problems carry synth labels (so the oracle and the label shares run)."""

import json
import math
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_same_tables, kill_when, write_jsonl
from test_errors import assert_clean_error

from cfiw_cli.algo.loss import LossConfig
from cfiw_cli.pipeline import gradients
from cfiw_cli.update import TrainSequence

BIN = Path(sys.executable).parent
MODES = "uniform,cfiw,cfiw@0,inverted,oracle,entropy,cfiw+authors"


class _Lookup(torch.nn.Module):
    """The decoder: token id -> a fixed hidden state (no parameters)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, input_ids, **_):
        return (self.table[input_ids],)


class HandModel(torch.nn.Module):
    """logits = W h(token): the only parameter is the LM head W `[V, H]`, so the gradient can be
    worked by hand: d log p(y | h) / d W = (e_y - p) h^T."""

    def __init__(self, table: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.decoder = _Lookup(table)
        self.lm_head = torch.nn.Linear(table.shape[1], vocab, bias=False)
        torch.nn.init.zeros_(self.lm_head.weight)

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, logits_to_keep=1, **_):
        hidden = self.decoder(input_ids)[0]
        return self.lm_head(hidden[:, -logits_to_keep:])


def test_a_two_token_gradient_worked_by_hand():
    # Tokens 0 and 1 have hidden states e1 and e2; W = 0, so p = (1/3, 1/3, 1/3) everywhere.
    # One sequence, prompt [0], completion [1, 2]: token 1 is predicted from h = e1, token 2
    # from h = e2. Advantage A = 1, weights (2, 0.5), dapo normalizer N = 2 tokens. At ratio 1
    # the loss's gradient is -(1/N) sum_t w_t A (e_{y_t} - p) h_t^T:
    #   column e1: -(1/2) * 2   * (e_1 - 1/3) = ( 1/3, -2/3,  1/3)
    #   column e2: -(1/2) * 0.5 * (e_2 - 1/3) = (1/12, 1/12, -1/6)
    model = HandModel(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), vocab=3)
    sequence = TrainSequence("r0", "g0", [0, 1, 2], 1, 1.0, [2.0, 0.5], [1.0, 1.0], [0.0, 0.0])
    measure = gradients.Measure(1.0, 2, 1024, LossConfig(), None, 1)
    token = {"first": {"r0": [1.0, 0.0]}, "second": {"r0": [0.0, 1.0]}}
    got = gradients.part_gradients(model, [sequence], {"r0": [2.0, 0.5]}, {"whole": None, **token}, measure)
    expected = torch.tensor([[1 / 3, 1 / 12], [-2 / 3, 1 / 12], [1 / 3, -1 / 6]], dtype=torch.float64)
    assert torch.allclose(got["whole"], expected.reshape(-1), atol=1e-7)
    assert torch.allclose(got["first"] + got["second"], got["whole"], atol=1e-7)
    # The parts are orthogonal (different columns): shares |g_1|^2 : |g_2|^2 = 2/3 : 1/24 = 16 : 1.
    shares = {
        r["part"]: r["share"] for r in gradients.shares({"first": got["first"], "second": got["second"]}, got["whole"])
    }
    assert shares == pytest.approx({"first": 16 / 17, "second": 1 / 17}, abs=1e-7)
    # Uniform weights give columns (1/6, -1/3, 1/6) and (1/6, 1/6, -1/3): <g, g_u> = 5/12,
    # |g|^2 = 17/24, |g_u|^2 = 1/3, so the cosine is (5/12) / sqrt(17/72).
    uniform = gradients.part_gradients(model, [sequence], {"r0": [1.0, 1.0]}, {"whole": None}, measure)["whole"]
    assert gradients.cosine(got["whole"], uniform) == pytest.approx((5 / 12) / math.sqrt(17 / 72), abs=1e-7)
    assert gradients.cosine(uniform, uniform) == pytest.approx(1.0, abs=1e-12)


def test_halves_split_whole_groups():
    members = [TrainSequence(f"r{i}", f"g{i // 2}", [0, 1], 1, 0.0, [1.0], [1.0], [0.0]) for i in range(6)]
    first, second = gradients.halves(members)
    assert [s.group for s in first] == ["g0", "g0", "g1", "g1"]
    assert [s.group for s in second] == ["g2", "g2"]


LABELLED_ANSWER = "1 + 2 = 3.\n#### 3"


@pytest.fixture(scope="module")
def looped(tmp_path_factory, sharpening_task, cli):
    """Two iterations in cfiw mode, every starting policy kept, on the sharpening task with
    synth labels (its one reference solution: a calculation line, then the answer)."""
    policy, task = sharpening_task
    root = tmp_path_factory.mktemp("gradients")
    labels = [{"text": "1 + 2 = 3.", "label": "calculation"}, {"text": "#### 3", "label": "answer"}]
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (task / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(root / "task" / f"{split}.jsonl", [r | {"labels": labels} for r in rows])
    config = root / "task.toml"
    config.write_text(
        f'[model]\nid = "{policy}"\n[data]\ndataset = "{root / "task"}"\n'
        "[loop]\niterations = 2\nquestions = 8\neval_every = 100\neval_limit = 4\nprobe_questions = 0\n"
        "seed = 0\nkeep_policies = 1\n"
        "[rollout]\ngroup_size = 8\nmax_new_tokens = 16\nbatch_size = 128\n"
        "[train]\nlr = 1e-3\nminibatches = 2\n"
    )
    run = root / "run"
    result = cli("loop", "--config", config, "--run", run, "--weighting", "cfiw")
    assert result.exit_code == 0, result.stderr
    return run


def gradient_argv(run: Path) -> list[str]:
    return [str(BIN / "cfiw"), "gradients", str(run), "--modes", MODES, "--reference-rollouts", "128"]


@pytest.fixture(scope="module")
def measured(looped, tmp_path_factory):
    run = tmp_path_factory.mktemp("measured") / "run"
    shutil.copytree(looped, run)
    import subprocess

    done = subprocess.run(gradient_argv(run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def rows(run: Path) -> list[dict]:
    return pq.read_table(run / "gradients" / "gradients.parquet").to_pylist()


@pytest.mark.slow
def test_every_mode_and_minibatch_is_measured(measured):
    got = rows(measured)
    modes = MODES.split(",")
    assert sorted({(r["iteration"], r["mode"], r["minibatch"]) for r in got}) == sorted(
        (i, m, b) for i in range(2) for m in modes for b in range(2)
    )
    for row in got:
        assert row["reference_rollouts"] == 128 and -1 <= row["reference_cosine"] <= 1
        if row["mode"] == "uniform":  # its cosine with itself
            assert row["uniform_cosine"] == pytest.approx(1.0, abs=1e-9)
        for partition in ("kind_shares", "label_shares"):  # the shares of a partition sum to 1
            assert sum(s["share"] for s in row[partition]) == pytest.approx(1.0, abs=1e-5)
        assert row["parts_residual"] < 1e-5  # each part by its own backward pass, summed
        assert {s["part"] for s in row["label_shares"]} <= {"calculation", "answer", "other"}
    floors = {r["mode"]: (r["weighting"], r["importance_floor"], r["profile"]) for r in got}
    assert floors["cfiw@0"] == ("cfiw", 0.0, "cfiw") and floors["cfiw+authors"] == ("cfiw", 0.5, "authors")
    by_mode = {m: [r for r in got if r["mode"] == m] for m in modes}
    assert any(abs(r["uniform_cosine"] - 1) > 1e-4 for r in by_mode["cfiw@0"])  # the weights change the gradient


@pytest.mark.slow
def test_the_gradient_is_the_one_train_stepped_with(measured):
    """At policy_k the loop's mode on minibatch 0 is train's first step: the same pre-clip norm."""
    for iteration in range(2):
        logged = pq.read_table(measured / f"iter-{iteration:04d}" / "train_metrics.parquet").to_pylist()[0]
        row = next(r for r in rows(measured) if (r["iteration"], r["mode"], r["minibatch"]) == (iteration, "cfiw", 0))
        assert row["grad_norm"] == pytest.approx(logged["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_the_parts_add_up_to_the_whole(measured, tmp_path):
    """Each span kind's part by its own backward pass; their sum is the whole gradient."""
    from cfiw_cli import modeling
    from cfiw_cli.pipeline import train
    from cfiw_cli.pipeline.loop import loop_plan
    from cfiw_cli.policies import policy_at

    planned = loop_plan(measured)
    step = planned.configs("train")[1]
    policy = policy_at(measured, 1, planned.model.id, False, tmp_path / "policy")
    model = modeling.load_model(policy, "float32")
    tokenizer = modeling.load_tokenizer(measured / "policy")
    batch = train.read_batch(step)
    sequences, _, _ = train.build_sequences(step, batch.rollouts, batch.spans, batch.scores, tokenizer)
    by_rollout = {}
    for span in batch.spans.to_pylist():
        by_rollout.setdefault(span["rollout_id"], []).append(span)
    kinds = gradients.selectors({s.rollout_id: gradients.token_kinds(s, by_rollout[s.rollout_id]) for s in sequences})
    assert len(kinds) >= 3
    # micro-batches of at most 512 padded tokens: the parts are summed over several
    measure = gradients.Measure(batch.sampling["temperature"], tokenizer.pad_token_id, 512, LossConfig(), None, 1)
    weights = {s.rollout_id: s.weights for s in sequences}
    got = gradients.part_gradients(model, sequences, weights, {"whole": None, **kinds}, measure)
    total = sum(got[k] for k in kinds)
    assert float((total - got["whole"]).norm()) <= 1e-5 * float(got["whole"].norm())


@pytest.mark.slow
def test_a_killed_run_resumes_to_identical_files(looped, measured, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(looped, run)
    kill_when(gradient_argv(run), run / "gradients" / "cfiw" / "iter-0000" / "gradients.parquet", tmp_path)
    assert not (run / "gradients" / "gradients.parquet").exists()  # it really was interrupted
    import subprocess

    done = subprocess.run(gradient_argv(run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "uniform/iter-0000/gradients.parquet is up to date" in done.stderr  # the cell kept from before the kill
    assert_same_tables(measured / "gradients", run / "gradients")


@pytest.mark.slow
def test_sql_and_analyze_read_the_measurement(measured, cli, tmp_path):
    result = cli("sql", measured, "select count(distinct mode) as modes from gradients", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[1] == str(len(MODES.split(",")))
    result = cli("analyze", measured, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.stderr
    differences = json.loads((tmp_path / "report" / "gradient_differences.json").read_text())
    reference = {r["difference"]: r for r in differences if r["metric"] == "reference_cosine"}
    assert reference["cfiw@0 - uniform"]["pairs"] == 4  # 2 policies x 2 minibatches
    assert reference["cfiw@0 - uniform"]["ci_low"] <= reference["cfiw@0 - uniform"]["mean_difference"]
    assert (tmp_path / "report" / "gradient_alignment.png").stat().st_size > 10_000
    assert "gradient differences" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_bad_requests_are_one_line_errors(looped, cli, tmp_path):
    assert_clean_error(cli("gradients", tmp_path / "absent"), "not found")
    assert_clean_error(cli("gradients", looped, "--iterations", "5"), "no kept policy")
    for modes, problem in (("uniform,bogus", "unknown mode 'bogus'"), ("cfiw+nobody", "profile after +")):
        usage = cli("gradients", looped, "--modes", modes)  # a bad flag value: a usage error, before anything loads
        assert usage.exit_code == 2 and problem in usage.stderr and "Traceback" not in usage.stderr
    copy = tmp_path / "run"
    shutil.copytree(looped, copy)
    bad = cli("gradients", copy, "--iterations", "0", "--reference-rollouts", "10", "--modes", "uniform")
    assert_clean_error(bad, "fewer than the iteration's 64 rollouts")


@pytest.mark.slow
def test_without_shares_or_reference_only_the_cosines_are_measured(looped, measured, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(looped, run)
    argv = gradient_argv(run)[:3] + ["--modes", "uniform,cfiw", "--iterations", "1", "--no-shares"]
    import subprocess

    done = subprocess.run([*argv, "--reference-rollouts", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = {(r["mode"], r["minibatch"]): r for r in rows(run)}
    full = {(r["mode"], r["minibatch"]): r for r in rows(measured) if r["iteration"] == 1}
    assert sorted(got) == [("cfiw", 0), ("cfiw", 1), ("uniform", 0), ("uniform", 1)]
    for key, row in got.items():
        assert row["kind_shares"] == [] and row["label_shares"] == [] and row["parts_residual"] is None
        assert row["reference_cosine"] is None and row["reference_rollouts"] == 0
        for column in ("grad_norm", "uniform_cosine", "halves_cosine"):  # the same as with shares
            assert row[column] == pytest.approx(full[key][column], rel=1e-6)
