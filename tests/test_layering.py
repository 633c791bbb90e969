"""Stages do not import each other: what two stages share lives a layer below them. Only the
orchestrators, `loop` (one process running every stage) and `replay` (train and eval again on
a loop's artifacts), call other stages."""

import ast
from pathlib import Path

STAGES = Path(__file__).resolve().parents[1] / "cfiw_cli" / "stages"
ORCHESTRATORS = {"loop", "replay"}


def imported_stages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "cfiw_cli.stages":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("cfiw_cli.stages."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[2] for alias in node.names if alias.name.startswith("cfiw_cli.stages.")}
    return found - {path.stem}


def test_no_stage_imports_a_sibling():
    stages = sorted(p for p in STAGES.glob("*.py") if p.stem != "__init__" and p.stem not in ORCHESTRATORS)
    assert len(stages) >= 10
    offenders = {p.stem: found for p in stages if (found := imported_stages(p))}
    assert offenders == {}
