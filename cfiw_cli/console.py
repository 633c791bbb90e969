"""stderr console and progress bars (hidden when stderr is not a terminal)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    """A line on stderr, from the main process only under `accelerate launch` (torchrun sets
    RANK), so a run's log reads as one process's; errors print from every process."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return
    # soft_wrap: one message, one line, whatever the width, so that logs stay greppable
    console.print(message, markup=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "") -> Iterator[callable]:
    """Yield `advance(n=1, **fields)`; the bar is drawn only on an interactive stderr."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=False) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            fields = {"status": status} if status is not None else {}
            bar.update(task, advance=n, **fields)

        yield advance
