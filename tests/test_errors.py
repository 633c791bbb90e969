"""Bad input: exit status 1, one `Error:` line plus a hint, no traceback, no output file left."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import leftovers


def assert_clean_error(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: "), result.stderr
    assert sum(line.startswith("Error:") for line in lines) == 1
    assert any(line.startswith("Hint: ") for line in lines)
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def rollout(cli, model, dataset, out, *extra):
    return cli("rollout", "--model", model, "--dataset", dataset, "--out", out, "--max-new-tokens", "4", *extra)


def test_missing_model_path(cli, tmp_path, mini_dataset):
    out = tmp_path / "run" / "rollouts.parquet"
    assert_clean_error(rollout(cli, tmp_path / "no-such-model", mini_dataset, out), "model path does not exist")
    assert leftovers(out.parent) == []


def test_directory_without_a_model(cli, tmp_path, mini_dataset):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "rollouts.parquet"
    assert_clean_error(rollout(cli, tmp_path / "empty", mini_dataset, out), "no config.json")
    assert not out.exists()


def test_missing_dataset_path(cli, tmp_path, tiny_model):
    out = tmp_path / "rollouts.parquet"
    assert_clean_error(rollout(cli, tiny_model, tmp_path / "missing.jsonl", out), "dataset not found")
    assert leftovers(tmp_path) == []


def test_dataset_without_question_and_answer(cli, tmp_path, tiny_model):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "2+2?", "solution": "4"}) + "\n")
    out = tmp_path / "rollouts.parquet"
    assert_clean_error(rollout(cli, tiny_model, data, out), "'question'", "'answer'")
    assert leftovers(tmp_path) == ["bad.jsonl"]


def test_dataset_with_unparseable_gold(cli, tmp_path, tiny_model):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "four"}) + "\n")
    assert_clean_error(rollout(cli, tiny_model, data, tmp_path / "r.parquet"), "row 0", "####")
    assert leftovers(tmp_path) == ["bad.jsonl"]


@pytest.mark.parametrize("selection", [("--offset", "16"), ("--offset", "500", "--limit", "3")])
def test_empty_selection(cli, tmp_path, tiny_model, mini_dataset, selection):
    out = tmp_path / "rollouts.parquet"
    assert_clean_error(rollout(cli, tiny_model, mini_dataset, out, *selection), "empty selection")
    assert leftovers(tmp_path) == []


def test_a_limit_of_zero_is_a_bad_flag_value(cli, tmp_path, tiny_model, mini_dataset):
    done = rollout(cli, tiny_model, mini_dataset, tmp_path / "rollouts.parquet", "--limit", "0")
    assert done.exit_code == 2 and "--limit" in done.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["rollout", "eval"])
def test_output_directory_not_writable(cli, tmp_path, tiny_model, mini_dataset, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker / "rollouts.parquet", "/sys/cfiw-denied/rollouts.parquet"):
        result = cli(command, "--model", tiny_model, "--dataset", mini_dataset, "--out", out, "--max-new-tokens", "4")
        assert_clean_error(result, "cannot write to output directory")
    assert leftovers(tmp_path) == ["a-file"]


def test_rollouts_file_with_a_column_removed(cli, tmp_path):
    from cfiw_cli.schemas import ROLLOUTS

    path = tmp_path / "rollouts.parquet"
    pq.write_table(ROLLOUTS.empty_table().drop(["completion_logprobs"]), path)
    assert_clean_error(cli("validate", path), "no column 'completion_logprobs'")
    mistyped = tmp_path / "other.parquet"
    table = ROLLOUTS.empty_table()
    table = table.set_column(table.column_names.index("reward"), "reward", pa.array([], pa.string()))
    pq.write_table(table, mistyped)
    assert_clean_error(cli("validate", mistyped, "--kind", "rollouts"), "column 'reward'", "string")


def test_validate_accepts_a_rollouts_file_from_another_tool(cli, tmp_path):
    from cfiw_cli.schemas import ROLLOUTS

    path = tmp_path / "rollouts.parquet"
    pq.write_table(ROLLOUTS.empty_table().append_column("extra", pa.array([], pa.int8())), path)
    result = cli("validate", path)
    assert result.exit_code == 0 and "valid rollouts file" in result.stdout


def test_debug_mode_shows_the_traceback(tmp_path, mini_dataset):
    import os
    import subprocess
    import sys

    argv = [
        sys.executable,
        "-m",
        "cfiw_cli",
        "rollout",
        "--model",
        str(tmp_path / "none"),
        "--dataset",
        str(mini_dataset),
        "--out",
        str(tmp_path / "r.parquet"),
    ]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and plain.stderr.startswith("Error: ") and "Traceback" not in plain.stderr
    debug = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "CFIW_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_full_disk_is_named():
    import errno

    from cfiw_cli.errors import describe

    message, hint = describe(OSError(errno.ENOSPC, "No space left on device", "runs/x/rollouts.parquet"))
    assert "no space left" in message and "runs/x/rollouts.parquet" in message and "disk space" in hint


@pytest.mark.parametrize(
    ("code", "status", "printed"), [("0", 0, ""), ("3", 3, ""), ("None", 0, ""), ("'Error: stop'", 1, "Error: stop")]
)
def test_a_launched_process_leaves_without_finalization(tmp_path, code, status, printed):
    """Under `accelerate launch` (WORLD_SIZE > 1) a process ends with its exit status and its
    flushed output, but without interpreter finalization (where gloo's threads can abort it):
    the atexit handler registered here never runs. A plain process returns and finalizes."""
    import subprocess
    import sys

    script = (
        "import atexit, sys, torch.distributed\n"
        "from cfiw_cli import distributed\n"
        "atexit.register(lambda: print('finalized', flush=True))\n"
        "print('written', end='')\n"
        f"distributed.exit_launched_process({code})\n"
        "print(' returned')\n"
    )
    for world, expected in (("2", ("written", status)), ("1", ("written returned\nfinalized", 0))):
        env = {**os.environ, "WORLD_SIZE": world}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert (done.stdout.strip(), done.returncode) == expected, done.stderr
        assert printed in done.stderr if world == "2" else not done.stderr
