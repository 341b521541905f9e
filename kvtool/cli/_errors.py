"""The one error-to-message map of the CLI: every failure ends in one line on stderr and a documented exit code.

Known kvtool errors carry their own exit code (:mod:`kvtool.errors`). A few foreign exceptions are translated
below. Anything else is a bug: a one-line message with exit 1, and the full traceback with ``KVTOOL_DEBUG=1``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from kvtool.cli._output import Output
from kvtool.errors import EXIT_RUNTIME, KvtoolError

F = TypeVar("F", bound=Callable[..., Any])

#: foreign exception type -> (exit code, message builder)
ERROR_MAP: list[tuple[type[BaseException], int, Callable[[BaseException], str]]] = [
    (MemoryError, EXIT_RUNTIME, lambda e: "out of memory; try fewer --tokens or a smaller --window"),
    (PermissionError, EXIT_RUNTIME, lambda e: f"permission denied: {getattr(e, 'filename', '') or e}"),
    (IsADirectoryError, EXIT_RUNTIME, lambda e: f"is a directory: {getattr(e, 'filename', '') or e}"),
    (KeyboardInterrupt, 130, lambda e: "interrupted"),
]


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def message_for(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception."""
    if isinstance(exc, KvtoolError):  # one line by design; a newline can only come from a name (a path): keep it
        return exc.exit_code, str(exc).strip().replace("\r", "\\r").replace("\n", "\\n")
    for etype, code, build in ERROR_MAP:
        if isinstance(exc, etype):
            return code, _first_line(build(exc))
    text = _first_line(str(exc))
    if "out of memory" in text.lower():
        return EXIT_RUNTIME, f"out of memory: {text}"
    return EXIT_RUNTIME, f"unexpected {type(exc).__name__}: {text} (set KVTOOL_DEBUG=1 for a traceback)"


def handle_errors(func: F) -> F:
    """Decorator for commands: turn exceptions into a one-line ``kvtool: error: ...`` and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the one place that maps everything
            if os.environ.get("KVTOOL_DEBUG") == "1":
                raise
            code, message = message_for(exc)
            Output().error(message)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]
