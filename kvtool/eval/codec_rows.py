"""Codec rows for ``kvtool bench``: a prefix cache goes through a real ``.kvz`` file (or a peer codec) and comes
back as the cache the continuation is scored on; bytes and CPU times are measured on the way.

Names (``--configs``): ``kvz:lossless``, ``kvz:q<Q>`` (adaptive, step Q·σ), ``kvz:<artifact>@<bits>`` or
``kvz:<artifact>@L<n>`` (calibrated level), ``lmcache-kvtool@<bits>`` (the cache cut into 256-token chunks of
post-RoPE K/V, each a fixed-size :mod:`kvtool.codecs.chunk_record` record: what kvtool's LMCache serde stores with
the model's RoPE tables; ``lmcache-kvtool-plain@<bits>``: without them),
``zstd-fp16`` (the fp16 cache, byte planes + zstandard), ``cachegen`` (LMCache 0.5.6's CacheGen codec on the CPU,
:mod:`kvtool.eval.cachegen_peer`; skipped when not installed), ``lmcache-fp8`` (LMCache 0.5.6's built-in ``fp8``
serde: every element cast to ``float8_e4m3fn`` and back, 1 byte per element, no scale).
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
from kvtool.capture import rope_for_positions
from kvtool.codecs.chunk_record import (
    RecordCalibration,
    RecordSettings,
    cache_layout,
    decode_record,
    encode_record,
    engine_layout,
    record_size,
)
from kvtool.codecs.kvz import CodecSettings, KvzFile, decode_kvz, encode_cache, pick_level
from kvtool.errors import UsageError
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


@dataclass
class RecordRow(CodecRow):
    """kvtool's LMCache serde format on the same prefix cache: chunks of ``chunk_tokens`` positions as the engine
    holds them (post-RoPE keys, no positions), each a fixed-size record of ``record.bits`` per element."""

    record: RecordSettings = field(default_factory=RecordSettings)
    rope: bool = True  #: with the model's RoPE tables (the serde's ``model_path``)
    record_calibration: RecordCalibration | None = None  #: calibrated records (the serde's ``calibration``)

    def code_cache(self, cache: Any, ids: torch.Tensor) -> Any:
        lengths = {layer.keys.shape[-2] for layer in cache.layers}
        if len(lengths) != 1:
            raise UsageError(f"'{self.name}': chunk records need every layer to hold the whole prefix (a sliding "
                             "window shorter than the prefix gives layers of different lengths)")  # fmt: skip
        dtype, device = cache.layers[0].keys.dtype, cache.layers[0].keys.device
        heads, n_layers = cache.layers[0].keys.shape[1], len(cache.layers)
        kv = engine_layout(cache)  # (2, L, T, D): LMCache's layout
        t = kv.shape[2]
        out = torch.empty_like(kv)
        step = self.settings.chunk_tokens
        rope_at = (lambda pos: rope_for_positions(self.lm.model, n_layers, pos)) if self.rope else None
        for a in range(0, t, step):
            chunk = kv[:, :, a : a + step].contiguous()
            try:
                size = record_size(chunk.shape, self.record, calibrated=self.record_calibration is not None)
                buf = torch.empty(size, dtype=torch.uint8)
            except ValueError:  # a short last chunk whose side information exceeds the bits: stored raw, as the serde
                self.bytes += chunk.numel() * chunk.element_size()
                out[:, :, a : a + step] = chunk
                continue
            t0 = time.perf_counter()
            self.bytes += encode_record(chunk, self.record, buf, rope_at=rope_at, calibration=self.record_calibration)
            t1 = time.perf_counter()
            piece = torch.empty_like(chunk)
            decode_record(buf, piece, rope_at=rope_at, calibration=self.record_calibration)
            self.encode_s += t1 - t0
            self.decode_s += time.perf_counter() - t1
            out[:, :, a : a + step] = piece
        self.elements += kv.numel()
        self.prefixes.append(int(ids.numel()))
        return restore_cache(self.lm.model, cache_layout(out, heads), int(ids.numel()), device, dtype)


@dataclass
class Fp8CastRow(CodecRow):
    """LMCache's ``fp8`` serde (``lmcache/v1/distributed/serde/fp8.py``): ``tensor.to(float8_e4m3fn)`` on store,
    ``.to(dtype)`` on load, one byte per element, no scale."""

    def code_cache(self, cache: Any, ids: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        coded = [(layer.keys.to(torch.float8_e4m3fn), layer.values.to(torch.float8_e4m3fn)) for layer in cache.layers]
        t1 = time.perf_counter()
        dtype, device = cache.layers[0].keys.dtype, cache.layers[0].keys.device
        kv = [(k.to(dtype), v.to(dtype)) for k, v in coded]
        self.encode_s += t1 - t0
        self.decode_s += time.perf_counter() - t1
        n = sum(k.numel() + v.numel() for k, v in coded)
        self.bytes += n
        self.elements += n
        self.prefixes.append(int(ids.numel()))
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
        if name == "lmcache-fp8":
            return Fp8CastRow(name, lm, CodecSettings(mode="lossless"))
        return CodecRow(name, lm, CodecSettings(mode="lossless"), cast_fp16=True)
    if entry.kind != "codec":
        return None
    if entry.codec == "lossless":
        return CodecRow(name, lm, CodecSettings(mode="lossless"))
    if entry.codec == "adaptive":
        return CodecRow(name, lm, CodecSettings(mode="adaptive", quality=entry.quality))
    if entry.codec == "record":
        try:
            extra = {k: v for k, v in (("outlier_tokens", entry.outlier_tokens), ("outlier_z", entry.outlier_z))
                     if v is not None}  # fmt: skip
            record = RecordSettings(bits=float(entry.bits or 0.0), **extra)
        except ValueError as e:
            raise UsageError(f"'{name}': {e}") from None
        cal = None
        if entry.path:
            cal = RecordCalibration.of(read_artifact(entry.path, expect_schema=CALIBRATION_SCHEMA,
                                                     model=lm.fingerprint))  # fmt: skip
        return RecordRow(name, lm, CodecSettings(mode="adaptive"), record=record, rope=entry.rope,
                         record_calibration=cal)  # fmt: skip
    art = read_artifact(entry.path, expect_schema=CALIBRATION_SCHEMA, model=lm.fingerprint)
    budget = entry.budget
    index = budget.level if budget.level is not None else pick_level(art, budget.bits)
    return CodecRow(name, lm, CodecSettings(mode="calibrated", level=index), calibration=art)
