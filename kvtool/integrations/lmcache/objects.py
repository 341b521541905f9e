"""LMCache memory objects and serde tasks outside LMCache's server: what a test, a benchmark or an example needs to
drive a serde exactly as LMCache's L2 wrapper does (``serde_wrapper.py``: buffers sized by the serde's estimate,
tasks submitted in batches, completion signalled on an eventfd, each result returned once)."""

from __future__ import annotations

import select
from typing import Any

import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase
from lmcache.v1.distributed.serde import SerdeProcessor, create_serde_processor, serialized_layout_desc
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj
from lmcache.v1.platform import consume_fd


def memory_obj(shape: torch.Size, dtype: torch.dtype, fmt: MemoryFormat = MemoryFormat.KV_2LTD,
               pin: bool = False) -> TensorMemoryObj:  # fmt: skip
    """A zeroed single-group ``TensorMemoryObj`` (pinned host memory with ``pin``, as LMCache's L1 allocates)."""
    nbytes = shape.numel() * dtype.itemsize
    raw = torch.zeros(nbytes, dtype=torch.uint8)
    meta = MemoryObjMetadata(shape=shape, dtype=dtype, address=0, phy_size=nbytes, ref_count=1, fmt=fmt,
                             shapes=[shape], dtypes=[dtype])  # fmt: skip
    return TensorMemoryObj(raw.pin_memory() if pin else raw, meta, parent_allocator=None)


def serde_from_spec(serde: dict[str, Any]) -> SerdeProcessor:
    """The serde of an L2 adapter spec's ``"serde"`` object, built as LMCache builds it (``_parse_serde_config`` →
    ``create_serde_processor``)."""
    spec = {"type": "fs", "base_path": "/nonexistent", "serde": serde}
    return create_serde_processor(L2AdapterConfigBase._parse_serde_config(spec))


def _wait(fd: int, query: Any, task: int, timeout_s: float = 600.0) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _ in range(int(timeout_s * 10)):
        if poller.poll(100):
            consume_fd(fd)
        if (result := query(task)) is not None:
            return bool(result)
    raise TimeoutError("serde task did not finish")


def store(proc: SerdeProcessor, srcs: list[TensorMemoryObj], keys: list[ObjectKey],
          pin: bool = False) -> tuple[bool, list[TensorMemoryObj]]:  # fmt: skip
    """Serialize ``srcs`` (one layout) in one task: ``(succeeded, byte buffers as LMCache would store them)``."""
    layout = serialized_layout_desc(MemoryLayoutDesc([srcs[0].get_shape()], [srcs[0].get_dtype()]), proc)
    bufs = [memory_obj(layout.shapes[0], torch.uint8, MemoryFormat.BINARY_BUFFER, pin) for _ in srcs]
    task = proc.submit_serialize(srcs, bufs, keys)
    return _wait(proc.get_serialize_event_fd(), proc.query_serialize_result, task), bufs


def load(proc: SerdeProcessor, bufs: list[TensorMemoryObj], dsts: list[TensorMemoryObj],
         keys: list[ObjectKey]) -> bool:  # fmt: skip
    """Deserialize ``bufs`` into ``dsts`` in one task; False is LMCache's failed task (a cache miss)."""
    task = proc.submit_deserialize(bufs, dsts, keys)
    return _wait(proc.get_deserialize_event_fd(), proc.query_deserialize_result, task)
