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

from tests.conftest import COMPLETIONS, lock_held_elsewhere, run_cli, write_rollouts

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
    _more_broken_inputs(root, rollouts, it)
    _loop_run_with_a_probe(root)
    return root


def _more_broken_inputs(root: Path, rollouts: Path, it: Path) -> None:
    """What the newer cases feed in: inputs inside would-be outputs, damaged files of every kind."""
    broken = root / "broken"
    shutil.copytree(root / "model", root / "notes-model")  # a tiny-model output a user wrote notes into
    (root / "notes-model" / "NOTES.txt").write_text("my notes\n")
    shutil.copytree(root / "model", root / "exp")  # a model directory that holds its own rollouts
    shutil.copy(rollouts, root / "exp" / "rollouts.parquet")
    (root / "box").mkdir()  # a dataset file inside a directory
    shutil.copy(root / "data" / "train.jsonl", root / "box" / "train.jsonl")

    def big_id(rows):
        rows[0]["completion_ids"] = [2**40] + rows[0]["completion_ids"][1:]
        return rows

    def negative_id(rows):
        rows[0]["completion_ids"] = [-5] + rows[0]["completion_ids"][1:]
        return rows

    _edit_rollouts(rollouts, broken / "negative-id.parquet", negative_id)
    table = pq.read_table(rollouts)
    wide = table.schema.set(
        table.schema.get_field_index("completion_ids"), pa.field("completion_ids", pa.list_(pa.int64()))
    )
    pq.write_table(pa.Table.from_pylist(big_id(table.to_pylist()), schema=wide), broken / "big-id.parquet")
    spans = pq.read_table(it / "spans.parquet").to_pylist()
    overlapping = {**spans[0], "span_idx": 99, "tok_start": spans[0]["tok_start"], "tok_end": spans[0]["tok_end"]}
    pq.write_table(
        pa.Table.from_pylist(spans + [overlapping], schema=pq.read_schema(it / "spans.parquet")),
        broken / "overlapping-spans.parquet",
    )
    metadata = {**(table.schema.metadata or {}), b"cfiw": b"{not json"}
    pq.write_table(table.replace_schema_metadata(metadata), broken / "bad-manifest.parquet")
    (broken / "garbage.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    (broken / "not-utf8.toml").write_bytes(b'[model]\nid = "\xff\xfe"\n')
    (broken / "null-question.jsonl").write_text(json.dumps({"question": None, "answer": "#### 3"}) + "\n")
    (broken / "adapter").mkdir()
    (broken / "adapter" / "adapter_config.json").write_text("{not json")


def _loop_run_with_a_probe(root: Path) -> None:
    """A one-iteration loop run (with a probe and best/) for replay's --out and the loop's own
    files; copies of it with a corrupt state file and a corrupt best.json."""
    (root / "probe-loop.toml").write_text(
        f'[model]\nid = "{root / "model"}"\n[data]\ndataset = "{root / "data"}"\n'
        "[loop]\niterations = 1\nquestions = 2\neval_limit = 2\nprobe_questions = 2\nprobe_samples = 2\n"
        "[rollout]\ngroup_size = 2\nmax_new_tokens = 8\n"
    )
    done = run_cli("loop", "--config", root / "probe-loop.toml", "--run", root / "looprun")
    assert done.exit_code == 0, done.stderr
    assert (root / "looprun" / "best" / "best.json").exists()
    shutil.copytree(root / "looprun", root / "looprun-state")
    (root / "looprun-state" / "loop_state.json").write_text('{"completed": "one"')
    shutil.copytree(root / "looprun", root / "looprun-best")
    again = run_cli("loop", "--config", root / "probe-loop.toml", "--run", root / "looprun-best")
    assert again.exit_code == 0, again.stderr  # the copy's evaluations name its own policy: now up to date
    (root / "looprun-best" / "best" / "best.json").write_text("{")
    written = root / "written" / "rollouts.parquet"
    done = run_cli(*["rollout", "-m", root / "model", "-d", root / "data", "--limit", "4", "-g", "4"],
                   *["--max-new-tokens", "32", "--out", written])  # fmt: skip
    assert done.exit_code == 0, done.stderr
    data = bytearray(written.read_bytes())
    start = _silent_flip(written)
    data[start : start + 64] = bytes(255 - b for b in data[start : start + 64])
    (root / "broken" / "flipped.parquet").write_bytes(data)


FIND_SILENT_FLIP = """
import io, sys
import pyarrow.parquet as pq
raw = open(sys.argv[1], "rb").read()
original = pq.read_table(sys.argv[1])
footer = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
for start in range(4, footer - 64, 64):
    data = bytearray(raw)
    data[start : start + 64] = bytes(255 - b for b in data[start : start + 64])
    try:
        read = pq.read_table(io.BytesIO(bytes(data)))
    except Exception:
        continue
    if not read.equals(original):
        print(start, flush=True)
        break
"""


def _silent_flip(path: Path) -> int:
    """The first 64-byte window of `path` whose flipped bytes a reader that skips the page
    checksums takes for a valid file with other values (found in a process of its own: a
    reader fed damaged pages may abort at exit)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FIND_SILENT_FLIP, str(path)], capture_output=True, text=True)
    assert done.stdout.strip(), f"no silent 64-byte flip in {path}: {done.stderr[-500:]}"
    return int(done.stdout.split()[0])


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


def _score(ws: Path, rollouts: str = "it/rollouts.parquet", spans: str = "it/spans.parquet", *extra: str) -> list:  # noqa: E501
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
    ("loop-dry-run-checks-too", lambda w: _loop(w, "--dry-run", "--set", "rollout.top_p=0"), 1, "top_p must be > 0"),
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
    # cfiw sql cannot write through EXPLAIN ANALYZE, over an artifact or to a new file
    (
        "sql-explain-analyze-copy-over-an-artifact",
        lambda w: _sql(
            w, f"explain analyze copy (select 42 as x) to '{w}/run/iter-0000/rollouts.parquet' (format parquet)"
        ),
        1,
        "read-only",
    ),
    (
        "sql-explain-analyze-copy-to-a-new-file",
        lambda w: _sql(w, f"EXPLAIN  ANALYZE COPY (select 42 as x) TO '{w}/run/new.csv'"),
        1,
        "read-only",
    ),
    # --force never deletes an input inside the output
    (
        "train-force-out-holds-the-rollouts",
        lambda w: _train(w, "--force", out=w / "it"),
        1,
        "holds the input --rollouts",
    ),
    (
        "tiny-model-force-out-holds-the-dataset",
        lambda w: ["tiny-model", "--dataset", w / "box" / "train.jsonl", "--out", w / "box", "--force"],
        1,
        "holds the input --dataset",
    ),
    # train updates in place only a checkpoint train wrote, and never one that holds its inputs
    (
        "train-out-is-a-tiny-model-with-notes",
        lambda w: _train(w, scores=None, out=w / "notes-model"),
        1,
        "holds a cfiw tiny-model output",
    ),
    (
        "train-in-place-holds-its-rollouts",
        lambda w: [
            "train",
            "-m",
            w / "exp",
            "-r",
            w / "exp" / "rollouts.parquet",
            "--weighting",
            "uniform",
            "--out",
            w / "exp",
            "--force",
        ],  # fmt: skip
        1,
        "holds the input --rollouts",
    ),
    # replay --out is checked before any cell runs
    (
        "replay-out-is-the-runs-rollouts",
        lambda w: ["replay", w / "looprun", "--out", w / "looprun" / "iter-0000" / "rollouts.parquet"],
        1,
        "is the run's rollouts",
    ),
    ("replay-out-clobbers-a-user-file", lambda w: ["replay", w / "looprun", "--out", w / "loop.toml"], 1, "replay"),
    # analyze writes a new directory or an earlier report, never into a run
    ("analyze-out-is-the-run", lambda w: ["analyze", w / "looprun", "--out", w / "looprun"], 1, "is the input run"),
    ("analyze-out-holds-the-run", lambda w: ["analyze", w / "looprun", "--out", w], 1, "holds the input run"),
    (
        "analyze-out-holds-the-runs-files",
        lambda w: ["analyze", w / "looprun", "--out", w / "looprun" / "iter-0000", "--force"],
        1,
        "holds a file of the input run",
    ),
    (
        "analyze-out-is-a-users-directory",
        lambda w: ["analyze", w / "looprun", "--out", w / "not-a-model"],
        1,
        "already exists",
    ),
    ("analyze-the-same-run-twice", lambda w: ["analyze", w / "looprun", w / "looprun", "--out", w / "r"], 1, "twice"),
    # a refused loop start writes nothing, not even config.toml (here: into the dataset)
    ("loop-run-is-the-dataset", lambda w: _loop(w)[:-2] + ["--run", w / "data"], 1, "is the input dataset"),
    ("loop-run-is-a-file", lambda w: _loop(w)[:-2] + ["--run", w / "notes.txt"], 1, "is a file"),
    # sizes have upper bounds, and sampling is checked against free memory before the model loads
    ("loop-group-size-too-large", lambda w: _loop(w, "--set", "rollout.group_size=99999999999999999999999"), 1, "<="),
    (
        "rollout-group-size-too-large",
        lambda w: ["rollout", "-m", w / "model", "-d", w / "data", "--out", w / "r.parquet", "-g", "99999999999"],
        2,
        "--group-size",
    ),
    (
        "rollout-does-not-fit-in-memory",
        lambda w: [
            "rollout",
            "-m",
            w / "model",
            "-d",
            w / "data",
            "--out",
            w / "r.parquet",
            "-g",
            "1024",
            "--max-new-tokens",
            "131072",
        ],  # fmt: skip
        1,
        "memory",
    ),
    # --tracking-dir is an output like any other
    (
        "train-tracking-dir-inside-the-model",
        lambda w: _train(w, "--report-to", "tensorboard", "--tracking-dir", str(w / "model" / "tb")),
        1,
        "lies inside the input --model",
    ),
    (
        "train-tracking-dir-is-a-file",
        lambda w: _train(w, "--report-to", "tensorboard", "--tracking-dir", str(w / "notes.txt")),
        1,
        "is a file",
    ),
    # what used to pass a raw library message on now names the file or flag
    ("segment-negative-token-id", lambda w: _segment(w, "broken/negative-id.parquet"), 1, "negative token id"),
    ("segment-token-id-over-int32", lambda w: _segment(w, "broken/big-id.parquet"), 1, "does not fit"),
    ("score-overlapping-spans", lambda w: _score(w, spans="broken/overlapping-spans.parquet"), 1, "overlap"),
    ("train-corrupt-manifest", lambda w: _train(w, rollouts="broken/bad-manifest.parquet", scores=None), 1, "corrupt"),
    (
        "loop-toml-not-utf8",
        lambda w: ["loop", "--config", w / "broken" / "not-utf8.toml", "--run", w / "r"],
        1,
        "UTF-8",
    ),
    (
        "eval-null-question",
        lambda w: ["eval", "-m", w / "model", "-d", w / "broken" / "null-question.jsonl", "--out", w / "e.parquet"],
        1,
        "has no question",
    ),
    (
        "rollout-corrupt-adapter-config",
        lambda w: ["rollout", "-m", w / "broken" / "adapter", "-d", w / "data", "--out", w / "r.parquet"],
        1,
        "adapter_config.json",
    ),
    (
        "loop-corrupt-state",
        lambda w: ["loop", "--config", w / "probe-loop.toml", "--run", w / "looprun-state"],
        1,
        "loop_state.json",
    ),  # noqa: E501
    (
        "loop-corrupt-best-json",
        lambda w: ["loop", "--config", w / "probe-loop.toml", "--run", w / "looprun-best"],
        1,
        "best.json",
    ),  # noqa: E501
    ("sql-run-is-a-file", lambda w: ["sql", w / "notes.txt", "select 1"], 1, "is a file"),
    ("segment-rollouts-is-a-directory", lambda w: _segment(w, "it"), 1, "is a directory"),
    ("validate-garbage", lambda w: ["validate", w / "broken" / "garbage.parquet"], 1, "not a readable Parquet file"),
    ("segment-flipped-bytes", lambda w: _segment(w, "broken/flipped.parquet"), 1, "not a readable Parquet file"),
    # flags with a declared range exit 2, as --help shows
    ("segment-max-spans-zero", lambda w: _segment(w, "it/rollouts.parquet", "--max-spans", "0"), 2, "--max-spans"),
    ("segment-min-tokens-zero", lambda w: _segment(w, "it/rollouts.parquet", "--min-tokens", "0"), 2, "--min-tokens"),
    (
        "score-batch-tokens-zero",
        lambda w: _score(w, "it/rollouts.parquet", "it/spans.parquet", "--batch-tokens", "0"),
        2,
        "--batch-tokens",
    ),  # noqa: E501
    (
        "rollout-negative-offset",
        lambda w: ["rollout", "-m", w / "model", "-d", w / "data", "--out", w / "r.parquet", "--offset", "-1"],
        2,
        "--offset",
    ),  # noqa: E501
    (
        "sft-negative-lr",
        lambda w: ["sft", "-m", w / "model", "-d", w / "data", "--out", w / "sft", "--lr", "-1"],
        2,
        "--lr",
    ),  # noqa: E501
    ("train-temperature-zero", lambda w: _train(w, "--temperature", "0"), 2, "--temperature"),
    ("replay-unknown-mode", lambda w: ["replay", w / "looprun", "--modes", "uniform,best"], 2, "--modes"),
    ("replay-bad-iterations", lambda w: ["replay", w / "looprun", "--iterations", "4-2"], 2, "--iterations"),
    ("validate-unknown-kind", lambda w: ["validate", w / "it" / "spans.parquet", "--kind", "nope"], 2, "--kind"),
    ("loop-preset-and-config", lambda w: _loop(w, "--preset", "tiny"), 2, "exactly one of"),
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


def _hint(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("Hint: "))


def test_the_memory_error_names_the_knob_that_dominates(ws):
    """Too many sequences kept: the group size, the question count or the length; too large a
    batch: the batch size. Checked before the model loads (nothing is written)."""
    rollout = ["rollout", "-m", ws / "model", "-d", ws / "data", "--out", ws / "r.parquet"]
    kept = run_cli(*rollout, "-g", "1024", "--max-new-tokens", "131072")
    assert kept.exit_code == 1 and "--group-size" in _hint(kept) and "--batch-size" not in _hint(kept)
    batch = run_cli(*rollout, "--limit", "20", "-g", "512", "--batch-size", "10240", "--max-new-tokens", "131072")
    assert batch.exit_code == 1 and "--batch-size" in _hint(batch), batch.stderr
    loop = run_cli(*_loop(ws, "--set", "rollout.group_size=1024", "--set", "rollout.max_new_tokens=131072"))
    assert loop.exit_code == 1 and "rollout.group_size" in _hint(loop), loop.stderr
    assert not (ws / "r.parquet").exists() and not (ws / "loop-run").exists()


def test_the_memory_check_reads_the_address_space_limit(ws, tmp_path):
    """Under a memory limit (here the address space a process may map), a rollout that would
    fit the machine is refused at once, and the hint names the group size."""
    import resource
    import subprocess
    import sys

    limit = 6 << 30  # a Python process with torch maps about 2 GiB; 4 GiB are left

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    argv = [sys.executable, "-m", "cfiw_cli", "rollout", "-m", ws / "model", "-d", ws / "data", "--out",
            tmp_path / "r.parquet", "-g", "128", "--max-new-tokens", "16384", "--limit", "30"]  # fmt: skip
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "of host memory" in done.stderr and "--group-size" in done.stderr.split("Hint: ")[1]
    assert "Traceback" not in done.stderr and not (tmp_path / "r.parquet").exists()


def test_a_refused_hub_preset_start_writes_nothing(ws, tmp_path, monkeypatch):
    """Offline, with nothing cached: the qwen preset fails on its dataset before config.toml."""
    import datasets.config
    from huggingface_hub import constants

    for module, name in ((constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    done = run_cli("loop", "--preset", "qwen", "--run", tmp_path / "qwen-run")
    assert done.exit_code == 1 and "Traceback" not in done.stderr, done.stderr
    assert "gsm8k" in done.stderr and "Retrying" not in done.stderr
    assert not (tmp_path / "qwen-run").exists()


def test_train_updates_its_own_checkpoint_in_place_and_keeps_files_it_did_not_write(ws, tmp_path):
    """A checkpoint train wrote is updated without --force; a file a user put into it stays."""
    policy = tmp_path / "policy"
    shutil.copytree(ws / "policy", policy)
    (policy / "NOTES.txt").write_text("run 3: lr 1e-4\n")
    before = (policy / "model.safetensors").read_bytes()
    rollouts = ws / "it" / "rollouts.parquet"
    argv = [
        "train",
        "-m",
        policy,
        "-r",
        rollouts,
        "--weighting",
        "uniform",
        "--out",
        policy,
        "--lr",
        "1e-3",
        "--seed",
        "4",
    ]
    again = run_cli(*argv)
    assert again.exit_code == 0, again.stderr
    assert (policy / "NOTES.txt").read_text() == "run 3: lr 1e-4\n"
    assert (policy / "model.safetensors").read_bytes() != before or "no advantage" in again.stderr
    written = json.loads((policy / "cfiw_manifest.json").read_text())["files"]
    assert "model.safetensors" in written and "NOTES.txt" not in written


def test_lora_adapters_are_not_up_to_date_over_another_base(ws, tmp_path):
    """The adapters' identity covers the base they name: a rollout from the same adapters over a
    base replaced by another model of the same shape is computed again."""
    base, adapters = tmp_path / "base", tmp_path / "adapters"
    shutil.copytree(ws / "model", base)
    sft = [
        "sft",
        "-m",
        base,
        "-d",
        ws / "data",
        "--out",
        adapters,
        "--lora-r",
        "2",
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]
    assert run_cli(*sft).exit_code == 0
    rollout = ["rollout", "-m", adapters, "-d", ws / "data", "--limit", "1", "-g", "2", "--max-new-tokens", "4"]
    assert run_cli(*rollout, "--out", tmp_path / "r.parquet").exit_code == 0
    assert "up to date" in run_cli(*rollout, "--out", tmp_path / "r.parquet").stderr
    other = run_cli("tiny-model", "--out", base, "--seed", "7", "--force")  # the same shape, other weights
    assert other.exit_code == 0, other.stderr
    again = run_cli(*rollout, "--out", tmp_path / "r.parquet")
    assert again.exit_code == 0 and "up to date" not in again.stderr, again.stderr
    recorded = json.loads(pq.read_schema(tmp_path / "r.parquet").metadata[b"cfiw"])["inputs"]["model"]
    assert recorded["base"]["path"] == str(base.resolve())


def test_analyze_tells_two_runs_of_one_name_apart(ws, tmp_path):
    """`analyze a/looprun b/looprun` reports two runs, labelled by their paths, not one pooled run."""
    for parent in ("a", "b"):
        shutil.copytree(ws / "looprun", tmp_path / parent / "looprun")
    done = run_cli("analyze", tmp_path / "a" / "looprun", tmp_path / "b" / "looprun", "--out", tmp_path / "report")
    assert done.exit_code == 0, done.stderr
    accuracy = json.loads((tmp_path / "report" / "accuracy.json").read_text())
    assert {row["run"] for row in accuracy} == {"a/looprun", "b/looprun"}
    single = run_cli("analyze", ws / "looprun", "--out", tmp_path / "single")
    rows = json.loads((tmp_path / "single" / "accuracy.json").read_text())
    assert single.exit_code == 0 and {row["run"] for row in rows} == {"looprun"}
    assert [r["accuracy"] for r in accuracy if r["run"] == "a/looprun"] == [r["accuracy"] for r in rows]


def test_analyze_replaces_its_own_report_and_keeps_a_users_file(ws, tmp_path):
    out = tmp_path / "report"
    assert run_cli("analyze", ws / "looprun", "--out", out).exit_code == 0
    (out / "my-notes.md").write_text("the plots look fine\n")
    assert run_cli("analyze", ws / "looprun", "--out", out).exit_code == 0
    assert (out / "my-notes.md").read_text() == "the plots look fine\n"
    assert json.loads((out / "cfiw_manifest.json").read_text())["stage"] == "analyze"


HOSTILE_NAMES = [
    "a.parquet']) ; copy (select 42 as pwned) to 'pwned.csv'; select * from read_parquet(['x.parquet",
    "semi;colon.parquet",
    "new\nline.parquet",
    "ünïcödé ☃.parquet",
    "glob[1]*.parquet",
]


def test_sql_reads_runs_with_hostile_names_and_writes_nothing(ws, tmp_path, monkeypatch):
    """File names are never pasted into SQL: a run directory named with a quote and files
    named like injections, globs or with newlines are read as data, and nothing is written."""
    monkeypatch.chdir(tmp_path)  # a successful injection would write pwned.csv here
    run = tmp_path / "it's run"
    shutil.copytree(ws / "looprun", run)
    for name in HOSTILE_NAMES:
        shutil.copy(ws / "looprun" / "iter-0000" / "rollouts.parquet", run / "iter-0000" / name)
    before = _snapshot(tmp_path)
    done = run_cli("sql", run, "select count(*) as n from manifests where stage = 'rollout'", "--format", "json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout) == [{"n": 1 + len(HOSTILE_NAMES)}]
    rollouts = run_cli("sql", run, "select count(*) as n from rollouts", "--format", "json")
    assert json.loads(rollouts.stdout) == [{"n": pq.read_metadata(run / "iter-0000" / "rollouts.parquet").num_rows}]
    assert _snapshot(tmp_path) == before


def test_the_sql_connection_cannot_write_even_past_the_statement_gate(ws, tmp_path):
    """The second wall: the connection itself, given COPY, ATTACH or EXPLAIN ANALYZE COPY
    directly, writes nothing inside or outside the run."""
    import duckdb

    from cfiw_cli.report.sql import connect

    run = tmp_path / "run"
    shutil.copytree(ws / "looprun", run)
    before = _snapshot(tmp_path)
    con = connect(run)
    statements = [
        "copy (select 42 as x) to 'cfiwrun0://iter-0000/rollouts.parquet' (format parquet)",
        "explain analyze copy (select 42 as x) to 'cfiwrun0://new.csv'",
        f"copy (select 42 as x) to '{run}/iter-0000/rollouts.parquet' (format parquet)",
        f"copy (select 42 as x) to '{tmp_path}/outside.csv'",
        "attach 'cfiwrun0://db.duckdb'",
        f"attach '{tmp_path}/db.duckdb'",
        "select * from read_text('cfiwrun0://../../../../etc/hostname')",
        "set disabled_filesystems = ''",
        "install httpfs",
    ]
    for statement in statements:
        with pytest.raises(duckdb.Error):
            con.execute(statement)
    assert con.execute("select count(*) from rollouts").fetchone()[0] > 0
    assert _snapshot(tmp_path) == before


def test_a_second_writer_of_an_output_is_told(ws, tmp_path):
    """While one process holds an output's lock, another cfiw command writing it stops at once."""
    out = tmp_path / "spans.parquet"
    with lock_held_elsewhere(tmp_path / ".spans.parquet.lock"):
        done = run_cli(*_segment(ws, "it/rollouts.parquet")[:-2], "--out", out)
        assert done.exit_code == 1 and f"another cfiw process is writing {out}" in done.stderr
        assert not out.exists()
    assert run_cli(*_segment(ws, "it/rollouts.parquet")[:-2], "--out", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spans.parquet"]  # the lock file is gone


def test_every_artifact_kind_is_a_validate_choice():
    from cfiw_cli.configs import ARTIFACT_KINDS
    from cfiw_cli.schemas import SCHEMAS

    assert ARTIFACT_KINDS == tuple(SCHEMAS)


def test_analyze_replaces_a_report_written_before_reports_had_a_manifest(ws, tmp_path):
    older, mixed = tmp_path / "older", tmp_path / "mixed"
    for directory in (older, mixed):
        directory.mkdir()
        for name in ("report.md", "report.html", "accuracy.json", "probe.png"):
            (directory / name).write_text("old\n")
    (mixed / "notes.txt").write_text("mine\n")  # not a file analyze writes: not taken for an old report
    assert run_cli("analyze", ws / "looprun", "--out", older).exit_code == 0
    assert json.loads((older / "cfiw_manifest.json").read_text())["stage"] == "analyze"
    refused = run_cli("analyze", ws / "looprun", "--out", mixed)
    assert refused.exit_code == 1 and "already exists" in refused.stderr
    assert (mixed / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("command", ["segment", "train"])
def test_a_read_only_out_is_named(ws, monkeypatch, command):
    """A file system that refuses the final rename (read-only, say): the error names the output,
    and nothing is left behind."""
    import errno

    from cfiw_cli import artifacts

    def read_only(source, target):
        raise OSError(errno.EROFS, "Read-only file system", str(target))

    before = _snapshot(ws)
    monkeypatch.setattr(artifacts.os, "replace", read_only)
    monkeypatch.setattr(artifacts.Path, "rename", lambda self, target: read_only(self, target))
    monkeypatch.setattr(artifacts.Path, "mkdir", lambda self, *args, **kwargs: read_only(self, self))
    argv = _segment(ws, "it/rollouts.parquet") if command == "segment" else _train(ws, scores=None)
    result = run_cli(*argv)
    monkeypatch.undo()
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Read-only file system" in errors[0] and "unexpected" not in errors[0], result.stderr
    assert str(ws) in errors[0]
    assert _snapshot(ws) == before


def test_an_os_error_anywhere_names_its_file():
    """Whatever raises it, an OS error with a file name is one line naming the file, not an
    `unexpected OSError`."""
    import errno

    from cfiw_cli.errors import describe

    message, hint = describe(OSError(errno.EROFS, "Read-only file system", "runs/x/policy.tmp"))
    assert message == "cannot use runs/x/policy.tmp: Read-only file system" and hint
