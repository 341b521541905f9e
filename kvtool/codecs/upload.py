"""Small host tensors to the device without stalling the host.

A copy from pageable host memory makes the host wait for the device's queue (CUDA stages it synchronously), so
once the decode kernels are queued every such copy of a few index entries waited for them: the host's remaining
work (the CRC plan, the raw tokens) then ran after the GPU had finished instead of beside it. From pinned memory
(PyTorch's caching host allocator, which keeps the block until the copy is done) the copy is queued and returns.
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: from host memory to a CUDA device queued asynchronously from pinned memory; anything
    else as ``t.to(device)``."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
