"""Assertions shared by the CLI tests."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from kvtool.cli.app import app

runner = CliRunner()


def invoke(*args: Any) -> Any:
    """``kvtool ARGS...`` in-process (every argument as a string); the typer result."""
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result: Any, code: int, *fragments: str, stdout_empty: bool = True) -> None:
    """The documented failure contract: exit ``code``; stderr ends with exactly one ``kvtool: error: ...`` line
    (progress logs may come first) holding every fragment; no traceback; nothing on stdout unless allowed."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("kvtool: error: "), result.stderr
    assert sum(line.startswith("kvtool: error") for line in lines) == 1
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[-1], lines[-1]
    if stdout_empty:
        assert result.stdout == ""
