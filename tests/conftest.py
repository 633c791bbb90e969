"""Shared fixtures: a tiny model built once per session, a small GSM8K-format file, a CLI runner."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cfiw_cli.cli import app

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


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
    from cfiw_cli.stages.tiny_model import TinyModelConfig, run

    return run(TinyModelConfig(out=str(tmp_path_factory.mktemp("models") / "qwen2")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from cfiw_cli.stages.tiny_model import TinyModelConfig, run

    return run(TinyModelConfig(out=str(tmp_path_factory.mktemp("models") / "llama"), arch="llama", seed=1))


def leftovers(directory: Path) -> list[str]:
    """Files a failed stage might have left behind (final outputs or temp files)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []
