"""GPU kernels (Triton) of the codec's hot path, each with its torch reference beside it (same signature, same
bytes), behind one backend switch: ``auto`` (Triton on CUDA tensors when Triton is importable, else torch),
``torch`` or ``triton``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from kvtool.codecs import rans
from kvtool.errors import UsageError

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_backend(backend: str, device: torch.device) -> str:
    """``torch`` or ``triton`` for ``backend`` on ``device`` (``TRITON_INTERPRET=1`` lets Triton run on CPU)."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)} (got '{backend}')")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        return "triton" if (device.type == "cuda" and _triton_available()) else "torch"
    if backend == "triton" and not _triton_available():
        raise UsageError("--backend triton: triton is not installed")
    if backend == "triton" and device.type != "cuda" and not interpret:
        raise UsageError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    return backend


def rans_encode(*args: Any, backend: str = "auto", **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvtool.codecs.rans.encode_reference` or its Triton twin."""
    return _dispatch("encode", args[0].device, backend)(*args, **kwargs)


def rans_decode(*args: Any, backend: str = "auto", **kwargs: Any) -> torch.Tensor:
    """:func:`kvtool.codecs.rans.decode_reference` or its Triton twin."""
    return _dispatch("decode", args[0].device, backend)(*args, **kwargs)


def _dispatch(op: str, device: torch.device, backend: str) -> Callable[..., Any]:
    if pick_backend(backend, device) == "torch":
        return rans.encode_reference if op == "encode" else rans.decode_reference
    from kvtool.kernels import rans_triton

    return rans_triton.encode_triton if op == "encode" else rans_triton.decode_triton
