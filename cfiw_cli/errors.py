"""One error type for bad input, and the layer that turns exceptions into one line + hint.

Stages raise `CfiwError` for anything a user can fix. The CLI catches it (and a few
well-known library exceptions) and prints `Error: <what>` and `Hint: <how>` on stderr, then
exits 1. `CFIW_DEBUG=1` re-raises so the traceback is visible.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

F = TypeVar("F", bound=Callable)


class CfiwError(Exception):
    """A problem with the user's input: printed as one line plus a hint, exit status 1."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def debug_enabled() -> bool:
    return os.environ.get("CFIW_DEBUG", "").strip() not in ("", "0", "false", "no")


def describe(exc: BaseException) -> tuple[str, str | None]:
    """Map an exception to (message, hint). Known library errors get a specific hint."""
    if isinstance(exc, CfiwError):
        return exc.message, exc.hint
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or exc}", "check the path"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}", "choose a path you can write to"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"no space left on the device ({exc.filename or 'while writing'})", "free some disk space and run again"
    if isinstance(exc, OSError) and exc.filename:
        return f"cannot use {exc.filename}: {exc.strerror or exc}", "check the path, its permissions and the disk"
    if isinstance(exc, MemoryError):
        return "out of memory", "lower --batch-size or --max-new-tokens"
    name = type(exc).__name__
    if name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return "accelerator out of memory", "lower --batch-size or --max-new-tokens"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"unexpected {name}: {first_line}" if first_line else f"unexpected {name}",
        "rerun with CFIW_DEBUG=1 to see the traceback",
    )


def print_error(exc: BaseException) -> None:
    message, hint = describe(exc)
    print(f"Error: {message}", file=sys.stderr)
    if hint:
        print(f"Hint: {hint}", file=sys.stderr)


def exits_cleanly(func: F) -> F:
    """Decorator for command bodies: errors become `Error: ...` + hint and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):

        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter, SystemExit):  # a bad flag value exits 2
            raise
        except KeyboardInterrupt:
            print("Interrupted.", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps all errors
            if debug_enabled():
                raise
            print_error(exc)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
