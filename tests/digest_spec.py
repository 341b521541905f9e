"""The content digest as docs/artifacts.md spells it out, recomputed from a file's raw bytes with hashlib and json
alone (no kvtool code), for the tests that hold kvtool's digest to its documented definition."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def documented_digest(data: bytes, tensor_hashed: bool = False) -> tuple[dict[str, Any], str, str]:
    """``(kvtool JSON, its recorded content_digest, the digest recomputed)`` of the artifact file ``data``;
    ``tensor_hashed``: each tensor's bytes enter as their SHA-256 (the tensor-hashed form)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    kv = json.loads(header.pop("__metadata__")["kvtool"])
    expected = kv.pop("content_digest")
    h = hashlib.sha256(json.dumps(kv, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    for name in sorted(header):
        info = header[name]
        begin, end = info["data_offsets"]
        h.update(name.encode() + b"\0" + info["dtype"].encode() + b"\0")
        h.update(json.dumps(info["shape"], separators=(",", ":")).encode() + b"\0")
        raw = data[8 + n + begin : 8 + n + end]
        h.update(hashlib.sha256(raw).digest() if tensor_hashed else raw)
    return kv, expected, "sha256:" + h.hexdigest()
