"""Bad input, from a careless or hostile user, against every command.

Each case runs one command line in a shared workspace of real artifacts and asserts the
contract: the exit code (2 for a bad flag value, 1 for anything else), exactly one `Error:`
line, no traceback, and every file and directory of the workspace unchanged byte for byte
(inputs and earlier outputs alike; nothing half-written, nothing new).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import COMPLETIONS, run_cli, write_rollouts

pytestmark = pytest.mark.slow


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: a file's sha256, or `dir`."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _edit_rollouts(source: Path, target: Path, edit) -> Path:
    rows = pq.read_table(source).to_pylist()
    table = pq.read_table(source)
    rows = edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema) if rows else table.schema.empty_table(), target)
    return target


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model) -> Path:
    """A workspace: a model, a dataset, rollouts -> spans -> scores, a trained policy, a run
    directory, and the broken files the cases feed in."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(tiny_model, root / "model")
    assert run_cli("synth", "--out", root / "data", "--n-train", "30", "--n-test", "8", "--seed", "1").exit_code == 0
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    rollouts = write_rollouts(root / "it" / "rollouts.parquet", tokenizer, COMPLETIONS + COMPLETIONS[:1])
    model, it = str(root / "model"), root / "it"
    steps = [
        ("segment", "--model", model, "-r", rollouts, "--out", it / "spans.parquet"),
        ("segment", "--model", model, "-r", rollouts, "--out", it / "spans-one.parquet", "--max-spans", "1"),
        ("score", "--model", model, "-r", rollouts, "-s", it / "spans.parquet", "--out", it / "scores.parquet"),
        ("score", "-m", model, "-r", rollouts, "-s", it / "spans-one.parquet", "--out", it / "scores-one.parquet"),
        ("train", "--model", model, "-r", rollouts, "--weighting", "uniform", "--out", root / "policy", "--lr", "1e-4"),
    ]
    for step in steps:
        done = run_cli(*step)
        assert done.exit_code == 0, (step, done.stderr)
    run = root / "run" / "iter-0000"
    run.mkdir(parents=True)
    for name in ("rollouts", "spans", "scores"):
        shutil.copy(it / f"{name}.parquet", run / f"{name}.parquet")
    (root / "empty-run").mkdir()
    (root / "corrupt-run" / "iter-0000").mkdir(parents=True)
    (root / "corrupt-run" / "iter-0000" / "rollouts.parquet").write_bytes(b"PAR1 this is not parquet")
    (root / "notes.txt").write_text("my notes\n")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "readme.txt").write_text("hello\n")
    (root / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2",\n')
    (root / "empty.jsonl").write_text("")
    broken = root / "broken"
    broken.mkdir()

    def nan_reward(rows):
        rows[0]["reward"] = float("nan")
        return rows

    def inf_logprob(rows):
        rows[1]["completion_logprobs"] = [float("-inf")] + rows[1]["completion_logprobs"][1:]
        return rows

    def duplicate(rows):
        return rows + [rows[0]]

    def null_ids(rows):
        rows[2]["completion_ids"] = None
        return rows

    _edit_rollouts(rollouts, broken / "nan-reward.parquet", nan_reward)
    _edit_rollouts(rollouts, broken / "inf-logprob.parquet", inf_logprob)
    _edit_rollouts(rollouts, broken / "duplicate-ids.parquet", duplicate)
    _edit_rollouts(rollouts, broken / "null-ids.parquet", null_ids)
    _edit_rollouts(rollouts, broken / "no-rows.parquet", lambda rows: [])
    spans = pq.read_table(it / "spans.parquet")
    pq.write_table(pa.concat_tables([spans, spans.slice(0, 1)]), broken / "duplicate-spans.parquet")
    scores = pq.read_table(it / "scores.parquet")
    pq.write_table(pa.concat_tables([scores, scores.slice(0, 1)]), broken / "duplicate-scores.parquet")
    (root / "a-file").write_text("not a directory\n")
    return root


def _train(
    ws: Path,
    *extra: str,
    rollouts: str = "it/rollouts.parquet",
    scores: str | None = "it/scores.parquet",
    out: Path | None = None,
) -> list:
    """A train command line; `scores=None` trains uniform, without spans or scores."""
    scored = ["-s", ws / "it" / "spans.parquet", "--scores", ws / scores] if scores else ["--weighting", "uniform"]
    return ["train", "--model", ws / "model", "-r", ws / rollouts, *scored, "--out", out or ws / "new-policy", *extra]


def _score(ws: Path, rollouts: str = "it/rollouts.parquet", spans: str = "it/spans.parquet", *extra: str) -> list:
    return ["score", "--model", ws / "model", "-r", ws / rollouts, "-s", ws / spans, "--out", ws / "s.parquet", *extra]


def _segment(ws: Path, rollouts: str, *extra: str) -> list:
    return ["segment", "--model", ws / "model", "-r", ws / rollouts, "--out", ws / "sp.parquet", *extra]


def _loop(ws: Path, *extra: str) -> list:
    return ["loop", "--config", ws / "loop.toml", "--run", ws / "loop-run", *extra]


def _sql(ws: Path, query: str) -> list:
    return ["sql", ws / "run", query]


# (case, command line from the workspace, exit code, a fragment of the Error line)
CASES = [
    # no clobbering: an output that is an input, or an existing file of another kind
    (
        "segment-out-is-its-rollouts",
        lambda w: _segment(w, "it/rollouts.parquet")[:-2] + ["--out", w / "it" / "rollouts.parquet"],
        1,
        "is the input --rollouts",
    ),  # noqa: E501
    (
        "eval-out-is-the-dataset-file",
        lambda w: ["eval", "-m", w / "model", "-d", w / "data" / "test.jsonl", "--out", w / "data" / "test.jsonl"],
        1,
        "is the input --dataset",
    ),  # noqa: E501
    (
        "eval-out-inside-the-dataset",
        lambda w: ["eval", "-m", w / "model", "-d", w / "data", "--out", w / "data" / "test.jsonl"],
        1,
        "lies inside the input --dataset",
    ),  # noqa: E501
    (
        "train-metrics-out-is-rollouts",
        lambda w: _train(w, "--metrics-out", str(w / "it" / "rollouts.parquet")),
        1,
        "--metrics-out",
    ),  # noqa: E501
    (
        "train-weights-out-is-scores",
        lambda w: _train(w, "--weights-out", str(w / "it" / "scores.parquet")),
        1,
        "is the input --scores",
    ),  # noqa: E501
    (
        "train-out-is-rollouts-file",
        lambda w: _train(w, out=w / "it" / "rollouts.parquet"),
        1,
        "is the input --rollouts",
    ),  # noqa: E501
    ("train-out-is-a-file", lambda w: _train(w, out=w / "notes.txt"), 1, "is a file"),
    ("train-out-is-not-a-model", lambda w: _train(w, out=w / "not-a-model"), 1, "holds something else"),
    (
        "train-weights-out-clobbers-notes",
        lambda w: _train(w, "--weights-out", str(w / "notes.txt")),
        1,
        "not a cfiw train output",
    ),  # noqa: E501
    (
        "rollout-out-clobbers-notes",
        lambda w: ["rollout", "-m", w / "model", "-d", w / "data", "--limit", "1", "--out", w / "notes.txt"],
        1,
        "not a cfiw rollout output",
    ),  # noqa: E501
    (
        "segment-out-clobbers-scores",
        lambda w: _segment(w, "it/rollouts.parquet")[:-2] + ["--out", w / "it" / "scores.parquet"],
        1,
        "not a cfiw segment output",
    ),  # noqa: E501
    (
        "score-out-is-its-spans",
        lambda w: _score(w)[:-2] + ["--out", w / "it" / "spans.parquet"],
        1,
        "is the input --spans",
    ),  # noqa: E501
    (
        "sft-out-holds-something-else",
        lambda w: ["sft", "-m", w / "model", "-d", w / "data", "--out", w / "not-a-model", "--steps", "1"],
        1,
        "already exists",
    ),  # noqa: E501
    ("tiny-model-out-is-a-file", lambda w: ["tiny-model", "--out", w / "notes.txt"], 1, "already exists"),
    (
        "out-under-a-file",
        lambda w: _segment(w, "it/rollouts.parquet")[:-2] + ["--out", w / "a-file" / "x.parquet"],
        1,
        "cannot write",
    ),  # noqa: E501
    # cfiw sql reads, and only reads
    (
        "sql-copy-over-an-artifact",
        lambda w: _sql(w, f"copy (select 1) to '{w}/run/iter-0000/rollouts.parquet'"),
        1,
        "read-only",
    ),  # noqa: E501
    ("sql-attach", lambda w: _sql(w, f"attach '{w}/run/x.duckdb'"), 1, "read-only"),
    ("sql-create-table", lambda w: _sql(w, "create table t as select 1"), 1, "read-only"),
    ("sql-drop-view", lambda w: _sql(w, "drop view rollouts"), 1, "read-only"),
    ("sql-two-statements", lambda w: _sql(w, "select 1; select 2"), 1, "one statement"),
    ("sql-install", lambda w: _sql(w, "install httpfs"), 1, "read-only"),
    ("sql-pragma", lambda w: _sql(w, "pragma enable_profiling"), 1, "read-only"),
    ("sql-read-outside-the-run", lambda w: _sql(w, f"select * from read_csv('{w}/notes.txt')"), 1, "query failed"),
    ("sql-corrupt-run", lambda w: ["sql", w / "corrupt-run", "select count(*) from rollouts"], 1, "query failed"),
    # numbers: finite and in range, before anything loads
    ("train-lr-inf", lambda w: _train(w, "--lr", "inf"), 2, "--lr"),
    ("train-lr-nan", lambda w: _train(w, "--lr", "nan"), 2, "--lr"),
    ("train-floor-nan", lambda w: _train(w, "--floor", "nan"), 2, "--floor"),
    ("train-negative-beta", lambda w: _train(w, "--beta", "-1"), 2, "--beta"),
    (
        "rollout-temperature-nan",
        lambda w: ["rollout", "-m", w / "model", "-d", w / "data", "--out", w / "r.parquet", "--temperature", "nan"],
        2,
        "--temperature",
    ),  # noqa: E501
    (
        "train-lr-overflows-the-policy",
        lambda w: _train(w, "--lr", "1e30", "--epochs", "2", out=w / "policy"),
        1,
        "nothing was saved",
    ),  # noqa: E501
    (
        "train-nan-reward",
        lambda w: _train(w, rollouts="broken/nan-reward.parquet", scores=None),
        1,
        "has reward nan",
    ),  # noqa: E501
    (
        "train-inf-logprob",
        lambda w: _train(w, rollouts="broken/inf-logprob.parquet", scores=None),
        1,
        "non-finite completion log-prob",
    ),  # noqa: E501
    # the manifest chain and duplicate keys
    ("train-scores-of-other-spans", lambda w: _train(w, scores="it/scores-one.parquet"), 1, "different spans file"),  # noqa: E501
    ("segment-duplicate-rollout-ids", lambda w: _segment(w, "broken/duplicate-ids.parquet"), 1, "twice"),
    ("score-duplicate-spans", lambda w: _score(w, spans="broken/duplicate-spans.parquet"), 1, "twice"),
    ("train-duplicate-scores", lambda w: _train(w, scores="broken/duplicate-scores.parquet"), 1, "twice"),  # noqa: E501
    # the loop checks everything before it starts, and a failed start locks nothing
    ("loop-negative-group-size", lambda w: _loop(w, "--set", "rollout.group_size=-4"), 1, "group_size"),
    ("loop-bad-weighting-flag", lambda w: _loop(w, "--weighting", "best"), 2, "--weighting"),
    ("loop-bad-weighting-set", lambda w: _loop(w, "--set", "loop.weighting=best"), 1, "weighting"),
    ("loop-lr-not-a-number", lambda w: _loop(w, "--set", "train.lr=[["), 1, "lr must be a number"),
    ("loop-lr-inf", lambda w: _loop(w, "--set", "train.lr=inf"), 1, "finite"),
    ("loop-negative-iterations", lambda w: _loop(w, "--iterations", "-2"), 2, "--iterations"),
    ("loop-zero-iterations-set", lambda w: _loop(w, "--set", "loop.iterations=0"), 1, "iterations"),
    ("loop-eval-every-zero", lambda w: _loop(w, "--set", "loop.eval_every=0"), 1, "eval_every"),
    ("loop-dry-run-checks-too", lambda w: _loop(w, "--dry-run", "--set", "rollout.top_p=0"), 1, "top-p"),
    ("loop-missing-tiny-model", lambda w: _loop(w, "--model", "runs/no-such-tiny-sft"), 1, "model path does not exist"),  # noqa: E501
    # smaller failures and specific messages
    ("segment-no-rollouts", lambda w: _segment(w, "broken/no-rows.parquet"), 1, "holds no rollouts"),
    ("segment-null-completion-ids", lambda w: _segment(w, "broken/null-ids.parquet"), 1, "completion_ids"),
    ("analyze-empty-run", lambda w: ["analyze", w / "empty-run", "--out", w / "report"], 1, "no artifacts"),
    ("analyze-corrupt-run", lambda w: ["analyze", w / "corrupt-run", "--out", w / "report"], 1, "cannot read"),
    (
        "eval-malformed-jsonl",
        lambda w: ["eval", "-m", w / "model", "-d", w / "bad.jsonl", "--out", w / "e.parquet"],
        1,
        "line 2",
    ),  # noqa: E501
    (
        "eval-empty-dataset",
        lambda w: ["eval", "-m", w / "model", "-d", w / "empty.jsonl", "--out", w / "e.parquet"],
        1,
        "empty.jsonl",
    ),  # noqa: E501
    (
        "sft-max-length-too-small",
        lambda w: ["sft", "-m", w / "model", "-d", w / "data", "--out", w / "sft", "--max-length", "4", "--steps", "1"],
        1,
        "--max-length",
    ),  # noqa: E501
    (
        "rollout-missing-local-model",
        lambda w: ["rollout", "-m", "runs/no-such-model", "-d", w / "data", "--out", w / "r.parquet"],
        1,
        "model path does not exist",
    ),  # noqa: E501
]


@pytest.fixture(scope="module")
def loop_config(ws: Path) -> Path:
    path = ws / "loop.toml"
    path.write_text(
        f'[model]\nid = "{ws / "model"}"\n[data]\ndataset = "{ws / "data"}"\n'
        "[loop]\niterations = 1\nquestions = 2\neval_limit = 2\nprobe_questions = 0\n"
        "[rollout]\ngroup_size = 2\nmax_new_tokens = 8\n"
    )
    return path


@pytest.mark.parametrize(("case", "argv", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_changes_nothing(ws, loop_config, case, argv, code, fragment):
    before = _snapshot(ws)
    result = run_cli(*argv(ws))
    output = result.stdout + result.stderr
    assert result.exit_code == code, (case, result.exit_code, output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in output
    if code == 1:
        assert any(line.startswith("Hint: ") for line in result.stderr.splitlines()), output
    assert _snapshot(ws) == before, f"{case} changed the workspace"


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({case for case, *_ in CASES}) == len(CASES)


def test_force_replaces_what_is_refused_without_it(ws, tmp_path):
    """The same refusal with --force goes through: the guard is the flag, not the path."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    argv = _segment(ws, "it/rollouts.parquet")[:-2] + ["--out", notes]
    assert run_cli(*argv).exit_code == 1 and notes.read_text() == "mine\n"
    assert run_cli(*argv, "--force").exit_code == 0
    assert pq.read_table(notes).num_rows > 0


def test_validate_tells_renamed_train_files_by_their_columns(ws, tmp_path):
    for name, kind in (("train_metrics", "train_metrics"), ("weights", "weights")):
        renamed = tmp_path / f"renamed-{name}.parquet"
        shutil.copy(ws / "policy" / f"{name}.parquet", renamed)
        result = run_cli("validate", renamed)
        assert result.exit_code == 0, result.stderr
        assert f"valid {kind} file" in result.stdout


def test_a_refused_loop_start_does_not_lock_the_run(ws, loop_config):
    """A bad --set leaves no config.toml, so the corrected command starts the run."""
    assert run_cli(*_loop(ws, "--set", "rollout.group_size=-4")).exit_code == 1
    assert not (ws / "loop-run").exists()
    assert run_cli(*_loop(ws, "--dry-run")).exit_code == 0


def test_sql_still_answers_queries(ws):
    result = run_cli("sql", ws / "run", "select count(*) as n from rollouts", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == [{"n": len(COMPLETIONS) + 1}]
