"""`accelerate launch ... cfiw loop`: every stage sharded over the processes of one process
group, the main process writing; the files match a one-process loop, and a killed run resumes."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_same_tables, kill_when
from safetensors.torch import load_file

from cfiw_cli.schemas import ROLLOUTS

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def loop_argv(config: Path, run: Path, processes: int, port: int) -> list[str]:
    loop = ["loop", "--config", str(config), "--run", str(run)]
    if processes == 1:
        return [str(BIN / "cfiw"), *loop]
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes)]
    return [*launch, "--main_process_port", str(port), "-m", "cfiw_cli", *loop]


def table(path: Path) -> list[dict]:
    data = pq.read_table(path)
    return data.drop([c for c in ("seconds",) if c in data.column_names]).to_pylist()


def failure(stderr: str) -> str:
    """What a failed launch printed: the processes' own lines (an abort's message among them)
    come before the launcher's traceback, which alone fills the tail."""
    return stderr if len(stderr) <= 6000 else f"{stderr[:3000]}\n[...]\n{stderr[-3000:]}"


def run_loop(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, failure(done.stderr)


@pytest.fixture(scope="module")
def task_config(sharpening_task, tmp_path_factory) -> Path:
    policy, task = sharpening_task
    config = tmp_path_factory.mktemp("loop-processes") / "task.toml"
    config.write_text(
        f'[model]\nid = "{policy}"\n[data]\ndataset = "{task}"\n'
        "[loop]\niterations = 2\nquestions = 8\neval_every = 2\neval_limit = 6\nprobe_questions = 3\n"
        "probe_samples = 4\nseed = 0\nkeep_policies = 1\n"
        "[rollout]\ngroup_size = 8\nmax_new_tokens = 16\nbatch_size = 128\n"
        "[train]\nlr = 1e-3\nminibatches = 2\n"
    )
    return config


@pytest.fixture(scope="module")
def runs(task_config, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for processes, port in ((1, 0), (2, 29591)):
        out[processes] = root / f"p{processes}"
        run_loop(loop_argv(task_config, out[processes], processes, port))
    return out


def test_two_processes_write_what_one_process_writes(runs):
    one, two = runs[1], runs[2]
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*.parquet"))
    assert names == sorted(str(p.relative_to(two)) for p in two.rglob("*.parquet"))
    for iteration in ("iter-0000", "iter-0001"):
        rollouts = [table(run / iteration / "rollouts.parquet") for run in (one, two)]
        manifest = json.loads(pq.read_schema(two / iteration / "rollouts.parquet").metadata[b"cfiw"])
        assert manifest["metrics"]["processes"] == 2
        for a, b in zip(*rollouts, strict=True):  # the same samples: each sequence has its own random stream
            assert set(b) == set(ROLLOUTS.names) and b["completion_ids"] and b["finish_reason"] in ("stop", "length")
            assert {k: v for k, v in a.items() if k != "completion_logprobs"} == {
                k: v for k, v in b.items() if k != "completion_logprobs"
            }
            assert b["completion_logprobs"] == pytest.approx(a["completion_logprobs"], abs=1e-5)
        assert table(one / iteration / "spans.parquet") == table(two / iteration / "spans.parquet")
        scores = [table(run / iteration / "scores.parquet") for run in (one, two)]
        assert len(scores[0]) == len(scores[1]) > 0
        for a, b in zip(*scores, strict=True):
            assert (a["rollout_id"], a["span_idx"]) == (b["rollout_id"], b["span_idx"])
            assert b["delta"] == pytest.approx(a["delta"], abs=1e-5)
        losses = [[r["loss"] for r in table(run / iteration / "train_metrics.parquet")] for run in (one, two)]
        assert losses[1] == pytest.approx(losses[0], abs=1e-5) and any(losses[0])
    for name in ("eval/iter-0000.parquet", "eval/iter-0002.parquet", "probe/iter-0002.parquet"):
        assert table(one / name) == table(two / name), name
    weights = [load_file(run / "policy" / "model.safetensors") for run in (one, two)]
    largest = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert largest < 1e-5
    before = load_file(two / "policies" / "iter-0001" / "model.safetensors")  # what iteration 1 started from
    assert any(not torch.equal(before[k], weights[1][k]) for k in before)  # and the update moved it
    assert json.loads((two / "loop_state.json").read_text()) == {"completed": 2}
    assert (two / "best" / "best.json").exists() and (two / "policies" / "iter-0001").is_dir()


def test_a_killed_two_process_loop_resumes_to_the_same_files(runs, task_config, tmp_path):
    run = tmp_path / "killed"
    kill_when(loop_argv(task_config, run, 2, 29592), run / "iter-0001" / "rollouts.parquet", ROOT)  # the launcher too
    assert not (run / "iter-0001" / "train_metrics.parquet").exists()  # it really was interrupted
    run_loop(loop_argv(task_config, run, 2, 29593))
    assert_same_tables(runs[2], run)
    resumed, uninterrupted = (load_file(r / "policy" / "model.safetensors") for r in (run, runs[2]))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_an_error_stops_every_process_cleanly(task_config, tmp_path):
    """A stage that fails on the processes stops each with the one-line error and exit status 1
    (not an abort at exit with the process group still up); the loop's log is the main
    process's alone."""
    config = tmp_path / "bad.toml"
    text = task_config.read_text()
    task = Path(re.search(r'dataset = "([^"]+)"', text).group(1))
    shutil.copytree(task, tmp_path / "task")
    lines = (tmp_path / "task" / "train.jsonl").read_text().splitlines()
    lines[8] = json.dumps({"question": "How many?", "answer": "#### many"})  # iteration 1's first question
    (tmp_path / "task" / "train.jsonl").write_text("\n".join(lines) + "\n")
    config.write_text(text.replace(f'dataset = "{task}"', f'dataset = "{tmp_path / "task"}"'))
    done = subprocess.run(loop_argv(config, tmp_path / "run", 2, 29594), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("Error: row 8 of") == 2
    assert "terminate called" not in done.stderr and "exitcode: -6" not in done.stderr
    assert done.stderr.count("[loop] iteration 1: rollout") == 1


def test_a_finished_run_started_again_logs_once(runs, task_config):
    """Only the main process logs: a finished two-process run started again (in place: its
    files stay as they are) reports its final evaluations up to date once each, not once per
    process."""
    done = subprocess.run(loop_argv(task_config, runs[2], 2, 29595), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure(done.stderr)
    assert done.stderr.count("is up to date") == 2  # eval/iter-0002 and probe/iter-0002
