"""Text for calibration and evaluation, shipped with the package so the default path works anywhere.

Jane Austen's novels (public domain; extracted from Debian's ``r-cran-janeaustenr``): *Emma* and *Mansfield
Park* are the calibration set, *Persuasion* is held out for evaluation. Front matter (title, author) is dropped:
each text starts at its first chapter heading.
"""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

from kvtool.errors import InputError

BOOKS = ("emma", "mansfieldpark", "persuasion")
SETS = {"calibration": ("emma", "mansfieldpark"), "evaluation": ("persuasion",)}
_FIRST_CHAPTER = re.compile(r"^chapter (1|i)\s*$", re.IGNORECASE | re.MULTILINE)


def book(name: str) -> str:
    """One shipped novel, from its first chapter heading on."""
    if name not in BOOKS:
        raise InputError(f"unknown book '{name}' (shipped: {', '.join(BOOKS)})")
    text = (resources.files("kvtool") / "data" / "austen" / f"{name}.txt").read_text(encoding="utf-8")
    m = _FIRST_CHAPTER.search(text)
    return text[m.start() :] if m else text


def load_text(source: str) -> str:
    """Text from a shipped set (``calibration``, ``evaluation``), a book name, a file path, or ``-`` (stdin)."""
    if source in SETS:
        return "\n\n".join(book(b) for b in SETS[source])
    if source in BOOKS:
        return book(source)
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise InputError(f"text file not found: {path}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read text file {path}: {e}") from e
    if not text.strip():
        raise InputError(f"the text from '{source}' is empty")
    return text
