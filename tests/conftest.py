"""Shared fixtures: a tiny model built once per session, a small GSM8K-format file, a CLI runner."""

from __future__ import annotations

import functools
import json
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cfiw_cli.cli import app

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
# recorded file hashes go to a directory of the session's own, not the user's cache (inherited
# by every command a test starts)
os.environ["CFIW_CACHE_DIR"] = tempfile.mkdtemp(prefix="cfiw-test-cache-")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return CliResult(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (SHARED_GSM8K / "test.jsonl").exists():
        pytest.skip(f"the real GSM8K files are not at {SHARED_GSM8K} (this check needs ../shared beside the repo)")
    return SHARED_GSM8K


@pytest.fixture(scope="session")
def mini_dataset(tmp_path_factory) -> Path:
    """16 generated GSM8K-format problems (no dependency on ../shared)."""
    from cfiw_cli.tasks.arith import make_problems

    path = tmp_path_factory.mktemp("data") / "mini.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_problems(16, seed=1)))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from cfiw_cli.tools.tiny_model import TinyModelConfig, run

    return run(TinyModelConfig(out=str(tmp_path_factory.mktemp("models") / "qwen2"))).path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from cfiw_cli.tools.tiny_model import TinyModelConfig, run

    return run(TinyModelConfig(out=str(tmp_path_factory.mktemp("models") / "llama"), arch="llama", seed=1)).path


@functools.cache
def tokenizer_files() -> frozenset[str]:
    """The files `save_pretrained` writes for a tokenizer like tiny-model's (special tokens and a
    chat template) with the installed transformers: 4.x also writes special_tokens_map.json."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<unk>": 0, "<|endoftext|>": 1, "<|pad|>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = "{{ messages }}"
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return frozenset(os.listdir(directory))


def leftovers(directory: Path) -> list[str]:
    """Files a failed stage might have left behind (final outputs or temp files)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def write_rollouts(
    path: Path, tokenizer, completions: list[str], golds: list[str] | None = None, iteration: int = 0
) -> Path:
    """A rollouts file as another tool might write it: completions given as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cfiw_cli.schemas import ROLLOUTS
    from cfiw_cli.tasks.gsm8k import build_prompt, extract_answer, reward

    rows = []
    for index, text in enumerate(completions):
        gold = golds[index] if golds else (extract_answer(text) or "0")
        question = f"Question number {index}: what is the total?"
        prompt = build_prompt(question, tokenizer)
        completion_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(
            {
                "rollout_id": f"{iteration}:q-{index // 2}:{index % 2}",
                "iteration": iteration,
                "prompt_id": f"q-{index // 2}",
                "sample_idx": index % 2,
                "question": question,
                "gold": gold,
                "prompt_text": prompt,
                "completion_text": text,
                "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
                "completion_ids": completion_ids,
                "completion_logprobs": [0.0] * len(completion_ids),
                "finish_reason": "stop",
                "pred": extract_answer(text),
                "reward": reward(text, gold),
                "correct": reward(text, gold) == 1.0,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=ROLLOUTS), path)
    return path


COMPLETIONS = [
    "Ava starts with 12 apples.\nShe buys 3 + 4 = 7 more.\n12 + 7 = <<12+7=19>>19 apples.\n#### 19",
    "Let me think about this carefully. First, 3*4=12. Then 12 / 2 = 6 pencils in each box.\nThe answer is 6.",
    "She earns $2.50 per egg, so 9 * 2.5 = $<<9*2.5=22.5>>22.5 every day.\n#### 22.5",
    "#### 5",
    "I am not sure what to do here at all",
    "Janet’s ducks lay 16 eggs per day — she eats 3, so 16 − 3 = 13 remain 🦆.\nThus 13 × 2 = 26.\n#### 26",
    "We can solve this step by step. Now we put it together. The total number of coins in the jar is 40 and then "
    "2 more, so 42",
]


SHARPENING_QUESTION = "Pick two numbers and add them."


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="session")
def sharpening_task(tmp_path_factory, cli) -> tuple[Path, Path]:
    """(a warm policy, its task directory): the policy writes "a + b = d.\\n#### d" with d
    uniform over 2..8 (a tiny model learns the format, not the arithmetic), so it earns
    reward about one time in seven on the task, whose every gold answer is 3; groups of
    samples then have rewards that differ, and RL can sharpen the policy towards 3."""
    root = tmp_path_factory.mktemp("sharpening")
    rng = random.Random(0)
    solutions = []
    for _ in range(400):
        total = rng.randint(2, 8)
        first = rng.randint(1, total - 1)
        solutions.append(
            {"question": SHARPENING_QUESTION, "answer": f"{first} + {total - first} = {total}.\n#### {total}"}
        )
    write_jsonl(root / "warm" / "train.jsonl", solutions)
    for split in ("train", "test"):
        write_jsonl(
            root / "task" / f"{split}.jsonl", [{"question": SHARPENING_QUESTION, "answer": "1 + 2 = 3.\n#### 3"}] * 400
        )
    base, policy = root / "base", root / "policy"
    result = cli(
        "tiny-model",
        "--out",
        base,
        "--dataset",
        root / "warm" / "train.jsonl",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--vocab-size",
        "300",
    )
    assert result.exit_code == 0, result.stderr
    result = cli(
        "sft",
        "--model",
        base,
        "--dataset",
        root / "warm",
        "--out",
        policy,
        "--steps",
        "150",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
    )
    assert result.exit_code == 0, result.stderr
    return policy, root / "task"


def run_tables(run: Path) -> dict[str, object]:
    """Every Parquet file of a run directory, without the wall-clock column, by relative path."""
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(run.rglob("*.parquet")):
        table = pq.read_table(path)
        out[str(path.relative_to(run))] = table.drop([c for c in ("seconds",) if c in table.column_names])
    return out


def assert_same_tables(expected: Path, got: Path) -> None:
    """Two runs wrote the same Parquet files with the same contents: every column equal, but
    float columns only to 1e-4 absolute or 1e-5 relative. Two processes on a loaded CPU have
    been seen to differ in the last bits of a float32 log-prob: a score's `delta`, the double
    difference of two sums near -250, then moved by 1.4e-6 while both sums stored equal."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    want, have = run_tables(expected), run_tables(got)
    assert sorted(have) == sorted(want)
    for name, table in want.items():
        other = have[name]
        assert other.schema == table.schema and other.num_rows == table.num_rows, name
        for column in table.column_names:
            a, b = table.column(column), other.column(column)
            if pa.types.is_list(a.type) and pa.types.is_floating(a.type.value_type):
                assert pc.list_value_length(a).equals(pc.list_value_length(b)), f"{name}: {column}"
                a, b = pc.list_flatten(a), pc.list_flatten(b)
            if pa.types.is_floating(a.type):
                a, b = a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False)
                assert np.allclose(a, b, rtol=1e-5, atol=1e-4, equal_nan=True), f"{name}: {column}"
            else:
                assert a.equals(b), f"{name}: {column}"


def run_chained(commands: str, cwd: Path, timeout: int = 900) -> None:
    """Run the lines `cfiw loop --dry-run` printed, in bash, with this environment's cfiw."""
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-e"], input=commands, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-2000:]


def kill_when(argv: list[str], marker: Path, cwd: Path) -> None:
    """Start `argv` and SIGKILL it (with every process it started) as soon as `marker` exists."""
    import signal
    import subprocess
    import time

    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, start_new_session=True
    )
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def lock_held_elsewhere(lock_file: Path) -> Iterator[None]:
    """`lock_file` locked by another process (as a running cfiw command holds its output's)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); time.sleep(600)", str(lock_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
