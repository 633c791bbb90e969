"""Sharding a stage's work across `accelerate launch` processes and merging the results.

Each process takes every `num_processes`-th unit of work starting at its rank; the rows come
back to every process with `accelerate.utils.gather_object`, are put back in the
single-process order, and only the main process writes the file.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from cfiw_cli.errors import CfiwError

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


_held = False  # the loop keeps one process group for all its stages


@contextlib.contextmanager
def one_group() -> Iterator[None]:
    """Keep the process group up across the stages run inside (each stage's `finish` only
    waits for the other processes); it is torn down at the end."""
    global _held
    _held = True
    try:
        yield
    except BaseException as exc:
        _held = False
        if getattr(exc, "on_every_process", False):
            barrier()  # every process raised it (see `agreed`): leave the group together
        _tear_down()  # else without waiting: the others may never arrive; a live group aborts the exit
        raise
    _held = False
    finish()


def barrier() -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    if state().num_processes > 1:
        state().wait_for_everyone()


def agreed(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on this process, then wait for the others; when it fails with a CfiwError
    on any process, every process raises the first one, so none is left waiting for the others."""
    error: CfiwError | None = None
    try:
        result = work(*args)
    except CfiwError as exc:
        if state().num_processes == 1:
            raise
        error = exc
    if state().num_processes > 1:
        from accelerate.utils import gather_object

        failures = [e for e in gather_object([(error.message, error.hint) if error else None]) if e]
        if failures:
            agreed_error = error or CfiwError(*failures[0])
            agreed_error.on_every_process = True  # type: ignore[attr-defined]
            raise agreed_error
    return result


def finish() -> None:
    """Wait for every process, then tear the process group down in order (a process that exits
    while another is still inside a collective can abort it). Inside `one_group` it only waits."""
    current = state()
    if current.num_processes == 1:
        return
    current.wait_for_everyone()
    if not _held:
        _tear_down()


def _tear_down() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_launched_process(code: object) -> None:
    """End a process started by `accelerate launch` with `code`, without interpreter
    finalization (nothing returns when a process group was started; a plain process returns).

    By then every output is written and the group is torn down (`finish`, `one_group`), but
    gloo's worker threads may still hold objects whose destruction takes the GIL: during
    finalization that aborts the process (SIGABRT, rarely, and more often on a loaded machine),
    and the launcher then fails a run that has finished. So the process flushes its streams and
    leaves with `os._exit`."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    _tear_down()  # a no-op when `finish` or `one_group` already did it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)
