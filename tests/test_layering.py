"""Stages do not import each other: what two stages share lives a layer below them. Only the
orchestrators, `loop` (one process running every stage), `replay` (train and eval again on
a loop's artifacts) and `gradients` (train's gradients, and rollouts for its reference), call
other stages."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cfiw_cli"
STAGE_PACKAGES = ("pipeline", "tools", "report")
ORCHESTRATORS = {"loop", "replay", "gradients"}


def imported_stages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if len(parts) == 2 and parts[1] in STAGE_PACKAGES:
                found |= {alias.name for alias in node.names}
            elif len(parts) > 2 and parts[1] in STAGE_PACKAGES:
                found.add(parts[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if len(parts) > 2 and parts[1] in STAGE_PACKAGES:
                    found.add(parts[2])
    return found - {path.stem}


def test_no_stage_imports_a_sibling():
    stages = sorted(
        p
        for package in STAGE_PACKAGES
        for p in (PACKAGE / package).glob("*.py")
        if p.stem != "__init__" and p.stem not in ORCHESTRATORS
    )
    assert len(stages) >= 10
    offenders = {p.stem: found for p in stages if (found := imported_stages(p))}
    assert offenders == {}


def test_the_check_sees_a_sibling_import(tmp_path):
    module = tmp_path / "score.py"
    module.write_text("from cfiw_cli.pipeline.train import run\nfrom cfiw_cli.tools import sft\n")
    assert imported_stages(module) == {"train", "sft"}


# Imported where they are used, so that `cfiw --help` and light commands never load them.
HEAVY_LIBRARIES = {
    "torch",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "peft",
    "matplotlib",
    "vllm",
    "tokenizers",
    "huggingface_hub",
    "wandb",
    "trackio",
}


def function_level_imports(path: Path, root: Path = PACKAGE) -> list[str]:
    """Imports inside functions other than of a heavy library (and, in cli.py, of a stage or an
    integration, which a command's body loads)."""
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                parts = (module or "").split(".")
                stage = path.name == "cli.py" and len(parts) > 1 and parts[1] in (*STAGE_PACKAGES, "integrations")
                if parts[0] not in HEAVY_LIBRARIES and not stage:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_imports_are_at_module_top_except_heavy_libraries():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30
    assert [line for path in modules for line in function_level_imports(path)] == []


def test_the_import_check_sees_a_buried_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import json\n    import torch\n    from cfiw_cli import stage\n")
    assert [line.split(": ", 1)[1] for line in function_level_imports(module, tmp_path)] == [
        "import json",
        "from cfiw_cli import stage",
    ]
