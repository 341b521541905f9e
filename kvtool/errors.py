"""Every user-facing failure of kvtool, with its exit code.

The CLI maps each class to a one-line message and the exit code below (documented in ``docs/cli.md``); nothing
else reaches the user as a traceback unless ``KVTOOL_DEBUG=1`` is set.

| code | meaning |
|------|---------|
| 0 | success |
| 1 | runtime failure (model not available, unreadable input, out of memory, ...) |
| 2 | usage error (bad flag or value) |
| 3 | bad or incompatible artifact (truncated, corrupted, newer schema, other model) |
| 4 | quality gate failed |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_ARTIFACT = 3
EXIT_QUALITY_GATE = 4


class KvtoolError(Exception):
    """Base class: a failure with a one-line message meant for the user."""

    exit_code: int = EXIT_RUNTIME


class ModelNotFoundError(KvtoolError):
    """The model named by the user is not available locally (kvtool never downloads)."""


class InputError(KvtoolError):
    """An input file or text cannot be read or is unusable."""


class UsageError(KvtoolError):
    """A flag or argument value is invalid (same exit code as typer's own usage errors)."""

    exit_code = EXIT_USAGE


class ArtifactError(KvtoolError):
    """A kvtool artifact is truncated, corrupted, of a newer schema, or made for another model."""

    exit_code = EXIT_ARTIFACT


class QualityGateError(KvtoolError):
    """A requested quality gate (e.g. ``--max-ppl-delta``) failed."""

    exit_code = EXIT_QUALITY_GATE
