"""The adaptive coder's per-slot statistics and symbols, defined once: per channel an order-free mean and standard
deviation, the step, and the symbols (:class:`kvtool.codecs.coding.AdaptiveCoder`).

A slot is one chunk's keys or values of one layer: ``(heads, n, head_dim)`` float32, i.e. ``n`` tokens of
``C = heads · head_dim`` channels. Per channel: the mean ``μ`` (fp16), the step ``Δ = max(quality · σ, peak /
(MAX_K − ½))`` (fp16; never clipping: the channel's farthest value from ``μ`` stays within ``MAX_K`` steps) and per
token the symbol ``round((x − μ) / Δ) + MAX_K`` (uint8), laid out component-major (all tokens of channel 0, then
channel 1, ...).

Every reduction here is order-free (:func:`order_free_mean`, ``amax``), so the statistics, hence the file's bytes,
are the same on every device, thread count and batch. :func:`slot_stats_reference` is the definition;
:func:`kvtool.kernels.stats_triton.slot_stats_triton` and :func:`kvtool.kernels.stats_numba.slot_stats_numba`
compute the same values in a few passes over the slots without the float64 and int64 intermediates; both are
driven by :func:`slot_stats_by_passes`, whose per-column steps between the passes are the torch operations here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from kvtool.codecs.ecsq import MAX_K, quantize

STEP_FLOOR = 6e-8  #: smallest step (the least positive fp16 is 5.96e-8): a constant channel still has a step


class SlotStats(NamedTuple):
    """Per slot: ``mean`` and ``step`` ``(G, C)`` fp16 and ``symbols`` ``(G, C · n)`` uint8, component-major."""

    mean: torch.Tensor
    step: torch.Tensor
    symbols: torch.Tensor


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2**e`` as float64, exactly, for integer ``e`` (int64) in [-1022, 1023]: built from the exponent bits (no
    ``pow`` whose last bit could differ between math libraries)."""
    return ((e.clamp(-1022, 1023) + 1023) << 52).view(torch.float64)


def order_free_shift(peak: torch.Tensor, n: int) -> torch.Tensor:
    """Per column the power of two that scales values up to ``peak`` (float64, ``≥ |x|``) of ``n`` rows into
    integers that ``n`` of can be summed in int64: ``|x|·2^s < 2^(62 − bits(n))``."""
    _, e = torch.frexp(peak)  # |x| < 2^e
    return (62 - max(n, 1).bit_length()) - e.to(torch.int64)


def order_free_finish(sums: torch.Tensor, shift: torch.Tensor, n: int) -> torch.Tensor:
    """The mean (float64) from the column sums of ``round(x · 2^shift)`` (int64) over ``n`` rows."""
    return sums.double() * pow2(-shift) / max(n, 1)


def order_free_mean(x: torch.Tensor) -> torch.Tensor:
    """Means over the rows of ``x`` ``(..., n, C)`` as float64 ``(..., C)``, bit-identical on every device and
    thread count.

    A floating-point sum depends on the order of its terms (a GPU reduction and a CPU one differ in the last
    bits, and a last bit can move an fp16 mean or step, hence a symbol): here each value is scaled by a power of two
    per column (:func:`order_free_shift`) and rounded to an integer, the integers are summed exactly in int64, and
    the sum is scaled back and divided by ``n``: every step is one correctly rounded IEEE operation on values that
    do not depend on the order. Values more than ~2^-40 below the column's largest contribute rounded to that
    resolution (far below the fp16 the result is stored in)."""
    n = x.shape[-2]
    xd = x.double()
    shift = order_free_shift(xd.abs().amax(-2), n)
    ints = torch.round(xd * pow2(shift)[..., None, :]).to(torch.int64)
    return order_free_finish(ints.sum(-2), shift, n)


def step_of(sd: torch.Tensor, peak: torch.Tensor, quality: float) -> torch.Tensor:
    """The fp16 step of channels with standard deviation ``sd`` (float64) whose farthest value lies ``peak``
    (float32) from their mean: ``quality`` standard deviations, more where the peak would not be reached in
    ``MAX_K`` steps (nothing is clipped), at least :data:`STEP_FLOOR`."""
    fit = torch.maximum(sd * quality, peak.double() / (MAX_K - 0.5))
    return fit.float().clamp_min(STEP_FLOOR).half()


def slot_stats_reference(x: torch.Tensor, quality: float) -> SlotStats:
    """:class:`SlotStats` of ``G`` slots ``x`` ``(G, heads, n, head_dim)`` float32 (``n ≥ 1``), on ``x``'s device."""
    g, heads, n, dim = x.shape
    m = x.permute(0, 2, 1, 3).reshape(g, n, heads * dim)  # (G, n, C)
    mu = order_free_mean(m).float().half()
    dev = m - mu.float()[:, None, :]
    sd = order_free_mean(dev.double().square()).sqrt()
    st = step_of(sd, dev.abs().amax(1), quality)
    kmax = torch.full((), float(MAX_K), device=x.device)
    sym = quantize(dev, st.float()[:, None, :], kmax).to(torch.uint8)  # bytes: every later pass moves 1, not 8
    return SlotStats(mu, st, sym.transpose(1, 2).reshape(g, -1))


Peaks = Callable[[torch.Tensor | None], torch.Tensor]
Sums = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]
Symbols = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def slot_stats_by_passes(n: int, quality: float, peaks: Peaks, sums: Sums, symbols: Symbols) -> SlotStats:
    """:func:`slot_stats_reference` of ``n`` tokens from three passes a kernel twin makes over its slots
    ``(G, heads, n, head_dim)`` (channel ``c = h · head_dim + j``), each giving ``(G, C)`` per column:

    * ``peaks(mu)``: ``max_t |x|`` (float32), or ``max_t |x − mu|`` when ``mu`` (float32 ``(G, C)``) is given;
    * ``sums(mu, scale)``: ``Σ_t round_half_even(v · scale)`` (int64) of ``v = x`` in float64, or of the float32
      deviation ``x − mu`` squared in float64 (exact) when ``mu`` is given; ``scale``: float64 powers of two;
    * ``symbols(mu, step)``: ``clamp(round_half_even((x − mu) / step), ±MAX_K) + MAX_K`` as uint8 ``(G, C · n)``,
      component-major (float32 operations).

    The peak of the squared deviations is the squared peak (float32 squares are exact in float64)."""
    peak = peaks(None)
    shift = order_free_shift(peak.double(), n)
    mu = order_free_finish(sums(None, pow2(shift)), shift, n).float().half()
    muf = mu.float()
    dev_peak = peaks(muf)
    shift = order_free_shift(dev_peak.double().square(), n)
    st = step_of(order_free_finish(sums(muf, pow2(shift)), shift, n).sqrt(), dev_peak, quality)
    return SlotStats(mu, st, symbols(muf, st.float()))
