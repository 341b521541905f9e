"""Triton kernels of the adaptive coder's slot statistics and symbols. Reference:
:func:`kvtool.codecs.slot_stats.slot_stats_reference` (same arguments, the same fp16 means and steps and the same
symbols, bit for bit).

The reference materialises float64 and int64 copies of every slot for its order-free sums (a 32K-token
Llama-3.1-8B prefix: ~30 passes over 8-byte tensors, most of an encode's GPU time). Here four passes read the
float32 slots in place (column peaks; int64 column sums of the scaled, rounded values; peaks and sums of the
deviations) and a fifth writes the symbols, component-major, as bytes; the per-column steps between the passes are
the reference's own torch operations on ``(G, C)`` tensors (:mod:`kvtool.codecs.slot_stats`).

Exactness: each value is one IEEE operation the reference also does (float32 subtraction, float64 products by a
power of two and squares of float32 values, which are exact, float32 division correctly rounded, integer sums);
rounding half to even is done with the ``2^52`` (float64) and ``2^23`` (float32) additions, exact for every
magnitude below them (and the values above are integers already); kernels are compiled without floating-point
contraction (``enable_fp_fusion=False``: no fused multiply-add whose single rounding would differ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtool.codecs.ecsq import MAX_K
from kvtool.codecs.slot_stats import SlotStats, slot_stats_by_passes

BLOCK_N = 32  #: tokens per tile
BLOCK_C = 64  #: channels per program


@triton.jit
def _rne64(y):
    # round half to even, float64: below 2^52 the addition leaves no fraction bits (hardware rounding: to even)
    a = tl.abs(y)
    r = tl.where(a < 4503599627370496.0, (a + 4503599627370496.0) - 4503599627370496.0, a)
    return tl.where(y < 0, -r, r)


@triton.jit
def _rne32(y):
    a = tl.abs(y)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    return tl.where(y < 0, -r, r)


@triton.jit
def _tile(x_ptr, g, t0, c, hd, n, C, s_g, s_h, s_t, BN: tl.constexpr):
    """The ``(BN, BC)`` tile of slot ``g`` at tokens ``t0 ..`` and channels ``c`` (head-major: ``c = h·hd + j``),
    and its mask."""
    t = t0 + tl.arange(0, BN).to(tl.int64)
    m = (t < n)[:, None] & (c < C)[None, :]
    col = (c // hd) * s_h + c % hd
    x = tl.load(x_ptr + g * s_g + t[:, None] * s_t + col[None, :], mask=m, other=0.0)
    return x, m, t


@triton.jit
def _peak_kernel(x_ptr, mu_ptr, out_ptr, n, C, hd, s_g, s_h, s_t,
                 CENTRED: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """Per column ``max |x|`` (``CENTRED``: ``max |x − μ|``), float32 ``(G, C)``."""
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
    if CENTRED:
        mu = tl.load(mu_ptr + g * C + c, mask=c < C, other=0.0)
    acc = tl.zeros([BC], dtype=tl.float32)
    for t0 in range(0, n, BN):
        x, m, _ = _tile(x_ptr, g, t0, c, hd, n, C, s_g, s_h, s_t, BN)
        if CENTRED:
            x = tl.where(m, x - mu[None, :], 0.0)
        acc = tl.maximum(acc, tl.max(tl.abs(x), axis=0))
    tl.store(out_ptr + g * C + c, acc, mask=c < C)


@triton.jit
def _sum_kernel(x_ptr, mu_ptr, scale_ptr, out_ptr, n, C, hd, s_g, s_h, s_t,
                SQUARED: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """Per column ``Σ round(v · 2^s)`` (int64) of ``v = x`` (float64) or, ``SQUARED``, ``v = (x − μ)²`` (the float32
    deviation squared in float64: exact); ``2^s`` from ``scale_ptr`` (float64 ``(G, C)``)."""
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
    scale = tl.load(scale_ptr + g * C + c, mask=c < C, other=1.0)
    if SQUARED:
        mu = tl.load(mu_ptr + g * C + c, mask=c < C, other=0.0)
    acc = tl.zeros([BC], dtype=tl.int64)
    for t0 in range(0, n, BN):
        x, m, _ = _tile(x_ptr, g, t0, c, hd, n, C, s_g, s_h, s_t, BN)
        if SQUARED:
            d = tl.where(m, x - mu[None, :], 0.0).to(tl.float64)
            v = d * d
        else:
            v = x.to(tl.float64)
        acc += tl.sum(_rne64(v * scale[None, :]).to(tl.int64), axis=0)
    tl.store(out_ptr + g * C + c, acc, mask=c < C)


@triton.jit
def _symbols_kernel(x_ptr, mu_ptr, step_ptr, out_ptr, n, C, hd, s_g, s_h, s_t,
                    KMAX: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """``round((x − μ) / Δ)`` clamped to ``±KMAX``, plus ``KMAX``, as uint8 at ``out[g, c · n + t]``."""
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
    mu = tl.load(mu_ptr + g * C + c, mask=c < C, other=0.0)
    step = tl.load(step_ptr + g * C + c, mask=c < C, other=1.0)
    for t0 in range(0, n, BN):
        x, m, t = _tile(x_ptr, g, t0, c, hd, n, C, s_g, s_h, s_t, BN)
        q = _rne32(tl.math.div_rn(x - mu[None, :], step[None, :]))
        s = tl.minimum(tl.maximum(q, -KMAX), KMAX) + KMAX
        tl.store(out_ptr + g * C * n + c[None, :] * n + t[:, None], s.to(tl.uint8), mask=m)


def slot_stats_triton(x: torch.Tensor, quality: float) -> SlotStats:
    """Triton twin of :func:`kvtool.codecs.slot_stats.slot_stats_reference` (``x`` ``(G, heads, n, head_dim)``
    float32, ``n ≥ 1``, on the GPU or interpreted)."""
    if x.dtype != torch.float32 or x.dim() != 4 or x.shape[2] < 1:
        raise ValueError("slots must be (G, heads, n >= 1, head_dim) float32")
    g, heads, n, hd = x.shape
    c = heads * hd
    if g == 0 or c == 0:
        empty = torch.zeros(g, c, dtype=torch.float16, device=x.device)
        return SlotStats(empty, empty.clone(), torch.zeros(g, 0, dtype=torch.uint8, device=x.device))
    x = x.contiguous()
    dims = (n, c, hd, x.stride(0), x.stride(1), x.stride(2))
    grid = (g, triton.cdiv(c, BLOCK_C))
    opts = {"BN": BLOCK_N, "BC": BLOCK_C, "enable_fp_fusion": False}

    def peaks(mu: torch.Tensor | None) -> torch.Tensor:
        out = torch.empty(g, c, dtype=torch.float32, device=x.device)
        _peak_kernel[grid](x, out if mu is None else mu, out, *dims, CENTRED=mu is not None, **opts)
        return out

    def sums(mu: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        out = torch.empty(g, c, dtype=torch.int64, device=x.device)
        _sum_kernel[grid](x, scale if mu is None else mu, scale, out, *dims, SQUARED=mu is not None, **opts)
        return out

    def symbols(mu: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        out = torch.empty(g, c * n, dtype=torch.uint8, device=x.device)
        _symbols_kernel[grid](x, mu, step, out, *dims, KMAX=float(MAX_K), **opts)
        return out

    return slot_stats_by_passes(n, quality, peaks, sums, symbols)
