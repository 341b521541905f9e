"""The ``kvtool`` serde for LMCache's L2 storage (``lmcache.v1.distributed.serde``, LMCache >= 0.5.6).

LMCache hands a serde one memory object per chunk: ``(2, L, T, D)`` post-RoPE K/V in the model dtype (its MP
server's layout, ``KV_2LTD``) and an ``ObjectKey`` without positions. Each object becomes one fixed-size
:mod:`kvtool.codecs.chunk_record` record (adaptive coding of the post-RoPE K/V, ``bits`` all-in bits per element,
self-describing, CRC-checked, bound to the key and the configured model). The size is fixed per shape because
LMCache sizes the buffer before it sees the data and its file store rejects a read of any other size.

Objects the codec does not code (several kernel groups, another layout or dtype) are stored raw in a checked frame
(:data:`RAW_MAGIC`), so the serde never fails a store for its shape. Every check that fails on load raises
``ValueError``; LMCache's ``AsyncSerdeProcessor`` turns that into a failed task, which its L2 wrapper reports as a
cache miss (the engine recomputes the chunk): a damaged or foreign record is never decoded into the cache.

Configuration (the ``"serde"`` object of an ``--l2-adapter`` JSON spec; every key optional):
``{"type": "kvtool", "bits": 2.0, "quality": 0.5, "model_path": "<model folder>", "model": "<id>",
"outlier_tokens": 2, "outlier_z": 9.0, "lane_symbols": 4096, "backend": "auto", "device": "auto", "max_workers": 1}``;
``model_path``: a local model folder (or kvtool alias) whose config gives the RoPE tables: keys are then rotated
back by their position within the chunk before coding (far fewer bits for the same error; records are bound to
those tables); ``calibration``: a kvtool PCA/SVD artifact of that model (``kvtool calibrate --method pca``), with
``model_path``: calibrated records, the codec's richest level that fits ``bits`` (records are bound to its
digest); ``device``: where chunks are coded (``auto``: the first GPU when there is one, else the CPU; the
objects themselves stay where LMCache keeps them).
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.serde.async_processor import AsyncSerdeProcessor
from lmcache.v1.distributed.serde.base import Deserializer, SerdeProcessor, Serializer
from lmcache.v1.distributed.serde.factory import get_registered_serde_types, register_serde_factory
from lmcache.v1.memory_management import MemoryObj

from kvtool.artifacts import one_line
from kvtool.codecs.chunk_record import (
    DTYPES,
    RecordCalibration,
    RecordSettings,
    RopeAt,
    RopeTables,
    binding,
    decode_record,
    encode_record,
    record_size,
)
from kvtool.errors import KvtoolError

SERDE_TYPE = "kvtool"
RAW_MAGIC = b"KVZW"
_RAW = struct.Struct("<4sQ16sI")  #: magic, payload bytes, binding, CRC-32 of the payload
_KWARGS = {"bits", "quality", "lane_symbols", "outlier_tokens", "outlier_z", "model", "model_path", "calibration",
           "backend",
           "device", "max_workers"}


@dataclass(frozen=True)
class RecordContext:
    """What both directions share: the model id, where and how chunks are coded, and the RoPE tables and
    calibration records are coded with, all bound into every record."""

    model: str = ""
    backend: str = "auto"
    device: torch.device = torch.device("cpu")
    rope: ModelRope | None = None
    calibration: RecordCalibration | None = None

    def binding(self, key: ObjectKey | None, coded: bool = True) -> bytes:
        """The 16-byte binding of the record of ``key`` (coded records also bind the tables and the artifact)."""
        rope = self.rope.digest if coded and self.rope else ""
        calibration = self.calibration.digest if coded and self.calibration else ""
        parts: tuple[object, ...] = ("kvtool-lmcache", self.model, rope, calibration)
        if key is not None:  # LMCache 0.5.0 passes no key
            parts += (key.model_name, key.kv_rank, key.object_group_id, key.cache_salt, bytes(key.chunk_hash))
        return binding(*parts)

    def rope_at(self, layers: int) -> RopeAt | None:
        return self.rope.at(layers) if self.rope else None


class ModelRope:
    """The RoPE of the model at ``path`` (its config only): its tables at any positions, and a digest of the config
    they come from."""

    def __init__(self, path: str):
        from kvtool.capture import rope_model
        from kvtool.models import load_config

        folder = Path(path).expanduser()
        if (folder / "config.json").is_file() or folder.name == "config.json":  # only the config is needed
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ValueError(f"kvtool serde: model_path: cannot read {folder}: {one_line(e)}") from None
        else:  # a kvtool alias, a .gguf or a hub id in the local cache
            _, config = load_config(path)
        self.config = config
        self.model = rope_model(config)
        self.layers = self.model.config.num_hidden_layers
        self.digest = hashlib.sha256(self.model.config.to_json_string(use_diff=False).encode()).hexdigest()
        self._lock = threading.Lock()

    def at(self, layers: int) -> RopeAt:
        """``positions → tables`` for an object of ``layers`` layers (``ValueError`` for another layer count)."""
        if layers != self.layers:
            raise ValueError(f"kvtool serde: model_path has {self.layers} layers, the object {layers}")

        def tables(positions: torch.Tensor) -> RopeTables:
            from kvtool.capture import rope_for_positions

            with self._lock:  # the serde's pool threads share one model
                return rope_for_positions(self.model, self.layers, positions)

        return tables


def _codable(shapes: list[torch.Size], dtypes: list[torch.dtype]) -> bool:
    return (len(shapes) == 1 and len(shapes[0]) == 4 and shapes[0][0] == 2 and min(shapes[0]) > 0
            and dtypes[0] in DTYPES.values())  # fmt: skip


def _raw_bytes(shapes: list[torch.Size], dtypes: list[torch.dtype]) -> int:
    return sum(s.numel() * d.itemsize for s, d in zip(shapes, dtypes, strict=True))


class KvtoolSerializer(Serializer):
    """Codes a KV memory object into a fixed-size kvtool chunk record (see the module docstring)."""

    def __init__(self, settings: RecordSettings, context: RecordContext):
        self.settings, self.context = settings, context

    def plan(self, shapes: list[torch.Size], dtypes: list[torch.dtype]) -> tuple[bool, int]:
        """Whether objects of this layout are coded (else stored raw), and their record size."""
        if _codable(shapes, dtypes):
            try:
                return True, record_size(shapes[0], self.settings, calibrated=self.context.calibration is not None)
            except ValueError:  # too few bits for this shape's side information: stored raw
                pass
        return False, _RAW.size + _raw_bytes(shapes, dtypes)

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        """The exact size of every record of this layout (LMCache 0.5.6 stores and reads exactly this many bytes)."""
        return self.plan(list(layout_desc.shapes), list(layout_desc.dtypes))[1]

    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> int:
        out = dst.raw_tensor
        coded, size = self.plan(list(src.get_shapes()), list(src.get_dtypes()))
        if out.numel() < size:
            raise ValueError(f"kvtool serde: the buffer holds {out.numel()} bytes, the record needs {size}")
        ctx = self.context
        if coded:
            kv = src.get_tensor(0).to(ctx.device, non_blocking=True)
            return encode_record(kv, self.settings, out, ctx.binding(key), ctx.backend, ctx.rope_at(kv.shape[1]),
                                 ctx.calibration)  # fmt: skip
        bound = ctx.binding(key, coded=False)
        payload = src.raw_tensor[: src.get_size()]
        crc = zlib.crc32(payload.numpy().data)
        out[: _RAW.size].copy_(torch.frombuffer(bytearray(_RAW.pack(RAW_MAGIC, src.get_size(), bound, crc)),
                                                dtype=torch.uint8))  # fmt: skip
        out[_RAW.size : _RAW.size + src.get_size()].copy_(payload)
        return size


class KvtoolDeserializer(Deserializer):
    """Decodes a kvtool record into the KV memory object, in place, on the object's device."""

    def __init__(self, context: RecordContext):
        self.context = context

    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> None:
        buf, ctx = src.raw_tensor, self.context
        if buf.numel() >= _RAW.size and bytes(buf[:4].tolist()) == RAW_MAGIC:
            bound = ctx.binding(key, coded=False)
            _, n, rec_bound, crc = _RAW.unpack(bytes(buf[: _RAW.size].tolist()))
            if n != dst.get_size() or _RAW.size + n > buf.numel():
                raise ValueError(f"kvtool serde: a raw record of {n} bytes for a {dst.get_size()}-byte object")
            if rec_bound != bound:
                raise ValueError("kvtool serde: the record belongs to another key or model")
            payload = buf[_RAW.size : _RAW.size + n]
            if zlib.crc32(payload.numpy().data) != crc:
                raise ValueError("kvtool serde: CRC mismatch (damaged record)")
            dst.raw_tensor[:n].copy_(payload)
            return
        if len(dst.get_shapes()) != 1 or len(dst.get_shapes()[0]) != 4:
            raise ValueError("kvtool serde: a coded record for an object that is not one (2, L, T, D) group")
        decode_record(buf, dst.get_tensor(0), ctx.binding(key), ctx.backend, ctx.device,
                      ctx.rope_at(dst.get_shapes()[0][1]), ctx.calibration)  # fmt: skip


def create_kvtool_serde(kwargs: dict[str, object]) -> SerdeProcessor:
    """LMCache's factory signature: the ``"serde"`` object's keys except ``"type"`` → an ``AsyncSerdeProcessor``
    (``ValueError`` naming the key for anything malformed: LMCache then refuses to start the adapter)."""
    unknown = set(kwargs) - _KWARGS
    if unknown:
        raise ValueError(f"kvtool serde: unknown option(s) {sorted(unknown)}; known: {sorted(_KWARGS)}")
    try:
        settings = RecordSettings(bits=float(_num(kwargs, "bits", 2.0)), quality=float(_num(kwargs, "quality", 0.5)),
                                  lane_symbols=int(_num(kwargs, "lane_symbols", 4096)),
                                  outlier_tokens=int(_num(kwargs, "outlier_tokens", 2)),
                                  outlier_z=float(_num(kwargs, "outlier_z", 9.0)))  # fmt: skip
    except ValueError as e:
        raise ValueError(f"kvtool serde: {e}") from None
    rope, calibration = None, None
    if kwargs.get("model_path"):
        try:
            rope = ModelRope(str(kwargs["model_path"]))
        except KvtoolError as e:
            raise ValueError(f"kvtool serde: model_path: {e}") from None
    if kwargs.get("calibration"):
        if rope is None:
            raise ValueError("kvtool serde: calibration needs model_path (calibrated records code pre-RoPE keys)")
        from kvtool.artifacts import read_artifact
        from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA

        try:
            calibration = RecordCalibration.of(read_artifact(str(kwargs["calibration"]),
                                                             expect_schema=CALIBRATION_SCHEMA))  # fmt: skip
        except KvtoolError as e:
            raise ValueError(f"kvtool serde: calibration: {e}") from None
        from kvtool.arch import arch_info

        if calibration.artifact.model.get("config_digest") != arch_info(rope.config).digest():
            raise ValueError("kvtool serde: the calibration artifact was made for another model than model_path's")
    model, backend = str(kwargs.get("model", "")), str(kwargs.get("backend", "auto"))
    if backend not in ("auto", "torch", "numba", "triton"):
        raise ValueError(f"kvtool serde: backend must be auto, torch, numba or triton (got {backend!r})")
    workers = int(_num(kwargs, "max_workers", 1))
    if workers < 1:
        raise ValueError("kvtool serde: max_workers must be >= 1")
    context = RecordContext(model, backend, _device(str(kwargs.get("device", "auto"))), rope, calibration)
    return AsyncSerdeProcessor(KvtoolSerializer(settings, context), KvtoolDeserializer(context), max_workers=workers)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or (name.startswith("cuda") and torch.cuda.is_available()):
        try:
            return torch.device(name)
        except RuntimeError:
            pass
    raise ValueError(f"kvtool serde: device must be auto, cpu or an available cuda device (got {name!r})")


def _num(kwargs: dict[str, object], name: str, default: float) -> Any:
    value = kwargs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"kvtool serde: {name} must be a number (got {value!r})")
    return value


def register() -> None:
    """Register ``kvtool`` with LMCache's serde factory (once per process)."""
    if SERDE_TYPE not in get_registered_serde_types():
        register_serde_factory(SERDE_TYPE, create_kvtool_serde)
