"""All CLI printing goes through :class:`Output`: results on stdout, everything else on stderr.

Modes (like the Hugging Face ``hf`` CLI): ``human`` (tables, progress bars on stderr), ``json`` (exactly one JSON
document on stdout, no progress), ``quiet`` (only the primary result, e.g. a path, one per line).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class Output:
    """One output object per command invocation."""

    def __init__(self, mode: str = "human", results_to_stderr: bool = False):
        self.mode = mode
        self.err = Console(stderr=True, soft_wrap=True)
        #: ``-o -``: stdout carries the command's output bytes, so results are printed on stderr
        self.results_to_stderr = results_to_stderr
        self.out = self.err if results_to_stderr else Console(soft_wrap=True)
        if not self.out.is_terminal and not results_to_stderr:  # a pipe or file: no squeezing into 80 columns
            self.out = Console(soft_wrap=True, width=160)

    @property
    def progress_enabled(self) -> bool:
        return self.mode == "human" and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1" and self.err.is_terminal

    def log(self, message: str) -> None:
        """A progress or info line on stderr (silent in json/quiet modes)."""
        if self.mode == "human":
            self.err.print(message, highlight=False)

    def warning(self, message: str) -> None:
        self.err.print(f"kvtool: warning: {message}", highlight=False, markup=False)

    def error(self, message: str) -> None:
        self.err.print(f"kvtool: error: {message}", highlight=False, markup=False)

    def result(self, data: dict[str, Any], primary: str | None = None, table: Table | None = None) -> None:
        """Print the command's result: JSON document, the primary value alone, or a human view."""
        stream = sys.stderr if self.results_to_stderr else sys.stdout
        if self.mode == "json":
            stream.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        elif self.mode == "quiet":
            if primary is not None and not self.results_to_stderr:
                stream.write(f"{data[primary]}\n")
        else:
            if table is not None:
                self.out.print(table)
            if primary is not None:
                self.out.print(str(data[primary]), highlight=False, markup=False)
        stream.flush()

    def show(self, renderable: Any, **style: Any) -> None:
        """Part of a human-readable result beyond :meth:`result` (a line or a table; rich ``style`` keywords such as
        ``markup=False``), on the results stream: stdout, or stderr when stdout carries output bytes (``-o -``)."""
        self.out.print(renderable, **style)

    def raw(self, text: str) -> None:
        """A document exactly as given (an export) on stdout, flushed."""
        sys.stdout.write(text)
        sys.stdout.flush()

    def table(self, title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
        t = Table(title=title, show_lines=False, header_style="bold")
        for c in columns:
            t.add_column(c, justify="left" if c in columns[:1] else "right")
        for r in rows:
            t.add_row(*[str(x) for x in r])
        return t

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Any]:
        """A progress bar on stderr; yields ``advance(n)``. A no-op outside human mode or without a terminal."""
        if not self.progress_enabled:
            yield lambda n=1: None
            return
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
        ) as p:
            task = p.add_task(description, total=total)
            yield lambda n=1: p.advance(task, n)
