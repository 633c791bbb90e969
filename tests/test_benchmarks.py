"""The benchmark scripts run and print their ratio (numbers themselves are never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [
        "rollout_bench.py",
        "score_bench.py",
        "train_bench.py",
        "loop_bench.py",
        "sql_bench.py",
        "trl_bench.py",
        "startup_bench.py",
        "cost_bench.py",
    ],
)
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
    header, row, floor_header, floor_row = [
        line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["mask"], ["pad"])
    ]
    assert header[:4] == ["mask", "process", "s", "(a)"] and row[0] == "pad"
    assert float(row[-1]) < 1e-4  # max |fast - naive|, fp32
    # The floor table: start-up plus GEMM time, and (a) and (b) over it, for the same mode.
    assert floor_header[:5] == ["mask", "process", "s", "floor", "s"] and floor_row[0] == "pad"
    process, floor, a_over_floor = float(floor_row[1]), float(floor_row[2]), float(floor_row[3])
    a_seconds = float(row[2])
    assert process == float(row[1]) and floor > 0
    assert a_over_floor == pytest.approx(a_seconds / floor, abs=0.02)


@pytest.mark.slow
def test_gpu_check_smoke_runs_through_just_on_a_cpu():
    just = Path(sys.executable).parent / "just"
    done = subprocess.run(
        [str(just), "--justfile", str(BENCHMARKS.parent / "Justfile"), "gpu-check", "--device", "cpu", "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    part1, rest = out.split("\n2. ", 1)
    part2, part34 = rest.split("\n3. ", 1)
    # 1. five tiny bf16 loops at once, none stopped
    names = ("cfiw", "uniform", "inverted", "shuffled", "random")
    modes = [line.split() for line in part1.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert tuple(m[0] for m in modes) == names
    assert all(m[1] == "1" and m[2] == "0" and m[3] == "false" for m in modes)
    assert "loops stopped on a non-finite value: 0 of 5" in part1
    # 2. the loop with and without CFIW, and the overhead between them
    runs = {
        line.split()[0]: line.split() for line in part2.splitlines() if line.strip().startswith(("cfiw ", "uniform "))
    }
    assert runs["cfiw"][-1] == "fits" and runs["uniform"][-1] == "fits" and runs["cfiw"][2] == "float32"
    assert (
        runs["uniform"][1] == "--no-score" and runs["uniform"][5] == runs["uniform"][6] == "0.00"
    )  # no segment, score
    assert "CFIW's overhead per iteration:" in out
    # 3. and 4.
    assert "LoRA: fits" in part34 and "4. the score benchmark on real text" in part34
    assert any(line.split()[:1] == ["pad"] for line in part34.split("4. the score benchmark")[1].splitlines())
