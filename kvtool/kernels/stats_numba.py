"""Numba (CPU) twin of the adaptive coder's slot statistics and symbols. Reference:
:func:`kvtool.codecs.slot_stats.slot_stats_reference` (the same fp16 means and steps and the same symbols, bit for
bit); the same passes as :mod:`kvtool.kernels.stats_triton`, with the per-column steps between them done by the
same torch operations (:mod:`kvtool.codecs.slot_stats`).

The reference's float64 and int64 temporaries (~30 passes over 8-byte copies of every slot) were most of a CPU
encode (a SmolLM2 chunk record: ~0.26 s of 0.21–0.3 s); here each pass is one compiled loop over the float32 slots,
the ``(G, heads)`` blocks spread over the threads. Exactness: float32 subtraction and division, float64 products
by a power of two and squares of float32 values (exact), ``np.rint`` (round half to even, as ``torch.round``),
integer sums; numba compiles without fast-math, so nothing is contracted or reassociated.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from kvtool.codecs.ecsq import MAX_K
from kvtool.codecs.slot_stats import SlotStats, slot_stats_by_passes
from kvtool.kernels.rans_numba import _jit, _set_threads

_KMAX = np.float32(MAX_K)


@_jit(parallel=True)
def _peaks(x, mu, centred, out):  # pragma: no cover - compiled
    """``out[g, h·hd + j] = max_t |x[g, h, t, j] (− mu[g, h·hd + j])|``."""
    g_n, h_n, t_n, d_n = x.shape
    for gh in numba.prange(g_n * h_n):
        g, h = gh // h_n, gh % h_n
        acc = np.zeros(d_n, np.float32)
        for t in range(t_n):
            for j in range(d_n):
                v = x[g, h, t, j]
                if centred:
                    v = v - mu[g, h * d_n + j]
                acc[j] = max(acc[j], abs(v))
        for j in range(d_n):
            out[g, h * d_n + j] = acc[j]


@_jit(parallel=True)
def _sums(x, mu, scale, squared, out):  # pragma: no cover - compiled
    """``out[g, c] = Σ_t rint(v · scale[g, c])`` (int64) of ``v = x`` in float64, or ``(x − mu)²`` (float32
    deviation, squared in float64: exact)."""
    g_n, h_n, t_n, d_n = x.shape
    for gh in numba.prange(g_n * h_n):
        g, h = gh // h_n, gh % h_n
        acc = np.zeros(d_n, np.int64)
        for t in range(t_n):
            for j in range(d_n):
                c = h * d_n + j
                if squared:
                    d = np.float64(x[g, h, t, j] - mu[g, c])
                    v = d * d
                else:
                    v = np.float64(x[g, h, t, j])
                acc[j] += np.int64(np.rint(v * scale[g, c]))
        for j in range(d_n):
            out[g, h * d_n + j] = acc[j]


@_jit(parallel=True)
def _symbols(x, mu, step, out):  # pragma: no cover - compiled
    """``out[g, c · n + t] = clamp(rint((x − mu) / step), ±MAX_K) + MAX_K`` (uint8)."""
    g_n, h_n, t_n, d_n = x.shape
    for gh in numba.prange(g_n * h_n):
        g, h = gh // h_n, gh % h_n
        for t in range(t_n):
            for j in range(d_n):
                c = h * d_n + j
                q = np.rint((x[g, h, t, j] - mu[g, c]) / step[g, c])
                q = min(max(q, -_KMAX), _KMAX) + _KMAX
                out[g, c * t_n + t] = np.uint8(q)


def slot_stats_numba(x: torch.Tensor, quality: float) -> SlotStats:
    """Numba twin of :func:`kvtool.codecs.slot_stats.slot_stats_reference` (``x`` ``(G, heads, n, head_dim)``
    float32, ``n ≥ 1``; CPU tensors, others are copied)."""
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[2] < 1:
        raise ValueError("slots must be (G, heads, n >= 1, head_dim) float32")
    g, heads, n, hd = x.shape
    c = heads * hd
    xs = x.detach().cpu().contiguous().numpy()
    _set_threads()

    def peaks(mu: torch.Tensor | None) -> torch.Tensor:
        out = np.empty((g, c), np.float32)
        _peaks(xs, out if mu is None else mu.numpy(), mu is not None, out)
        return torch.from_numpy(out)

    def sums(mu: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        out = np.empty((g, c), np.int64)
        _sums(xs, np.zeros((g, c), np.float32) if mu is None else mu.numpy(), scale.numpy(), mu is not None, out)
        return torch.from_numpy(out)

    def symbols(mu: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        out = np.empty((g, c * n), np.uint8)
        _symbols(xs, mu.numpy(), step.numpy(), out)
        return torch.from_numpy(out)

    stats = slot_stats_by_passes(n, quality, peaks, sums, symbols)
    return SlotStats(*(t.to(x.device) for t in stats))
