"""Edit a ``.kvz`` file the way a hostile or buggy writer would, then re-seal its checksums (or not).

:class:`KvzEdit` holds a file as its safetensors header (tensor entries), its kvtool JSON and its data bytes;
tests change any of them and :meth:`KvzEdit.to_bytes` writes the file back with the chosen checksums recomputed
in the order a writer computes them: chunk CRC-32s, then the metadata digest, then the content digest. A case
that recomputes all three is a self-consistent file: only semantic checks can refuse it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from kvtool.artifacts import content_digest, torch_dtype
from kvtool.codecs.container import crc_seed, meta_digest, tensors_crc
from kvtool.digests import canonical_json

SEALS = ("stale", "crc", "meta", "content", "all")


class KvzEdit:
    """A parsed ``.kvz`` (or any kvtool artifact) open for editing."""

    def __init__(self, data: bytes):
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        self.meta: dict[str, Any] = json.loads(header.pop("__metadata__")["kvtool"])
        self.entries: dict[str, dict[str, Any]] = header
        self.data = bytearray(data[8 + n :])

    @classmethod
    def read(cls, path: Path) -> KvzEdit:
        return cls(Path(path).read_bytes())

    def copy(self) -> KvzEdit:
        return copy.deepcopy(self)

    def raw(self, name: str) -> bytearray:
        begin, end = self.entries[name]["data_offsets"]
        return self.data[begin:end]

    def set_raw(self, name: str, payload: bytes) -> None:
        """Replace a tensor's bytes (any length: later offsets shift, the entry's shape follows for 1-D)."""
        begin, end = self.entries[name]["data_offsets"]
        self.data[begin:end] = payload
        delta = len(payload) - (end - begin)
        for info in self.entries.values():
            b, e = info["data_offsets"]
            if b >= end and info is not self.entries[name]:
                info["data_offsets"] = [b + delta, e + delta]
        self.entries[name]["data_offsets"] = [begin, begin + len(payload)]
        if len(self.entries[name]["shape"]) == 1:
            size = torch.empty(0, dtype=torch_dtype(self.entries[name]["dtype"])).element_size()
            self.entries[name]["shape"] = [len(payload) // size]

    def tensor(self, name: str) -> torch.Tensor:
        info = self.entries[name]
        raw = bytes(self.raw(name))
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        return t.view(torch_dtype(info["dtype"])).reshape(info["shape"])

    def _chunk_tensors(self, index: int) -> dict[str, torch.Tensor]:
        prefix = f"chunk.{index:06d}."
        return {n: self.tensor(n) for n in self.entries if n.startswith(prefix)}

    def to_bytes(self, seal: str = "all") -> bytes:
        """The file, with ``seal`` deciding what is recomputed: ``stale`` nothing, ``crc`` the chunk CRCs, ``meta``
        the metadata digest, ``content`` the content digest, ``all`` every one of them."""
        meta = copy.deepcopy(self.meta)
        extra = meta.get("extra")
        if seal in ("crc", "all") and isinstance(extra, dict) and isinstance(extra.get("chunks"), list):
            try:
                seed = crc_seed(meta)
            except (KeyError, TypeError, ValueError):  # metadata too broken to seed from: leave the CRCs
                seed = None
            for c in extra["chunks"] if seed is not None else []:
                if isinstance(c, dict) and isinstance(c.get("index"), int):
                    c["crc32"] = tensors_crc(self._chunk_tensors(c["index"]), seed)
        if seal in ("meta", "all") and isinstance(extra, dict):
            extra["meta_digest"] = meta_digest(meta.get("schema"), meta.get("schema_version"), meta.get("model"),
                                                meta.get("inputs"), meta.get("method"), extra)  # fmt: skip
        if seal in ("content", "all"):
            meta["content_digest"] = content_digest(meta, self.entries, memoryview(bytes(self.data)))
        header = {"__metadata__": {"format": "pt", "kvtool": canonical_json(meta)}, **self.entries}
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        return len(head).to_bytes(8, "little") + head + bytes(self.data)
