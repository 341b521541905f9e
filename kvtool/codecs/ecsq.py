"""Entropy-coded scalar quantization (ECSQ) of transform coefficients, and its calibrated rate levels.

The codec quantizes each coefficient ``c`` of component ``j`` on a mid-tread uniform grid, ``s = clamp(round(c /
step_j), -K_j, K_j)``, reconstructs ``s · step_j``, and entropy-codes ``s + K_j`` with a static table (a uniform
quantizer followed by an ideal entropy coder is within 0.25 bit of the rate-distortion bound at high rate, Gish &
Pierce 1968; at low rate the zero bin makes most symbols nearly free, which fixed-length codes cannot do).

Calibration (:func:`measure_options`) tries, per component, steps ``σ_j · 2^(1 - q/2)`` for ``q = 0 .. STEPS-1``
and measures the entropy of the symbols and the Fisher-weighted error, like the fixed-length table of
:mod:`kvtool.calibrators.projection`. :func:`allocate_levels` then picks, for each rate level of ``LEVEL_BITS``, a
step (or dropping the component) per component under the level's all-in budget, and freezes the symbol tables the
codec ships in the artifact (so chunks carry no tables).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool.calibrators.bit_allocation import allocate_bits
from kvtool.codecs.rans import quantize_counts

STEPS = 14
MAX_K = 63  #: symbols in [-63, 63]: alphabet of at most 127
LEVEL_BITS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  #: calibrated rate levels, all-in bits per element (tables free)


def step_ratios() -> torch.Tensor:
    """``(STEPS,)`` step sizes in standard deviations of the component, coarse to fine."""
    return 2.0 ** (1.0 - torch.arange(STEPS, dtype=torch.float64) / 2)


def quantize(c: torch.Tensor, step: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Symbols ``round(c / step)`` clamped to ``±kmax``, offset to ``[0, 2·kmax]`` (int64); ``step``, ``kmax``
    broadcast against ``c``. Rounding is half-to-even (``torch.round``), the same on every backend."""
    safe = torch.where(step > 0, step, torch.ones_like(step))
    s = torch.round(c / safe)
    return (torch.minimum(torch.maximum(s, -kmax), kmax) + kmax).to(torch.int64)


def dequantize(sym: torch.Tensor, step: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize` (float32)."""
    return (sym.to(torch.float32) - kmax) * step


@dataclass
class OptionTable:
    """Per component ``(N,)`` and option: ``rate`` ``(N, 1 + STEPS)`` bits per symbol (option 0 = dropped),
    ``dist`` ``(N, 1 + STEPS)`` Fisher-weighted error (summed over the sample), ``counts`` ``(N, STEPS, 2·MAX_K+1)``
    int64 symbol histograms, ``kmax`` ``(N, STEPS)``, ``step`` ``(N, STEPS)`` (fp16-exact)."""

    rate: torch.Tensor
    dist: torch.Tensor
    counts: torch.Tensor
    kmax: torch.Tensor
    step: torch.Tensor


def measure_options(c: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor) -> OptionTable:
    """Measure every step option on coefficients ``c`` with Fisher weights ``w`` (both ``(T, N)``)."""
    t, n = c.shape
    alphabet = 2 * MAX_K + 1
    rate = torch.zeros(n, 1 + STEPS, dtype=torch.float64)
    dist = torch.zeros(n, 1 + STEPS, dtype=torch.float64)
    dist[:, 0] = (w * c.square()).sum(0, dtype=torch.float64)
    counts = torch.zeros(n, STEPS, alphabet, dtype=torch.int64)
    kmaxs = torch.zeros(n, STEPS)
    steps = torch.zeros(n, STEPS)
    peak = c.abs().amax(0)
    for q, ratio in enumerate(step_ratios().tolist()):
        step = (sigma.clamp_min(1e-8) * ratio).half().float().clamp_min(6e-8)
        kmax = torch.ceil(peak / step).clamp(1, MAX_K)
        s = quantize(c, step, kmax)
        err = (w * (dequantize(s, step, kmax) - c).square()).sum(0, dtype=torch.float64)
        hist = torch.zeros(n, alphabet, dtype=torch.int64)
        hist.scatter_add_(1, s.T.contiguous(), torch.ones(n, t, dtype=torch.int64))
        p = hist.double() / t
        rate[:, 1 + q] = -(p * torch.log2(p.clamp_min(1e-300))).sum(1)
        dist[:, 1 + q] = err
        counts[:, q] = hist
        kmaxs[:, q], steps[:, q] = kmax, step
    return OptionTable(rate, dist, counts, kmaxs, steps)


@dataclass
class Level:
    """One calibrated rate level: per component ``step`` (0 = dropped), ``kmax``, and ``freq`` ``(N, A)`` int16
    tables (rows of dropped components are unused); ``expected_bits``: the all-in bits per element the calibration
    data would cost (entropy; the tables are static, so none are counted per chunk)."""

    bits: float
    step: torch.Tensor
    kmax: torch.Tensor
    freq: torch.Tensor
    expected_bits: float
    rate: torch.Tensor | None = None  #: ``(N,)`` calibrated bits per symbol of each component (0 when dropped)


def allocate_levels(
    table: OptionTable, weight: torch.Tensor, elements: float, fixed_bits: float, sample_scale: float
) -> list[Level]:
    """For every rate in ``LEVEL_BITS``: the option per component minimising the summed error with
    ``Σ weight · rate + fixed_bits <= bits · elements`` (``weight``: tokens each component is coded for;
    ``fixed_bits``: the fp16 sink tokens). ``sample_scale`` scales the sample's error to the whole set."""
    n = table.rate.shape[0]
    cost = weight.double()[:, None] * table.rate
    levels = []
    for bits in LEVEL_BITS:
        budget = bits * elements - fixed_bits
        pick = allocate_bits(table.dist * sample_scale, None, weight, budget, cost=cost)
        coded = pick > 0
        q = (pick - 1).clamp_min(0)
        step = torch.where(coded, table.step.gather(1, q[:, None])[:, 0], torch.zeros(n))
        kmax = torch.where(coded, table.kmax.gather(1, q[:, None])[:, 0], torch.zeros(n))
        alphabet = int(2 * kmax.max().item() + 1) if bool(coded.any()) else 1
        counts = table.counts[torch.arange(n), q][:, :alphabet]  # symbols are offset by each option's own kmax
        sizes = torch.where(coded, 2 * kmax.long() + 1, torch.ones(n, dtype=torch.long))
        freq = quantize_counts(counts, sizes).to(torch.int16)
        spent = float((cost.gather(1, pick[:, None])[:, 0]).sum()) + fixed_bits
        rate = table.rate.gather(1, pick[:, None])[:, 0].float()
        levels.append(Level(bits, step, kmax, freq, spent / elements, rate))
    return levels
