"""Every command answers --help with exit 0, and its help ends with an example."""

import shlex
import subprocess
import sys

import pytest

from cfiw_cli.cli import app
from tests.conftest import run_cli

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


def test_bad_flag_value_exits_2(cli):
    assert cli("rollout", "--model", "m", "--dataset", "d", "--out", "o.parquet", "--group-size", "0").exit_code == 2


# Each choice flag and the tuple its stage checks against (the flag is built from it).
CHOICE_FLAGS = {
    ("score", "--mask"): "cfiw_cli.algo.importance:MASK_MODES",
    ("score", "--target"): "cfiw_cli.algo.importance:TARGETS",
    ("score", "--dtype"): "cfiw_cli.modeling:DTYPES",
    ("rollout", "--dtype"): "cfiw_cli.modeling:DTYPES",
    ("eval", "--dtype"): "cfiw_cli.modeling:DTYPES",
    ("train", "--weighting"): "cfiw_cli.algo.weights:MODES",
    ("train", "--profile"): "cfiw_cli.algo.weights:PROFILES",
    ("train", "--loss-type"): "cfiw_cli.algo.loss:LOSS_TYPES",
    ("train", "--scale-rewards"): "cfiw_cli.algo.loss:REWARD_SCALINGS",
    ("loop", "--weighting"): "cfiw_cli.algo.weights:MODES",
}


@pytest.mark.parametrize(("name", "flag"), sorted(CHOICE_FLAGS))
def test_choice_flags_list_their_choices_and_reject_others_with_exit_2(cli, name, flag):
    import importlib

    module, attribute = CHOICE_FLAGS[name, flag].split(":")
    choices = list(getattr(importlib.import_module(module), attribute))
    help_text = cli(name, "--help").stdout
    assert f"{flag} <{'|'.join(choices)}>" in help_text  # the choices, in order, beside the flag
    result = cli(name, flag, "not-a-choice")  # parsing fails before any required option is checked
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "not-a-choice" in result.stderr and all(f"'{choice}'" in result.stderr for choice in choices)
    assert "Traceback" not in result.stderr + result.stdout


def test_help_imports_no_heavy_library():
    # torch, transformers, trl and datasets load inside command bodies, so `cfiw --help` is instant;
    # a module-level import of any of them would add seconds. Measured by what is imported, and by
    # the clock with a generous bound (a cold start on a busy 2-core machine).
    import time

    probe = (
        "import sys; from cfiw_cli.cli import app; print(sorted(m for m in ('torch', 'transformers', 'trl', "
        "'datasets', 'pyarrow', 'duckdb') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cfiw_cli", "--help"], capture_output=True, check=True, timeout=60)
    assert time.perf_counter() - started < 1.0


STAGE_COMMANDS = {"tiny-model", "synth", "sft", "rollout", "eval", "segment", "score", "train", "replay", "gradients"}


def test_every_stage_command_is_built_from_its_config():
    from cfiw_cli.registry import STAGES

    assert set(STAGES) == STAGE_COMMANDS


@pytest.mark.parametrize("name", sorted(STAGE_COMMANDS))
def test_each_config_field_is_exactly_one_flag_with_the_same_default(name):
    from dataclasses import MISSING, fields
    from enum import Enum

    import typer.main

    from cfiw_cli.registry import STAGES

    config = STAGES[name].config
    params = typer.main.get_command(app).commands[name].params
    names = [p.name for p in params]
    for field in fields(config):
        assert names.count(field.name) == 1, f"{config.__name__}.{field.name} is not exactly one parameter of {name}"
        param = params[names.index(field.name)]
        if param.param_type_name == "option":
            assert f"--{field.name.replace('_', '-')}" in param.opts
        if field.default is MISSING:
            assert param.required, f"{name} {field.name} should be required"
        else:
            default = param.default.value if isinstance(param.default, Enum) else param.default
            assert default == field.default, f"{name} {field.name}: flag default {default!r} != {field.default!r}"
    assert set(names) - {f.name for f in fields(config)} <= {"force"}


def test_the_loops_command_lines_parse_back_to_the_same_configs(tmp_path, monkeypatch):
    """`cfiw loop --dry-run` prints each stage as flags; the CLI must build the very same config."""
    import importlib
    from types import SimpleNamespace

    from cfiw_cli.pipeline.loop import command_line, load_config, plan

    modules = {"rollout": "pipeline.rollout", "segment": "pipeline.segment", "score": "pipeline.score"}
    modules |= {"train": "pipeline.train", "eval": "pipeline.eval"}
    built = []

    def capture(config, **_):
        built.append(config)
        return SimpleNamespace(metrics={})

    for module in modules.values():
        monkeypatch.setattr(importlib.import_module(f"cfiw_cli.{module}"), "run", capture)
    config = load_config("tiny", None)
    config["train"] |= {"beta": 0.01, "lr_schedule": "cosine", "importance_floor": 0.0, "optimizer": "sgd"}
    config["loop"] |= {"profile": "authors", "weighting": "oracle"}
    steps = [(s.command, s.config) for s in plan(config, tmp_path / "run").steps if s.command in modules]
    assert {command for command, _ in steps} == set(modules)
    for command, stage_config in steps:
        words = shlex.split(command_line(command, stage_config))[1:]
        assert run_cli(*words).exit_code == 0
        assert built.pop() == stage_config, command


def test_a_top_p_of_zero_is_refused_where_it_is_declared(cli):
    """`--top-p` is a mass in (0, 1]: its declaration refuses 0 before anything loads, as a usage error."""
    result = cli("rollout", "--model", "m", "--dataset", "d", "--out", "o.parquet", "--top-p", "0")
    assert result.exit_code == 2 and "not above 0" in result.stderr and "Traceback" not in result.stderr


def test_the_loops_flags_are_generated_from_the_fields_they_set():
    """Each `cfiw loop` flag beside --set takes its type, limits, choices and help from the
    field it sets, and sets exactly the keys it names."""
    from dataclasses import fields

    import typer.main

    from cfiw_cli.cli import LOOP_FLAGS

    params = {p.name: p for p in typer.main.get_command(app).commands["loop"].params}
    for flag in LOOP_FLAGS:
        declared = next(f for f in fields(flag.declared_in) if f.name == flag.field).metadata
        param = params[flag.name]
        assert param.default is None and declared["help"] in param.help and ", ".join(flag.keys) in param.help
        if declared.get("choices"):
            assert tuple(c.value for c in param.type_descriptor.annotation) == declared["choices"]
        assert (param.min, param.max) == (declared.get("min"), declared.get("max")), flag.name
    done = run_cli("loop", "--preset", "tiny", "--run", "runs/x", "--dry-run", "--dtype", "bfloat16", "-m", "m")
    assert done.exit_code == 0, done.stderr
    assert all("--model m " in line for line in done.stdout.splitlines()[:2])
    stages = [line for line in done.stdout.splitlines() if line.split()[1] in ("rollout", "score", "eval", "train")]
    assert stages and all("--dtype bfloat16 " in line for line in stages)
    refused = run_cli("loop", "--preset", "tiny", "--run", "runs/x", "--dry-run", "--iterations", "0")
    assert refused.exit_code == 2 and "--iterations" in refused.stderr
