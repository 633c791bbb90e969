"""Sharding a stage's work across `accelerate launch` processes and merging the results.

Each process takes every `num_processes`-th unit of work starting at its rank; the rows come
back to every process with `accelerate.utils.gather_object`, are put back in the
single-process order, and only the main process writes the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def state() -> Any:
    """accelerate's process state. Without an accelerator the processes use CPU + gloo:
    `accelerate launch --multi_gpu --num_processes 2` (torchrun workers) then works on a CPU
    machine too, whereas accelerate's own `--cpu` flag starts a single process."""
    import torch
    from accelerate import PartialState

    accelerated = torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    return PartialState(cpu=not accelerated)


def my_share(items: Sequence[T]) -> list[int]:
    """Indices of the items this process handles."""
    current = state()
    return list(range(current.process_index, len(items), current.num_processes))


def gather_rows(rows: list[dict], order: Callable[[dict], Any]) -> list[dict]:
    """All processes' rows, sorted by `order` (a no-op with one process)."""
    current = state()
    if current.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    merged = gather_object(rows)
    return sorted(merged, key=order)


def is_main() -> bool:
    return state().is_main_process


def processes() -> int:
    return state().num_processes


def finish() -> None:
    """Wait for every process, then tear the process group down in order (a process that exits
    while another is still inside a collective can abort it)."""
    current = state()
    if current.num_processes == 1:
        return
    current.wait_for_everyone()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
