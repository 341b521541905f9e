"""Pinned host memory for the device pipelines: one grow-only buffer per thread and purpose, reused.

Pinning hundreds of megabytes costs more than the transfer it speeds up, so an engine keeps its staging memory;
so does kvtool. Per thread, so that two threads decoding (or encoding) at once never share a buffer.
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()


def staging_buffer(size: int, pin: bool, purpose: str = "read") -> torch.Tensor:
    """A host uint8 buffer of ``size`` bytes. ``pin``: this thread's pinned buffer for ``purpose`` (kept and
    reused, grown when too small: valid until this thread asks for the same purpose again); otherwise a fresh
    pageable one."""
    if not pin:
        return torch.empty(size, dtype=torch.uint8)
    held = _LOCAL.__dict__.setdefault("buffers", {})
    buf = held.get(purpose)
    if buf is None or buf.numel() < size:
        buf = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=True)
        held[purpose] = buf
    return buf[:size]
