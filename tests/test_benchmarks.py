"""The benchmark scripts run and print their ratio (numbers themselves are never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rollout_bench.py", "score_bench.py", "train_bench.py", "loop_bench.py"])
def test_benchmark_quick_mode_prints_a_ratio(script):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "ratio" in done.stdout


@pytest.mark.slow
def test_score_benchmark_on_real_text_reports_the_whole_process():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "score_bench.py"), "--data", "real", "--quick", "--modes", "pad"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    header, row = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["mask"], ["pad"])]
    assert header[:4] == ["mask", "process", "s", "(a)"] and row[0] == "pad"
    assert float(row[-1]) < 1e-4  # max |fast - naive|, fp32
