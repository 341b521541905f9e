"""Kernels of the codec's hot path, each with its torch reference beside it (same signature, same bytes), behind
one backend switch: ``auto`` (Triton on CUDA tensors when Triton is importable; otherwise numba, on the CPU, when
numba is importable; else torch), ``torch``, ``triton`` (GPU) or ``numba`` (CPU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kvtool.codecs import rans
from kvtool.errors import UsageError

if TYPE_CHECKING:
    from kvtool.codecs.slot_stats import SlotStats

BACKENDS = ("auto", "torch", "triton", "numba")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _numba_problem() -> str | None:
    """Why :mod:`kvtool.kernels.rans_numba` cannot be used (one line), or ``None`` when it can."""
    try:
        from kvtool.kernels import rans_numba  # noqa: F401
    except Exception as e:  # a broken numba (e.g. too new a NumPy) must not break the CLI
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def pick_backend(backend: str, device: torch.device) -> str:
    """``torch``, ``triton`` or ``numba`` for ``backend`` on ``device`` (``TRITON_INTERPRET=1`` lets Triton run on
    CPU). numba always runs on the CPU, whatever ``device``."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)} (got '{backend}')")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "numba" if _numba_problem() is None else "torch"
    if backend == "triton" and not _triton_available():
        raise UsageError("--backend triton: triton is not installed")
    if backend == "triton" and device.type != "cuda" and not interpret:
        raise UsageError("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    if backend == "numba" and (problem := _numba_problem()) is not None:
        raise UsageError(f"--backend numba: numba is not usable ({problem}); pip install 'numba>=0.60'")
    return backend


def rans_encode(*args: Any, backend: str = "auto", **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvtool.codecs.rans.encode_reference` or its Triton or numba twin."""
    return _dispatch("encode", args[0].device, backend)(*args, **kwargs)


def rans_decode(*args: Any, backend: str = "auto", **kwargs: Any) -> torch.Tensor:
    """:func:`kvtool.codecs.rans.decode_reference` or its Triton or numba twin."""
    return _dispatch("decode", args[0].device, backend)(*args, **kwargs)


def symbol_counts(symbols: torch.Tensor, alphabet: int, backend: str = "auto") -> torch.Tensor:
    """:func:`kvtool.codecs.rans.symbol_counts_reference` or its Triton twin (numba: the reference). Exact integers
    either way, so CPU tensors under a ``triton`` coder (not interpreted) are counted by the reference."""
    runnable = symbols.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend in ("auto", "triton") and runnable and pick_backend(backend, symbols.device) == "triton":
        from kvtool.kernels.histogram_triton import symbol_counts_triton

        return symbol_counts_triton(symbols, alphabet)
    return rans.symbol_counts_reference(symbols, alphabet)


def slot_stats(x: torch.Tensor, quality: float, backend: str = "auto") -> SlotStats:
    """:func:`kvtool.codecs.slot_stats.slot_stats_reference` or its Triton (GPU) or numba (CPU) twin; the same
    values either way, so CPU tensors under a ``triton`` coder (not interpreted) take the reference."""
    runnable = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend in ("auto", "triton") and runnable and pick_backend(backend, x.device) == "triton":
        from kvtool.kernels.stats_triton import slot_stats_triton

        return slot_stats_triton(x, quality)
    if backend in ("auto", "numba") and not x.is_cuda and pick_backend(backend, x.device) == "numba":
        from kvtool.kernels.stats_numba import slot_stats_numba

        return slot_stats_numba(x, quality)
    from kvtool.codecs.slot_stats import slot_stats_reference

    return slot_stats_reference(x, quality)


def _dispatch(op: str, device: torch.device, backend: str) -> Callable[..., Any]:
    use = pick_backend(backend, device)
    if use == "torch":
        return rans.encode_reference if op == "encode" else rans.decode_reference
    if use == "numba":
        from kvtool.kernels import rans_numba

        return rans_numba.encode_numba if op == "encode" else rans_numba.decode_numba
    from kvtool.kernels import rans_triton

    return rans_triton.encode_triton if op == "encode" else rans_triton.decode_triton
