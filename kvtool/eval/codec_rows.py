"""Codec rows for ``kvtool bench``: a prefix cache goes through a real ``.kvz`` file (or a peer codec) and comes
back as the cache the continuation is scored on; bytes and CPU times are measured on the way.

Names (``--configs``): ``kvz:lossless``, ``kvz:q<Q>`` (adaptive, step Q·σ), ``kvz:<artifact>@<bits>`` or
``kvz:<artifact>@L<n>`` (calibrated level), ``zstd-fp16`` (the fp16 cache, byte planes + zstandard), ``cachegen``
(LMCache 0.5.6's CacheGen codec on the CPU, :mod:`kvtool.eval.cachegen_peer`; skipped when not installed).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtool.artifacts import Artifact, read_artifact
from kvtool.cache_restore import restore_cache
from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA
from kvtool.codecs.kvz import CodecSettings, KvzFile, decode_kvz, encode_cache, pick_level
from kvtool.eval.configs import parse_config


@dataclass
class CodecRow:
    """A codec under test; :meth:`code_cache` is called once per continuation prefix."""

    name: str
    lm: Any
    settings: CodecSettings
    calibration: Artifact | None = None
    cast_fp16: bool = False  #: code the cache rounded to fp16 (the ``zstd-fp16`` peer)
    bytes: int = 0
    elements: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    prefixes: list[int] = field(default_factory=list)

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.bytes / max(self.elements, 1)

    def code_cache(self, cache: Any, ids: torch.Tensor) -> Any:
        """Encode ``cache`` (after ``ids``) to a temporary ``.kvz``, decode it, and return the decoded cache."""
        model = self.lm.model
        if self.cast_fp16:
            for layer in cache.layers:
                layer.keys, layer.values = (t.half().to(t.dtype) for t in (layer.keys, layer.values))
        dtype, device = cache.layers[0].keys.dtype, cache.layers[0].keys.device
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.kvz"
            t0 = time.perf_counter()
            encode_cache(self.lm, ids, cache, self.settings, path, self.calibration)
            t1 = time.perf_counter()
            layers = decode_kvz(KvzFile(path), model, self.calibration, device=device, dtype=dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            self.bytes += path.stat().st_size
        self.encode_s += t1 - t0
        self.decode_s += t2 - t1
        self.elements += sum(d.values.numel() * 2 for d in layers)
        self.prefixes.append(int(ids.numel()))
        return restore_cache(model, [(d.keys, d.values) for d in layers], int(ids.numel()), device, dtype)

    def speeds(self) -> dict[str, float]:
        """fp16-equivalent MB/s of encode and decode (2 bytes per element)."""
        mb = 2.0 * self.elements / 1e6
        return {"encode_mb_s": mb / max(self.encode_s, 1e-9), "decode_mb_s": mb / max(self.decode_s, 1e-9)}


@dataclass
class CacheGenRow(CodecRow):
    """LMCache's CacheGen on the same prefix cache (post-RoPE keys, as LMCache stores them)."""

    def code_cache(self, cache: Any, ids: torch.Tensor) -> Any:
        from kvtool.eval.cachegen_peer import cachegen_roundtrip

        keys = [layer.keys[0].float().cpu() for layer in cache.layers]
        values = [layer.values[0].float().cpu() for layer in cache.layers]
        r = cachegen_roundtrip(keys, values, chunk_tokens=self.settings.chunk_tokens)
        self.bytes += r["bytes"]
        self.encode_s += r["encode_s"]
        self.decode_s += r["decode_s"]
        self.elements += sum(k.numel() + v.numel() for k, v in zip(keys, values, strict=True))
        self.prefixes.append(int(ids.numel()))
        dtype, device = cache.layers[0].keys.dtype, cache.layers[0].keys.device
        kv = [(k[None], v[None]) for k, v in zip(r["keys"], r["values"], strict=True)]
        return restore_cache(self.lm.model, kv, int(ids.numel()), device, dtype)


def unavailable(name: str) -> str | None:
    """Why the codec row ``name`` cannot run here (a peer that is not installed), or ``None``."""
    if name != "cachegen":
        return None
    from kvtool.eval.cachegen_peer import cachegen_available

    ok, why = cachegen_available()
    return None if ok else why


def codec_row(name: str, lm: Any) -> CodecRow | None:
    """The :class:`CodecRow` a ``--configs`` entry names (:func:`kvtool.eval.configs.parse_config`), or ``None``
    when it is not a codec."""
    entry = parse_config(name)
    if entry.kind == "peer":
        if name == "cachegen":
            return CacheGenRow(name, lm, CodecSettings(mode="lossless"))
        return CodecRow(name, lm, CodecSettings(mode="lossless"), cast_fp16=True)
    if entry.kind != "codec":
        return None
    if entry.codec == "lossless":
        return CodecRow(name, lm, CodecSettings(mode="lossless"))
    if entry.codec == "adaptive":
        return CodecRow(name, lm, CodecSettings(mode="adaptive", quality=entry.quality))
    art = read_artifact(entry.path, expect_schema=CALIBRATION_SCHEMA, model=lm.fingerprint)
    budget = entry.budget
    index = budget.level if budget.level is not None else pick_level(art, budget.bits)
    return CodecRow(name, lm, CodecSettings(mode="calibrated", level=index), calibration=art)
