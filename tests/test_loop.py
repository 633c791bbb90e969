"""`cfiw loop`: same files as the chained commands, resumable after a kill, presets that parse."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_same_tables, kill_when, lock_held_elsewhere, run_chained, tokenizer_files
from test_errors import assert_clean_error

from cfiw_cli.errors import CfiwError
from cfiw_cli.pipeline.loop import apply_overrides, command_line, load_config, plan, presets

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]  # where the presets' relative paths (data/arith, runs/...) resolve


SMALL = [
    "--eval-every",
    "1",
    "--set",
    "loop.questions=8",
    "--set",
    "rollout.group_size=4",
    "--set",
    "rollout.max_new_tokens=48",
    "--set",
    "loop.eval_limit=16",
    "--set",
    "loop.probe_questions=4",
    "--set",
    "loop.probe_samples=2",
    "--set",
    "loop.keep_policies=1",
]


def kept_files(run: Path) -> dict[str, object]:
    """The kept policies, byte for byte (a manifest by its config: it also holds times and paths)."""
    import json

    def content(path: Path) -> object:
        if path.name == "cfiw_manifest.json":
            manifest = json.loads(path.read_text())
            paths = ("model", "rollouts", "spans", "scores", "reference")  # under each run's own directory
            return {k: v for k, v in manifest["config"].items() if k not in paths}, sorted(manifest["inputs"])
        return path.read_bytes()

    return {str(p.relative_to(run)): content(p) for p in sorted((run / "policies").rglob("*")) if p.is_file()}


def loop_argv(model, run):
    """The tiny preset at test sizes (the --set values must reach the dry-run commands too)."""
    return [
        str(BIN / "cfiw"),
        "loop",
        "--preset",
        "tiny",
        "--run",
        str(run),
        "--model",
        str(model),
        "--iterations",
        "2",
        *SMALL,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    run = tmp_path_factory.mktemp("loop") / "run"
    done = subprocess.run(loop_argv(tiny_model, run), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.mark.slow
def test_loop_writes_the_run_layout(uninterrupted):
    names = sorted(
        str(p.relative_to(uninterrupted)) for p in uninterrupted.rglob("*") if p.is_file() and "policy" not in p.parts
    )
    assert names == sorted(
        [
            "best/best.json",
            "best/cfiw_manifest.json",
            "best/config.json",
            "best/generation_config.json",
            "best/model.safetensors",
            *(f"best/{name}" for name in tokenizer_files()),
            "config.toml",
            "eval/iter-0000.parquet",
            "eval/iter-0001.parquet",
            "eval/iter-0002.parquet",
            "iter-0000/rollouts.parquet",
            "iter-0000/scores.parquet",
            "iter-0000/spans.parquet",
            "iter-0000/train_metrics.parquet",
            "iter-0000/weights.parquet",
            "iter-0001/rollouts.parquet",
            "iter-0001/scores.parquet",
            "iter-0001/spans.parquet",
            "iter-0001/train_metrics.parquet",
            "iter-0001/weights.parquet",
            "loop_state.json",
            "policies/config.json",
            "policies/generation_config.json",
            "policies/iter-0001/cfiw_manifest.json",
            "policies/iter-0001/model.safetensors",
            "policies/iter-0001/optimizer.pt",
            "policies/iter-0001/scheduler.pt",
            "policies/iter-0001/trainer_state.json",
            *(f"policies/{name}" for name in tokenizer_files()),
            "probe/iter-0000.parquet",
            "probe/iter-0001.parquet",
            "probe/iter-0002.parquet",
        ]
    )
    # best/: the run's own policy (iteration 1 or 2) whose probe reward (mean@2) was highest, the earlier on a tie
    rewards = {}
    for i in (1, 2):
        rows = pq.read_table(uninterrupted / "probe" / f"iter-000{i}.parquet").to_pylist()
        by_question = {}
        for r in rows:
            by_question.setdefault(r["prompt_id"], []).append(r["correct"])
        rewards[i] = sum(sum(c) / len(c) for c in by_question.values()) / len(by_question)
    best = json.loads((uninterrupted / "best" / "best.json").read_text())
    assert best["metric"] == "probe mean@2" and best["value"] == pytest.approx(max(rewards.values()))
    assert best["iteration"] == min(i for i in rewards if rewards[i] == max(rewards.values()))
    probe = pq.read_table(uninterrupted / "probe" / "iter-0002.parquet").to_pylist()
    assert sorted((r["prompt_id"], r["sample_idx"]) for r in probe) == [
        (f"test-{q}", s) for q in range(4) for s in range(2)
    ]
    assert (uninterrupted / "policy" / "model.safetensors").exists() and (
        uninterrupted / "policy" / "optimizer.pt"
    ).exists()
    rollouts = pq.read_table(uninterrupted / "iter-0001" / "rollouts.parquet").to_pylist()
    assert {r["iteration"] for r in rollouts} == {1} and {r["prompt_id"] for r in rollouts} == {
        f"train-{i}" for i in range(8, 16)
    }


@pytest.mark.slow
def test_a_second_loop_on_a_running_run_is_refused(uninterrupted, tiny_model, tmp_path):
    """Two loops on one run directory would both redo its next iteration, from other policies."""
    run = tmp_path / "run"
    with lock_held_elsewhere(tmp_path / ".run.lock"):  # as a running loop holds it
        done = subprocess.run(loop_argv(tiny_model, run), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 1 and f"Error: another cfiw process is writing {run}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not run.exists()
    assert not (uninterrupted.parent / f".{uninterrupted.name}.lock").exists()  # a finished loop lets go


@pytest.mark.slow
def test_chained_commands_give_identical_files(uninterrupted, tiny_model, tmp_path):
    run = tmp_path / "staged"
    commands = subprocess.run(
        loop_argv(tiny_model, run) + ["--dry-run"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    run_chained(commands, ROOT)
    assert_same_tables(uninterrupted, run)
    assert kept_files(run) == kept_files(uninterrupted)  # the shell's copy of the starting policy is the loop's


CONTROLS = {
    "authors-floor0": ["--weighting", "cfiw", "--profile", "authors", "--set", "train.importance_floor=0.0"],
    "oracle-sgd": [
        "--weighting",
        "oracle",
        "--set",
        'train.optimizer="sgd"',
        "--set",
        "train.momentum=0.9",
        "--set",
        "train.lr=0.01",
    ],  # fmt: skip
    "entropy": ["--weighting", "entropy", "--set", "train.entropy_quantile=0.5", "--set", "train.mask_truncated=false"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(CONTROLS))
def test_every_control_runs_end_to_end_as_the_chained_commands_do(tiny_model, tmp_path, variant):
    """The authors' profile (segment, score and train), the new modes and SGD, one iteration each."""
    argv = loop_argv(tiny_model, tmp_path / "loop")
    argv[argv.index("--iterations") + 1] = "1"
    argv += CONTROLS[variant] + ["--set", "loop.keep_policies=0", "--set", "loop.probe_questions=0"]
    argv += ["--set", "loop.eval_limit=2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    staged = [a if a != str(tmp_path / "loop") else str(tmp_path / "staged") for a in argv]
    commands = subprocess.run(staged + ["--dry-run"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    run_chained(commands, ROOT)
    assert_same_tables(tmp_path / "loop", tmp_path / "staged")
    manifests = {
        stage: json.loads(pq.read_schema(tmp_path / "loop" / "iter-0000" / f"{stage}.parquet").metadata[b"cfiw"])
        for stage in ("spans", "scores", "weights")
    }
    profile = "authors" if variant.startswith("authors") else "cfiw"
    assert {m["config"]["profile"] for m in manifests.values()} == {profile}
    train = manifests["weights"]["config"]
    assert train["weighting"] == CONTROLS[variant][1]
    assert train["optimizer"] == ("sgd" if variant == "oracle-sgd" else "adamw")
    assert train["importance_floor"] == (0.0 if variant == "authors-floor0" else 0.5)
    state = json.loads((tmp_path / "loop" / "policy" / "trainer_state.json").read_text())
    assert state["optimizer"] == train["optimizer"]
    if variant == "entropy":
        weights = pq.read_table(tmp_path / "loop" / "iter-0000" / "weights.parquet").to_pylist()
        assert {w for row in weights if row["kept"] for w in row["token_weights"]} == {0.0, 1.0}


@pytest.mark.slow
def test_killed_loop_resumes_to_the_same_files(uninterrupted, tiny_model, tmp_path):
    run = tmp_path / "killed"
    kill_when(loop_argv(tiny_model, run), run / "iter-0001" / "rollouts.parquet", ROOT)  # iteration 2 of 2 began
    assert not (run / "iter-0001" / "train_metrics.parquet").exists()  # it really was interrupted
    for path in run.rglob("*.parquet"):  # nothing half-written under a final name
        pq.read_table(path)
    done = subprocess.run(loop_argv(tiny_model, run), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tables(uninterrupted, run)
    assert kept_files(run) == kept_files(uninterrupted)


def test_every_preset_parses_and_plans():
    names = sorted(presets())
    assert names == [
        "llama",
        "qwen",
        "qwen-0.5b",
        "tiny",
        "tiny-L32",
        "tiny-L32-N2",
        "tiny-L8",
        "tiny-L8-N2",
        "tiny-N2",
    ] + ["tiny-distractors"]
    for name in names:
        config = load_config(name, None)
        steps = plan(config, Path("runs/x")).steps
        assert [s.command for s in steps][:6] == ["eval", "eval", "rollout", "segment", "score", "train"]
        assert [s.role for s in steps][:2] == ["greedy", "probe"]
        for step in steps:
            expected = "test -d " if step.command == "keep" else f"cfiw {step.command} "  # keeping is a shell copy
            assert command_line(step.command, step.config).startswith(expected)
        kept = [s.config.out for s in steps if s.command == "keep"]
        assert kept == (
            [f"runs/x/policies/iter-{i:04d}" for i in range(4, config["loop"]["iterations"], 4)]
            if name.startswith("tiny")
            else []
        )
    assert load_config("qwen", None)["train"]["lr"] == 1e-6


def test_a_dial_preset_is_the_tiny_preset_with_its_own_data(tmp_path):
    tiny, dial = load_config("tiny", None), load_config("tiny-L8-N2", None)
    assert "base" not in dial
    assert dial["data"]["dataset"] == "data/arith-L8-N2" and dial["model"]["id"] == "runs/tiny-L8-N2-sft"
    assert dial["rollout"]["max_new_tokens"] == 192
    assert {k: v for k, v in dial["rollout"].items() if k != "max_new_tokens"} == {
        k: v for k, v in tiny["rollout"].items() if k != "max_new_tokens"
    }
    assert dial["train"] == tiny["train"] and dial["loop"] == tiny["loop"]
    mine = tmp_path / "mine.toml"
    mine.write_text('base = "tiny-L8"\n[loop]\niterations = 3\n')  # a base may have a base
    config = load_config(None, str(mine))
    assert config["loop"]["iterations"] == 3 and config["data"]["dataset"] == "data/arith-L8"
    for text, problem in (('base = "nope"', "no preset"), ('base = "tiny"\nseed = 1', "every top-level key")):
        mine.write_text(text + "\n")
        with pytest.raises(CfiwError, match=problem):
            load_config(None, str(mine))


def test_flags_override_the_preset():
    config = apply_overrides(load_config("tiny", None), {"loop.iterations": 5, "model.id": "m", "loop.seed": None})
    assert config["loop"]["iterations"] == 5 and config["model"]["id"] == "m" and config["loop"]["seed"] == 0
    assert len(plan(config, Path("runs/x")).configs("train")) == 5


def test_set_overrides_any_value_and_rejects_unknown_keys(cli, tmp_path):
    from cfiw_cli.pipeline.loop import parse_assignments

    assert parse_assignments(
        ["train.lr=3e-4", "rollout.group_size=4", "loop.weighting=uniform", 'score.mask="delete"']
    ) == {
        "train.lr": 3e-4,
        "rollout.group_size": 4,
        "loop.weighting": "uniform",
        "score.mask": "delete",
    }
    done = cli(
        "loop",
        "--preset",
        "tiny",
        "--run",
        tmp_path / "r",
        "--dry-run",
        "--set",
        "train.lr=3e-4",
        "--set",
        "rollout.group_size=4",
    )
    assert done.exit_code == 0, done.stderr
    assert all("--lr 0.0003" in line for line in done.stdout.splitlines() if line.startswith("cfiw train"))
    assert all("--group-size 4" in line for line in done.stdout.splitlines() if line.startswith("cfiw rollout"))
    evals = cli(
        "loop",
        "--preset",
        "tiny",
        "--run",
        tmp_path / "r",
        "--dry-run",
        "--set",
        "eval.max_new_tokens=200",
        "--set",
        "eval.samples=4",
    )
    assert evals.exit_code == 0, evals.stderr
    greedy = [line for line in evals.stdout.splitlines() if line.startswith("cfiw eval") and "/eval/" in line]
    assert greedy and all("--max-new-tokens 200 " in f"{line} " and "--samples 4 " in f"{line} " for line in greedy)
    assert_clean_error(
        cli("loop", "--preset", "tiny", "--run", tmp_path / "r", "--dry-run", "--set", "train.lrr=1"),
        "unknown key train.lrr",
    )
    assert_clean_error(
        cli("loop", "--preset", "tiny", "--run", tmp_path / "r", "--dry-run", "--set", "lr=1"), "SECTION.KEY=VALUE"
    )
    assert_clean_error(
        cli("loop", "--preset", "tiny", "--run", tmp_path / "r", "--dry-run", "--set", "optim.lr=1"),
        "unknown config section",
    )
    # the preset scores only groups with unequal rewards, which needs train's dynamic sampling
    assert all("--groups mixed" in line for line in done.stdout.splitlines() if line.startswith("cfiw score"))
    assert_clean_error(
        cli("loop", "--preset", "tiny", "--run", tmp_path / "r", "--dry-run", "--set", "train.dynamic_sampling=false"),
        "score.groups = 'mixed' leaves the groups with equal rewards unscored",
    )
    every = cli("loop", "--preset", "tiny", "--run", tmp_path / "r", "--dry-run",
                "--set", "train.dynamic_sampling=false", "--set", "score.groups=all")  # fmt: skip
    assert every.exit_code == 0 and "--groups all" in every.stdout and "--no-dynamic-sampling" in every.stdout


def test_unknown_preset(cli, tmp_path):
    unknown = cli("loop", "--preset", "nope", "--run", tmp_path / "r")
    assert unknown.exit_code == 2 and "tiny" in unknown.stderr  # the choices are listed
    neither = cli("loop", "--run", tmp_path / "r")  # a usage error: exit 2, the presets listed
    assert neither.exit_code == 2 and "exactly one of" in neither.stderr and "tiny" in neither.stderr
    both = cli("loop", "--preset", "tiny", "--config", tmp_path / "x.toml", "--run", tmp_path / "r")
    assert both.exit_code == 2 and "exactly one of" in both.stderr
    assert not (tmp_path / "r").exists()


def test_the_probe_samples_fixed_questions_at_the_rollout_temperature():
    config = apply_overrides(
        load_config("tiny", None),
        {"loop.iterations": 4, "loop.eval_every": 2, "loop.seed": 3, "loop.weighting": "uniform"},
    )
    planned = plan(config, Path("runs/x"))
    probes = list(planned.configs("eval", "probe").items())
    assert all("/probe/" in s.out for _, s in probes)  # the role decides where it is written
    assert [i for i, _ in probes] == [0, 2, 4]
    for _, probe in probes:
        assert (probe.split, probe.offset, probe.limit, probe.samples) == ("test", 0, 64, 8)
        assert (probe.temperature, probe.top_p, probe.max_new_tokens) == (
            config["rollout"]["temperature"],
            1.0,
            config["rollout"]["max_new_tokens"],
        )
    # the same questions and sampling seed whatever the run's seed and mode: only the policy differs
    other = plan(apply_overrides(config, {"loop.seed": 0, "loop.weighting": "cfiw"}), Path("runs/y"))
    other_probes = list(other.configs("eval", "probe").values())
    assert [(s.seed, s.limit, s.temperature) for _, s in probes] == [
        (s.seed, s.limit, s.temperature) for s in other_probes
    ]
    greedy = list(planned.configs("eval", "greedy").values())
    assert all(s.samples == 1 and s.temperature == 0.0 for s in greedy) and len(greedy) == 3
    templated = plan(apply_overrides(config, {"rollout.prompt_template": "Q: {question}\nA:"}), Path("runs/x"))
    assert {s.prompt_template for s in templated.configs("eval", "probe").values()} == {"Q: {question}\nA:"}
    off = plan(apply_overrides(config, {"loop.probe_questions": 0}), Path("runs/x"))
    assert not off.configs("eval", "probe") and len(off.configs("eval", "greedy")) == 3


def test_a_finite_train_pool_is_revisited_and_the_kl_anchor_is_the_start():
    config = apply_overrides(
        load_config("tiny", None),
        {"loop.iterations": 5, "loop.questions": 8, "loop.train_pool": 16, "train.beta": 0.1, "model.id": "warm"},
    )
    planned = plan(config, Path("runs/x"))
    assert [s.offset for s in planned.configs("rollout").values()] == [0, 8, 0, 8, 0]
    assert {s.reference for s in planned.configs("train").values()} == {"warm"}
    with pytest.raises(Exception, match="multiple of loop.questions"):
        plan(apply_overrides(config, {"loop.train_pool": 12}), Path("runs/x"))


def test_a_cosine_schedule_spans_the_whole_run():
    config = apply_overrides(
        load_config("tiny", None),
        {"loop.iterations": 6, "train.minibatches": 2, "train.epochs": 1, "train.lr_schedule": "cosine"},
    )
    # 6 iterations x 1 epoch x 2 minibatches: the horizon follows --iterations
    assert {s.total_steps for s in plan(config, Path("runs/x")).configs("train").values()} == {12}
    explicit = apply_overrides(config, {"train.total_steps": 50})
    assert {s.total_steps for s in plan(explicit, Path("runs/x")).configs("train").values()} == {50}
    constant = apply_overrides(config, {"train.lr_schedule": "constant"})
    assert {s.total_steps for s in plan(constant, Path("runs/x")).configs("train").values()} == {None}


def test_a_quiet_setting_is_printed_and_recorded_only_away_from_its_default():
    """`backend` came after runs were written: at its default the loop's commands and the
    manifests' settings are what they were, so those runs stay up to date."""
    from cfiw_cli.artifacts import settings_of

    planned = plan(load_config("tiny", None), Path("runs/x"))
    rollout = planned.configs("rollout")[0]
    assert "--backend" not in command_line("rollout", rollout) and "backend" not in settings_of(rollout)
    chosen = plan(apply_overrides(load_config("tiny", None), {"rollout.backend": "continuous"}), Path("runs/x"))
    continuous = chosen.configs("rollout")[0]
    assert "--backend continuous" in command_line("rollout", continuous)
    assert settings_of(continuous)["backend"] == "continuous"
    assert chosen.configs("eval", "probe")[0].backend == "continuous"  # the probe samples as training does
    assert chosen.configs("eval", "greedy")[0].backend == "generate"


@pytest.mark.slow
def test_no_score_skips_segment_and_score_and_trains_the_same_uniform_policy(tiny_model, tmp_path):
    """`--no-score` is the uniform loop without its CFIW stages: the same rollouts, weights, losses
    and policy, and no spans or scores files; a scored weighting is refused with it."""
    argv = loop_argv(tiny_model, tmp_path / "scored")
    argv += ["--weighting", "uniform", "--set", "loop.keep_policies=0", "--set", "loop.probe_questions=0"]
    runs = {}
    for name, extra in (("scored", []), ("unscored", ["--no-score"])):
        run_argv = [a if a != str(tmp_path / "scored") else str(tmp_path / name) for a in argv] + extra
        done = subprocess.run(run_argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = tmp_path / name
    unscored = runs["unscored"]
    for i in (0, 1):
        assert sorted(p.name for p in (unscored / f"iter-{i:04d}").iterdir()) == [
            "rollouts.parquet", "train_metrics.parquet", "weights.parquet",
        ]  # fmt: skip
        for kind in ("rollouts", "weights"):
            scored_rows = pq.read_table(runs["scored"] / f"iter-{i:04d}" / f"{kind}.parquet").to_pylist()
            assert pq.read_table(unscored / f"iter-{i:04d}" / f"{kind}.parquet").to_pylist() == scored_rows
        losses = [
            pq.read_table(r / f"iter-{i:04d}" / "train_metrics.parquet").column("loss").to_pylist()
            for r in runs.values()
        ]
        assert losses[0] == losses[1]
    weights = [(r / "policy" / "model.safetensors").read_bytes() for r in runs.values()]
    assert weights[0] == weights[1]
    dry = subprocess.run(
        [a if a != str(tmp_path / "scored") else str(tmp_path / "dry") for a in argv] + ["--no-score", "--dry-run"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    assert "cfiw rollout" in dry and "cfiw train" in dry and "cfiw segment" not in dry and "cfiw score" not in dry
    refused = subprocess.run(
        argv[: argv.index("--weighting")] + ["--no-score"], capture_output=True, text=True, cwd=ROOT
    )  # the tiny preset weighs by cfiw
    assert refused.returncode == 1 and "reads span scores" in refused.stderr and "Traceback" not in refused.stderr
