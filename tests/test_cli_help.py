"""Every command answers --help with exit 0, and its help ends with an example."""

import subprocess
import sys

import pytest

from cfiw_cli.cli import app

COMMANDS = sorted(info.name for info in app.registered_commands)


def test_there_are_commands():
    assert {"tiny-model", "synth", "sft", "rollout", "eval", "validate"} <= set(COMMANDS)


def test_top_level_help_ends_with_example(cli):
    result = cli("--help")
    assert result.exit_code == 0
    assert result.stdout.strip().split("Example:")[-1].strip().startswith("cfiw ")


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_ends_with_an_example(cli, name):
    result = cli(name, "--help")
    assert result.exit_code == 0, result.stderr
    text = result.stdout.strip()
    assert "Example:" in text, f"`cfiw {name} --help` has no example"
    tail = text.rsplit("Example:", 1)[1]
    assert tail.strip().startswith(f"cfiw {name}"), f"the example of {name} does not run `cfiw {name}`"
    assert "--help" in text.rsplit("Example:", 1)[0], "the example must come after the options"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_text(name):
    import typer.main

    command = typer.main.get_command(app).commands[name]
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, f"`cfiw {name} {param.opts[0]}` has no help text"


def test_console_script_and_module_entry_points():
    for argv in ([sys.executable, "-m", "cfiw_cli", "--help"], [sys.executable, "-m", "cfiw_cli", "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    help_text = subprocess.run([sys.executable, "-m", "cfiw_cli", "--help"], capture_output=True, text=True).stdout
    assert "rollout" in help_text and "Example: cfiw" in help_text


def test_help_does_not_import_torch():
    code = "import sys; from cfiw_cli.cli import app; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_bad_flag_value_exits_2(cli):
    assert cli("rollout", "--model", "m", "--dataset", "d", "--out", "o.parquet", "--group-size", "0").exit_code == 2
