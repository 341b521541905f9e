"""Atomic file writes: a temporary file in the target folder, fsync, then ``os.replace``.

A killed or failed write never leaves a half-written output: either the old file (or none) or the new one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from kvtool.errors import KvtoolError


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | Sequence[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or consecutive pieces of it) to ``path`` atomically; a file-system failure is a
    one-line :class:`KvtoolError` (exit 1)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                f.writelines(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise KvtoolError(f"{path}: cannot write: {e.strerror or str(e).splitlines()[0]}") from e
        raise
    try:  # make the rename itself durable; not every platform or file system allows it
        fd = os.open(target.parent if str(target.parent) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_folder_atomic(path: str | os.PathLike[str], files: dict[str, bytes], overwrite: bool = False) -> None:
    """Write ``files`` (``{name: bytes}``, plain names) as the folder ``path``: a temporary folder beside it filled
    and renamed into place, so the folder appears whole or not at all. An existing folder is replaced only with
    ``overwrite`` (moved aside, then removed); a file-system failure is a one-line :class:`KvtoolError`."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, data in files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"not a plain file name: {name!r}")
            write_bytes_atomic(tmp / name, data)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists")
            if not target.is_dir():
                target.unlink()
            else:
                os.replace(target, old)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)  # put the previous folder back
        if isinstance(e, OSError):
            raise KvtoolError(f"{path}: cannot write: {e.strerror or str(e).splitlines()[0]}") from e
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
