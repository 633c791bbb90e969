"""`cfiw analyze`: exact tables on hand-made runs; plots and reports on a real tiny run."""

import json
import math

import pyarrow as pa
import pytest
from test_errors import assert_clean_error

from cfiw_cli.artifacts import build_manifest, write_table
from cfiw_cli.report.analyze import run as analyze


def write(path, columns, stage="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(pa.table(columns), path, build_manifest(stage, {}, {}, rows=0, seconds=0))


def make_run(root, mode, accuracies, deltas, dropped=False):
    """A run whose numbers are known: eval accuracies per iteration, one rollout with two spans
    (`dropped`: and the weights of a rollout that dynamic sampling left out of the update)."""
    (root).mkdir(parents=True)
    (root / "config.toml").write_text(f'[loop]\nweighting = "{mode}"\n')
    for iteration, correct in enumerate(accuracies):
        write(
            root / "eval" / f"iter-{iteration:04d}.parquet",
            {"prompt_id": [f"p{i}" for i in range(len(correct))], "correct": correct},
        )
    d = root / "iter-0000"
    write(
        d / "rollouts.parquet",
        {
            "rollout_id": ["0:p:0", "0:p:1"],
            "iteration": pa.array([0, 0], pa.int32()),
            "reward": pa.array([1.0, 0.0], pa.float32()),
            "completion_ids": [[1, 2, 3, 4], [5, 6, 7, 8]],
        },
    )
    write(
        d / "spans.parquet",
        {
            "rollout_id": ["0:p:0"] * 3,
            "span_idx": pa.array([0, 1, 2], pa.int32()),
            "kind": ["calculation", "scaffolding", "answer"],
            "tok_start": pa.array([0, 1, 2], pa.int32()),
            "tok_end": pa.array([1, 2, 4], pa.int32()),
        },
    )
    write(
        d / "scores.parquet",
        {
            "rollout_id": ["0:p:0"] * 2,
            "span_idx": pa.array([0, 1], pa.int32()),
            "delta": pa.array(deltas, pa.float32()),
        },
    )
    extra = 1 if dropped else 0
    write(
        d / "weights.parquet",
        {
            "rollout_id": ["0:p:0", "0:p:1", "0:q:0"][: 2 + extra],
            "weighting": [mode] * (2 + extra),
            "token_weights": [[2.0, 1.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [9.0, 9.0]][: 2 + extra],
            "advantage": pa.array([1.0, -1.0, 0.0][: 2 + extra], pa.float32()),
            "kept": [True, True, False][: 2 + extra],
        },
    )
    return root


def test_tables_by_hand(tmp_path):
    uniform = make_run(
        tmp_path / "u", "uniform", [[True, False, False, False], [True, True, False, False]], [1.0, -1.0]
    )
    cfiw = make_run(
        tmp_path / "c",
        "cfiw",
        [[True, False, False, False], [True, True, True, False], [True, True, True, True]],
        [3.0, 1.0],
        dropped=True,
    )
    tables = analyze([str(uniform), str(cfiw)], str(tmp_path / "report"))
    accuracy = {(r["run"], r["iteration"]): r for r in tables["accuracy"]}
    assert accuracy[("u", 1)]["accuracy"] == 0.5 and accuracy[("c", 2)]["accuracy"] == 1.0
    # Wilson 95% for 2 of 4: (0.1500, 0.8500)
    assert accuracy[("u", 1)]["ci_low"] == pytest.approx(0.1500, abs=1e-4) and accuracy[("u", 1)][
        "ci_high"
    ] == pytest.approx(0.8500, abs=1e-4)
    assert accuracy[("c", 2)]["ci_high"] == 1.0 and accuracy[("c", 0)]["mode"] == "cfiw"
    reach = {r["run"]: r for r in tables["iterations_to_uniform"]}
    assert reach["u"]["uniform_final_accuracy"] == 0.5
    assert reach["u"]["first_iteration"] == 1 and reach["c"]["first_iteration"] == 1
    assert {(r["run"], r["mean_reward"]) for r in tables["reward"]} == {("u", 0.5), ("c", 0.5)}
    deltas = {(r["run"], r["kind"]): r for r in tables["delta_by_kind"]}
    assert deltas[("u", "scaffolding")]["mean_delta"] == -1.0 and deltas[("u", "scaffolding")]["share_negative"] == 1.0
    assert deltas[("c", "calculation")]["median_delta"] == 3.0 and deltas[("c", "calculation")]["spans"] == 1
    # token weight 2 + 1 + .5 + .5 + 4 (second rollout) = 8: calculation 2/8, scaffolding 1/8, answer 1/8, rest 4/8;
    # the dropped rollout's weights (9, 9) are no part of an update and count nowhere
    shares = {r["kind"]: r["share"] for r in tables["weight_by_kind"] if r["run"] == "c"}
    assert shares == pytest.approx({"calculation": 0.25, "scaffolding": 0.125, "answer": 0.125, "outside spans": 0.5})
    report = tmp_path / "report"
    assert json.loads((report / "accuracy.json").read_text())[0]["run"] in ("c", "u")
    for name in ("accuracy.png", "delta_by_kind.png", "weight_by_kind.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## accuracy" in (report / "report.md").read_text()


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tmp_path, tiny_model):
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    cfiw = str(Path(sys.executable).parent / "cfiw")
    done = subprocess.run(
        [
            cfiw,
            "loop",
            "--preset",
            "tiny",
            "--run",
            str(run),
            "--model",
            str(tiny_model),
            "--iterations",
            "1",
            "--set",
            "loop.questions=8",
            "--set",
            "rollout.group_size=4",
            "--set",
            "score.groups=all",  # the random model earns no reward: keep (and score) its equal-reward groups
            "--set",
            "train.dynamic_sampling=false",
            "--set",
            "loop.eval_limit=16",
            "--set",
            "loop.probe_questions=4",
            "--set",
            "loop.probe_samples=2",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = tmp_path / "report"
    done = subprocess.run(
        [cfiw, "analyze", str(run), "--out", str(report)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("accuracy.png", "probe.png", "delta_by_kind.png", "weight_by_kind.png"):
        from PIL import Image

        with Image.open(report / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # accuracy, probe, reward, delta and weight by kind
    probe = {r["iteration"]: r for r in json.loads((report / "probe.json").read_text())}
    assert sorted(probe) == [0, 1] and probe[0]["step"] == 0 and probe[1]["step"] >= 0 and probe[1]["samples"] == 2
    # the answer first, then the plots, then the tables (collapsible), then the explorer
    order = [page.index(f'<section id="{name}">') for name in ("summary", "plots", "tables", "explorer")]
    assert order == sorted(order) and page.count("<details>") >= 5 and "(no data)" not in page
    assert page.count("<figcaption") == 5
    embedded = page[page.index('id="explorer-data">') + len('id="explorer-data">') :]
    data = json.loads(embedded[: embedded.index("</script>")])
    assert data["modes"][:3] == ["cfiw", "uniform", "inverted"] and data["shown"] == data["total"] > 0
    first = data["rollouts"][0]
    assert all(len(w) == len(first["tokens"]) for w in first["weights"].values())
    assert set(first["weights"]["uniform"]) == {1.0}
    tokens = sum(len(r["tokens"]) for r in data["rollouts"])
    payload = len(json.dumps(data, separators=(",", ":")))
    assert payload / tokens < 60  # bytes per token: 512 completions of 160 tokens stay under 5 MB
    markdown = (report / "report.md").read_text()
    assert markdown.index("## Summary") < markdown.index("## Plots") < markdown.index("## Tables")
    assert "### delta by kind" in markdown and "probe reward" in markdown.split("## Plots")[0]
    capped = subprocess.run(
        [cfiw, "analyze", str(run), "--out", str(tmp_path / "capped"), "--explorer-rollouts", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert capped.returncode == 0, capped.stderr[-2000:]
    page = (tmp_path / "capped" / "report.html").read_text()
    assert f"Showing 1 of {data['total']} scored rollouts" in page and f"{data['total'] - 1} left out" in page


def test_bad_input(cli, tmp_path):
    assert_clean_error(cli("analyze", tmp_path / "missing", "--out", tmp_path / "r"), "run directory not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(cli("analyze", tmp_path / "empty", "--out", tmp_path / "r"), "no artifacts")


def labelled_run(root, span_texts, deltas):
    """One rollout whose reference solution has a restatement, a calculation and a filler."""
    reference = [
        {"text": "Ava starts with 7 apples.", "label": "restatement"},
        {"text": "Let me think about this.", "label": "filler"},
        {"text": "7 + 5 = <<7+5=12>>12.", "label": "calculation"},
        {"text": "#### 12", "label": "answer"},
    ]
    root.mkdir(parents=True)
    (root / "config.toml").write_text('[loop]\nweighting = "cfiw"\n')
    d = root / "iter-0000"
    n = len(span_texts)
    write(
        d / "rollouts.parquet",
        {
            "rollout_id": ["0:p:0"],
            "iteration": pa.array([0], pa.int32()),
            "reward": pa.array([1.0], pa.float32()),
            "labels": [reference],
        },
    )
    write(
        d / "spans.parquet",
        {
            "rollout_id": ["0:p:0"] * n,
            "span_idx": pa.array(range(n), pa.int32()),
            "kind": ["numeric"] * n,
            "text": span_texts,
        },
    )
    write(
        d / "scores.parquet",
        {
            "rollout_id": ["0:p:0"] * n,
            "span_idx": pa.array(range(n), pa.int32()),
            "delta": pa.array(deltas, pa.float32()),
        },
    )
    return root


def test_ground_truth_labels_and_auroc_by_hand(tmp_path):
    texts = [
        "7 + 5 = <<7+5=12>>12",  # calculation (the reference line without its full stop)
        "3 + 4 = <<3+4=9>>9.",  # calculation: same form, other (even wrong) numbers
        "Let me think about this.",  # filler
        "\n  Let me think about  this.",  # filler: whitespace does not matter
        "Bob starts with 3 pencils.",  # no reference has this form: unmatched
        "Let me think. 7 + 5",  # merged text: unmatched
    ]
    tables = analyze(
        [str(labelled_run(tmp_path / "r", texts, [2.0, 0.5, 0.5, -1.0, 9.0, 9.0]))], str(tmp_path / "report")
    )
    by_label = {r["label"]: r for r in tables["delta_by_label"]}
    assert {k: v["spans"] for k, v in by_label.items()} == {"calculation": 2, "filler": 2, "unmatched": 2}
    assert by_label["calculation"]["mean_delta"] == 1.25 and by_label["filler"]["mean_delta"] == -0.25
    # calculation deltas {2.0, 0.5} against filler deltas {0.5, -1.0}: of the 4 pairs, 3 are won by
    # the calculation span and one (0.5 vs 0.5) is tied and counts 1/2, so AUROC = 3.5 / 4
    (row,) = tables["importance_auroc"]
    assert (row["calculation_spans"], row["filler_spans"]) == (2, 2) and row["auroc"] == pytest.approx(0.875)


def test_auroc_matches_pairwise_counting_with_ties(tmp_path):
    import random

    rng = random.Random(0)
    calc = [rng.choice([0.0, 0.5, 1.0, 2.0, 3.0]) for _ in range(17)]
    filler = [rng.choice([-1.0, 0.0, 0.5, 1.0]) for _ in range(11)]
    texts = ["7 + 5 = <<7+5=12>>12."] * len(calc) + ["Let me think about this."] * len(filler)
    tables = analyze([str(labelled_run(tmp_path / "r", texts, calc + filler))], str(tmp_path / "report"))
    expected = sum((c > f) + 0.5 * (c == f) for c in calc for f in filler) / (len(calc) * len(filler))
    assert tables["importance_auroc"][0]["auroc"] == pytest.approx(expected)


def test_accuracy_by_mode_over_seeds(tmp_path):
    runs = [
        make_run(tmp_path / "c0", "cfiw", [[True, False], [True, False]], [1.0, 0.0]),
        make_run(tmp_path / "c1", "cfiw", [[False, False], [True, True]], [1.0, 0.0]),
        make_run(tmp_path / "u0", "uniform", [[True, False], [False, False]], [1.0, 0.0]),
    ]
    tables = analyze([str(r) for r in runs], str(tmp_path / "report"))
    by_mode = {(r["mode"], r["iteration"]): r for r in tables["accuracy_by_mode"]}
    # cfiw, final iteration: accuracies 0.5 and 1.0 -> mean 0.75, sample std sqrt(0.125) = 0.3536
    assert by_mode[("cfiw", 1)]["runs"] == 2 and by_mode[("cfiw", 1)]["mean_accuracy"] == 0.75
    assert by_mode[("cfiw", 1)]["std"] == pytest.approx(0.125**0.5)
    assert (by_mode[("cfiw", 0)]["min_accuracy"], by_mode[("cfiw", 0)]["max_accuracy"]) == (0.0, 0.5)
    assert by_mode[("uniform", 1)]["std"] == 0 and by_mode[("uniform", 1)]["mean_accuracy"] == 0.0
    final = {r["mode"]: r for r in tables["final_accuracy_by_mode"]}
    assert final["cfiw"]["mean_accuracy"] == 0.75 and final["uniform"]["runs"] == 1
    assert (tmp_path / "report" / "accuracy_by_mode.png").exists()


def probe_run(root, mode, seed, rewards, steps_per_iteration=2):
    """A run with a probe of 2 questions x 2 samples per evaluated iteration (rewards in quarters)
    and `steps_per_iteration` optimizer steps (train_metrics rows) in each iteration."""
    root.mkdir(parents=True)
    (root / "config.toml").write_text(f'[loop]\nweighting = "{mode}"\nseed = {seed}\n')
    for iteration, reward in enumerate(rewards):
        hits = round(reward * 4)
        correct = [hits >= 1, hits >= 3, hits >= 2, hits >= 4]  # question p0: first two, p1: last two
        write(
            root / "probe" / f"iter-{iteration:04d}.parquet",
            {"prompt_id": ["p0", "p0", "p1", "p1"], "correct": correct},
        )
        if iteration < len(rewards) - 1:
            write(root / f"iter-{iteration:04d}" / "train_metrics.parquet", {"step": list(range(steps_per_iteration))})
    return root


def test_probe_curves_and_the_mode_comparison_by_hand(tmp_path):
    import pyarrow.parquet as pq

    runs = [
        probe_run(tmp_path / "u0", "uniform", 0, [0.25, 0.5, 0.75]),
        probe_run(tmp_path / "u1", "uniform", 1, [0.25, 0.25, 0.5]),
        probe_run(tmp_path / "c0", "cfiw", 0, [0.25, 0.75, 0.75]),
        probe_run(tmp_path / "c1", "cfiw", 1, [0.5, 0.75, 0.75]),
    ]
    tables = analyze([str(r) for r in runs], str(tmp_path / "report"))
    probe = {(r["run"], r["iteration"]): r for r in tables["probe"]}
    # two steps per iteration: the probe before iteration i is taken at step 2 i
    assert [probe[("u0", i)]["step"] for i in range(3)] == [0, 2, 4]
    # u0 at iteration 0: question shares (1/2, 0), mean 1/4, sample std 0.3536, SE = 0.3536 / sqrt(2) = 1/4
    first = probe[("u0", 0)]
    assert (first["reward"], first["questions"], first["samples"]) == (0.25, 2, 2)
    assert (
        first["se"] == pytest.approx(0.25)
        and first["ci_low"] == 0.0
        and first["ci_high"] == pytest.approx(0.25 + 1.959964 * 0.25)
    )
    runs_ = {r["run"]: r for r in tables["probe_runs"]}
    # area under the curve / steps, trapezoids over steps 0-2-4: u0 ((.25+.5) + (.5+.75)) / 4 = .5
    assert {k: v["auc"] for k, v in runs_.items()} == pytest.approx(
        {"u0": 0.5, "u1": 0.3125, "c0": 0.625, "c1": 0.6875}
    )
    # threshold: uniform's mean final reward (.75 + .5) / 2 = .625; u1 never reaches it
    assert {k: v["steps_to_threshold"] for k, v in runs_.items()} == {"u0": 4, "u1": None, "c0": 2, "c1": 2}
    # u0's gain paired by question: p0 goes 1/2 -> 1, p1 0 -> 1/2: gains (1/2, 1/2), mean 1/2, SE 0
    # c1's: p0 1/2 -> 1, p1 1/2 -> 1/2: gains (1/2, 0), mean 1/4, SE = 0.3536 / sqrt(2) = 1/4
    assert (runs_["u0"]["gain"], runs_["u0"]["gain_se"], runs_["c1"]["gain"]) == (0.5, 0.0, 0.25) and runs_["c1"][
        "gain_se"
    ] == pytest.approx(0.25)
    assert runs_["c1"]["gain_in_se"] == pytest.approx(1.0) and runs_["u0"]["gain_in_se"] is None
    modes = {r["mode"]: r for r in tables["mode_comparison"]}
    assert modes["uniform"]["final_reward"] == 0.625 and modes["cfiw"]["final_reward"] == 0.75
    assert modes["cfiw"]["final_std"] == 0.0 and modes["uniform"]["final_std"] == pytest.approx(0.1767767)
    # on the mean curves, uniform (.25, .375, .625) reaches .625 at step 4, cfiw (.375, .75, .75) at step 2
    assert (modes["uniform"]["steps_to_threshold"], modes["cfiw"]["steps_to_threshold"]) == (4, 2)
    assert (modes["uniform"]["runs_reaching"], modes["cfiw"]["runs_reaching"]) == (1, 2)
    differences = {(r["mode"], r["metric"]): r for r in tables["paired_differences"]}
    # final reward, paired by seed: cfiw - uniform = (0, .25): mean .125, std .1768,
    # 95% t (1 df) half-width 12.706 * .1768 / sqrt(2)
    final = differences[("cfiw - uniform", "final_reward")]
    assert (final["seeds"], final["mean_difference"]) == (2, pytest.approx(0.125))
    assert final["ci_high"] - final["mean_difference"] == pytest.approx(12.7062 * 0.1767767 / 2**0.5, rel=1e-4)
    auc = differences[("cfiw - uniform", "auc")]
    assert auc["mean_difference"] == pytest.approx(0.25)  # (.625 - .5 + .6875 - .3125) / 2
    curves = pq.read_table(tmp_path / "report" / "curves.parquet").to_pylist()
    assert {(r["run"], r["metric"], r["step"], r["value"]) for r in curves if r["iteration"] == 2} >= {
        ("c1", "probe_reward", 4, 0.75)
    }
    by_mode = pq.read_table(tmp_path / "report" / "curves_by_mode.parquet").to_pylist()
    cfiw_last = next(r for r in by_mode if r["mode"] == "cfiw" and r["iteration"] == 2)
    assert (cfiw_last["runs"], cfiw_last["mean"], cfiw_last["min"], cfiw_last["max"]) == (2, 0.75, 0.75, 0.75)
    for name in ("probe.png", "probe_by_mode.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"


def replay_run(root, seed, after):
    """A run with a replay.parquet: `after[mode]` is the reward after each replayed iteration's
    update (the likelihood columns are the reward x -1 and x -2, so their differences are too)."""
    root.mkdir(parents=True)
    (root / "config.toml").write_text(f'[loop]\nweighting = "cfiw"\nseed = {seed}\n')
    rows = {
        "iteration": [],
        "mode": [],
        "optimizer": [],
        "reward_after": [],
        "loglik_per_token_after": [],
        "answer_loglik_after": [],
    }
    for mode, values in after.items():
        for iteration, value in enumerate(values):
            for key, item in (
                ("iteration", iteration),
                ("mode", mode),
                ("optimizer", "kept"),
                ("reward_after", value),
                ("loglik_per_token_after", -value),
                ("answer_loglik_after", -2 * value),
            ):
                rows[key].append(item)
    write(root / "replay" / "replay.parquet", rows)
    return root


def test_paired_replay_differences_by_hand(tmp_path):
    runs = [
        replay_run(tmp_path / "s0", 0, {"uniform": [0.50, 0.50], "cfiw": [0.75, 0.50], "inverted": [0.25, 0.50]}),
        replay_run(tmp_path / "s1", 1, {"uniform": [0.25, 0.50], "cfiw": [0.50, 0.75], "inverted": [0.25, 0.25]}),
    ]
    tables = analyze([str(r) for r in runs], str(tmp_path / "report"))
    per_iteration = {(r["difference"], r["metric"], r["iteration"]): r for r in tables["replay_differences"]}
    # cfiw - uniform, iteration 0: s0 .75 - .5 = .25, s1 .5 - .25 = .25 -> mean .25, std 0
    assert per_iteration[("cfiw - uniform", "reward", 0)]["mean_difference"] == 0.25
    assert (
        per_iteration[("cfiw - uniform", "reward", 0)]["runs"] == 2
        and per_iteration[("cfiw - uniform", "reward", 0)]["std"] == 0
    )
    # iteration 1: s0 0, s1 .25 -> mean .125; the likelihoods carry the same differences x -1 and x -2
    assert per_iteration[("cfiw - uniform", "reward", 1)]["mean_difference"] == 0.125
    assert per_iteration[("cfiw - uniform", "loglik_per_token", 1)]["mean_difference"] == -0.125
    assert per_iteration[("cfiw - uniform", "answer_loglik", 1)]["mean_difference"] == -0.25
    summary = {(r["difference"], r["metric"]): r for r in tables["replay_summary"]}
    # cfiw - uniform over the 4 pairs (.25, 0, .25, .25): mean .1875, sample std .125,
    # 95% t interval with 3 degrees of freedom: .1875 -/+ 3.1824 * .125 / 2
    cfiw = summary[("cfiw - uniform", "reward")]
    assert (cfiw["pairs"], cfiw["runs"], cfiw["mean_difference"]) == (4, 2, 0.1875)
    assert cfiw["std"] == pytest.approx(0.125)
    assert (cfiw["ci_low"], cfiw["ci_high"]) == pytest.approx(
        (0.1875 - 3.182446 * 0.0625, 0.1875 + 3.182446 * 0.0625), abs=1e-5
    )
    # inverted - uniform: (-.25, 0, 0, -.25): mean -.125
    assert summary[("inverted - uniform", "reward")]["mean_difference"] == -0.125
    assert {r["mode"] for r in tables["replay"]} == {"uniform", "cfiw", "inverted"} and {
        r["loop_seed"] for r in tables["replay"]
    } == {0, 1}
    assert (tmp_path / "report" / "replay_differences.png").exists()


def test_a_run_at_another_importance_floor_is_its_own_mode(tmp_path):
    """`just compare modes=cfiw,cfiw@0` runs both with loop.weighting = cfiw; the tables tell them
    apart by the floor in the run's config."""
    from cfiw_cli.report.analyze import _mode_and_seed

    for name, train in (("paper", ""), ("zero", "[train]\nimportance_floor = 0.0\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text(f'[loop]\nweighting = "cfiw"\nseed = 2\n{train}')
    assert _mode_and_seed(tmp_path / "paper") == ("cfiw", 2)
    assert _mode_and_seed(tmp_path / "zero") == ("cfiw@0", 2)


def gradient_run(root, dataset, values, reference_halves=(1 / 3, 1 / 3)):
    """A run with a gradients summary: per mode, reference cosines of (iteration 0, minibatch 0)
    and (iteration 0, minibatch 1); the reference's halves have cosine 1/3 unless told."""
    from cfiw_cli.schemas import GRADIENTS

    root.mkdir(parents=True)
    (root / "config.toml").write_text(f'[loop]\nweighting = "cfiw"\n[data]\ndataset = "{dataset}"\n')
    rows = [
        {
            "iteration": 0,
            "mode": mode,
            "minibatch": minibatch,
            "grad_norm": 1.0,
            "uniform_cosine": 1.0,
            "reference_cosine": cosine,
            "halves_cosine": 0.5,
            "reference_halves_cosine": reference_halves[minibatch],
            "kind_shares": [{"part": "calculation", "share": 0.75, "tokens": 3}],
            "label_shares": [],
        }  # fmt: skip
        for mode, cosines in values.items()
        for minibatch, cosine in enumerate(cosines)
    ]
    write(root / "gradients" / "gradients.parquet", pa.Table.from_pylist(rows, schema=GRADIENTS).to_pydict())
    return root


def test_gradient_differences_by_hand(tmp_path):
    runs = [
        gradient_run(tmp_path / "a0", "data/a", {"uniform": [0.5, 0.5], "cfiw": [0.6, 0.7]}),
        gradient_run(tmp_path / "a1", "data/a", {"uniform": [0.4, 0.5], "cfiw": [0.5, 0.6]}),
        gradient_run(tmp_path / "b0", "data/b", {"uniform": [0.5, 0.5], "cfiw": [0.4, 0.4]}),
    ]
    tables = analyze([str(r) for r in runs], str(tmp_path / "report"))
    differences = {(r["dataset"], r["metric"]): r for r in tables["gradient_differences"]}
    # data/a: cfiw - uniform over the 4 pairs (.1, .2, .1, .1): mean .125, sample std .05,
    # 95% t interval with 3 degrees of freedom: .125 -/+ 3.1824 * .05 / 2
    a = differences[("data/a", "reference_cosine")]
    assert (a["pairs"], a["policies"], a["runs"]) == (4, 2, 2)
    assert a["mean_difference"] == pytest.approx(0.125) and a["std"] == pytest.approx(0.05)
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((0.125 - 3.182446 * 0.025, 0.125 + 3.182446 * 0.025), abs=1e-5)
    # the reference's halves have cosine c = 1/3: cos(r, E r) = sqrt(2c / (1 + c)) = 1/sqrt(2),
    # so `aligned` is reference_cosine x sqrt(2) and its differences too
    assert differences[("data/a", "aligned")]["mean_difference"] == pytest.approx(0.125 * 2**0.5)
    assert differences[("data/b", "reference_cosine")]["mean_difference"] == pytest.approx(-0.1)
    by_mode = {(r["dataset"], r["mode"]): r for r in tables["gradients_by_mode"]}
    assert by_mode[("data/a", "uniform")]["aligned"] == pytest.approx(0.475 * 2**0.5)
    shares = {(r["dataset"], r["mode"], r["part"]): r for r in tables["gradient_shares"]}
    assert shares[("data/b", "cfiw", "calculation")]["mean_share"] == 0.75
    assert (tmp_path / "report" / "gradient_alignment.png").exists()


def test_alignment_is_left_out_where_the_reference_is_all_noise(tmp_path):
    """A reference whose halves point apart (c <= 0) has no correction: its minibatch has no
    `aligned`, and the other measures keep it."""
    run = gradient_run(tmp_path / "a0", "data/a", {"uniform": [0.5, 0.1], "cfiw": [0.6, 0.3]}, (1 / 3, -0.1))
    tables = analyze([str(run)], str(tmp_path / "report"))
    differences = {r["metric"]: r for r in tables["gradient_differences"]}
    assert differences["reference_cosine"]["pairs"] == 2  # (.1 + .2) / 2
    assert differences["reference_cosine"]["mean_difference"] == pytest.approx(0.15)
    assert differences["aligned"]["pairs"] == 1  # minibatch 0 alone, at c = 1/3: .1 x sqrt(2)
    assert differences["aligned"]["mean_difference"] == pytest.approx(0.1 * 2**0.5)
    uniform = next(r for r in tables["gradients_by_mode"] if r["mode"] == "uniform")
    assert (uniform["minibatches"], uniform["aligned_minibatches"]) == (2, 1)
    assert uniform["aligned"] == pytest.approx(0.5 * 2**0.5) and math.isfinite(uniform["reference_cosine"])


def test_dial_points_sort_by_their_numbers():
    from cfiw_cli.report.analyze import _by_numbers

    points = ["data/arith-N2", "data/arith-L32", "data/arith", "data/arith-L8-N2", "data/arith-L8", "data/arith-L32-N2"]
    assert sorted(points, key=_by_numbers) == [
        "data/arith",
        "data/arith-L8",
        "data/arith-L8-N2",
        "data/arith-L32",
        "data/arith-L32-N2",
        "data/arith-N2",
    ]


def test_the_summary_leads_and_md_alone_writes_no_html(tmp_path):
    """The summary states each run's numbers first; `--format md` writes report.md only."""
    from cfiw_cli.page.summary import verdict

    uniform = make_run(
        tmp_path / "u", "uniform", [[True, False, False, False], [True, True, False, False]], [1.0, -1.0]
    )
    cfiw = make_run(tmp_path / "c", "cfiw", [[True, False, False, False], [True, True, True, True]], [3.0, 1.0])
    analyze([str(uniform), str(cfiw)], str(tmp_path / "md"), format="md")
    report = tmp_path / "md"
    assert (report / "report.md").exists() and not (report / "report.html").exists()
    summary = (report / "report.md").read_text().split("## Plots")[0]
    # greedy accuracy of run c: 1 of 4 at iteration 0, 4 of 4 at iteration 1; 25% of its weight on calculation
    assert "**c** (cfiw): greedy accuracy 0.250 -> 1.000" in summary
    assert "calculation 25%" in summary and "**u** (uniform): greedy accuracy 0.250 -> 0.500" in summary
    analyze([str(uniform), str(cfiw)], str(tmp_path / "html"), format="html", explorer_rollouts=1)
    page = (tmp_path / "html" / "report.html").read_text()
    assert not (tmp_path / "html" / "report.md").exists() and "(no data)" not in page
    assert 'id="explorer"' not in page  # these hand-made runs keep no tokenizer to decode tokens with
    # the verdict names what an interval separates, or says that nothing is
    rows = [{"comparison": "cfiw - uniform", "metric": "auc", "mean": 0.02, "ci_low": 0.01, "ci_high": 0.03}]
    assert verdict([("t", rows)]) == "1 of 1 intervals exclude zero: cfiw - uniform (auc, +0.020)."
    rows[0] |= {"ci_low": -0.01}
    assert verdict([("t", rows)]).startswith("No interval excludes zero")


def test_a_comparison_on_one_seed_says_it_has_no_interval():
    from cfiw_cli.page.summary import verdict
    from cfiw_cli.report.analyze import _interval_rows

    rows = [{"comparison": "cfiw - uniform", "metric": "auc", "n": 1, "mean": 0.0, "ci_low": math.nan}]
    rows[0]["ci_high"] = math.nan
    assert verdict([("t", rows)]) == "No interval could be computed: every comparison rests on a single seed or pair."
    assert _interval_rows(rows)[0]["95% interval"] == "none from 1 (needs 2 or more)"
