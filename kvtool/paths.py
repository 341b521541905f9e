"""Where kvtool keeps state: ``$KVTOOL_HOME`` (default ``~/.cache/kvtool``)."""

from __future__ import annotations

import os
from pathlib import Path


def kvtool_home() -> Path:
    """The root folder for kvtool's caches (converted models, file digests); created on demand."""
    home = Path(os.environ.get("KVTOOL_HOME") or Path.home() / ".cache" / "kvtool")
    home.mkdir(parents=True, exist_ok=True)
    return home
