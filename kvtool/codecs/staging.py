"""Pinned host memory for the device pipelines: one grow-only buffer per thread, reused.

Pinning hundreds of megabytes costs more than the transfer it speeds up, so an engine keeps its staging memory;
so does kvtool. Per thread, so that two threads decoding at once never share a buffer.
"""

from __future__ import annotations

import threading

import torch

_LOCAL = threading.local()


def staging_buffer(size: int, pin: bool) -> torch.Tensor:
    """A host uint8 buffer of ``size`` bytes. ``pin``: this thread's pinned buffer (kept and reused, grown when too
    small: valid until this thread asks again); otherwise a fresh pageable one."""
    if not pin:
        return torch.empty(size, dtype=torch.uint8)
    buf = getattr(_LOCAL, "pinned", None)
    if buf is None or buf.numel() < size:
        buf = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=True)
        _LOCAL.pinned = buf
    return buf[:size]
