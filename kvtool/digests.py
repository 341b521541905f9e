"""Stable digests: canonical JSON, files (cached by path, size and mtime) and tensors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kvtool.paths import kvtool_home

_CHUNK = 1 << 22


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: the one serialization every digest of kvtool is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_json(obj: Any) -> str:
    """``sha256:<hex>`` of :func:`canonical_json` of ``obj``."""
    return "sha256:" + hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    """``sha256:<hex>`` of raw bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a file's bytes.

    Large weight files are hashed once: the result is remembered in ``$KVTOOL_HOME/digests.json`` keyed by the
    resolved path, size and modification time, so later loads cost a ``stat`` instead of a full read.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    index_path = kvtool_home() / "digests.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    digest = "sha256:" + h.hexdigest()
    index[key] = digest
    tmp = index_path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    except OSError:  # a read-only home only costs us the cache
        tmp.unlink(missing_ok=True)
    return digest


def token_digest(ids: Any) -> str:
    """``sha256:<hex>`` of token ids (a torch tensor) as little-endian int64 bytes: identifies an exact text."""
    import torch

    return sha256_bytes(ids.to(torch.int64).cpu().numpy().astype("<i8").tobytes())
