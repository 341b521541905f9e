"""Calibration of the codec's rate levels (entropy-coded scalar quantization, :mod:`kvtool.codecs.ecsq`).

:func:`measure_options` tries, per component, steps ``σ_j · 2^(1 - q/2)`` for ``q = 0 .. STEPS-1`` and measures the
entropy of the symbols and the Fisher-weighted error, like the fixed-length table of
:mod:`kvtool.calibrators.projection`. :func:`allocate_levels` then picks, for each rate level of ``LEVEL_BITS``, a
step (or dropping the component) per component under the level's all-in budget, and freezes the symbol tables the
codec ships in the artifact (so chunks carry no tables). The levels' format (what the codec reads) belongs to the
codec: :class:`kvtool.codecs.ecsq.Level`, ``level_tensors`` / ``codec_levels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtool.calibrators.bit_allocation import allocate_bits
from kvtool.codecs.ecsq import MAX_K, Level, dequantize, quantize
from kvtool.codecs.rans import quantize_counts

STEPS = 14
LEVEL_BITS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  #: calibrated rate levels, all-in bits per element (tables free)


def step_ratios() -> torch.Tensor:
    """``(STEPS,)`` step sizes in standard deviations of the component, coarse to fine."""
    return 2.0 ** (1.0 - torch.arange(STEPS, dtype=torch.float64) / 2)


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
    """Measure every step option on coefficients ``c`` with Fisher weights ``w`` (both ``(T, N)``), on their
    device; the table comes back on the host."""
    t, n = c.shape
    alphabet = 2 * MAX_K + 1
    dev = c.device
    rate = torch.zeros(n, 1 + STEPS, dtype=torch.float64, device=dev)
    dist = torch.zeros(n, 1 + STEPS, dtype=torch.float64, device=dev)
    dist[:, 0] = (w * c.square()).sum(0, dtype=torch.float64)
    counts = torch.zeros(n, STEPS, alphabet, dtype=torch.int64, device=dev)
    kmaxs = torch.zeros(n, STEPS, device=dev)
    steps = torch.zeros(n, STEPS, device=dev)
    peak = c.abs().amax(0)
    for q, ratio in enumerate(step_ratios().tolist()):
        step = (sigma.clamp_min(1e-8) * ratio).half().float().clamp_min(6e-8)
        kmax = torch.ceil(peak / step).clamp(1, MAX_K)
        s = quantize(c, step, kmax)
        err = (w * (dequantize(s, step, kmax) - c).square()).sum(0, dtype=torch.float64)
        hist = torch.zeros(n, alphabet, dtype=torch.int64, device=dev)
        hist.scatter_add_(1, s.T.contiguous(), torch.ones(n, t, dtype=torch.int64, device=dev))
        p = hist.double() / t
        rate[:, 1 + q] = -(p * torch.log2(p.clamp_min(1e-300))).sum(1)
        dist[:, 1 + q] = err
        counts[:, q] = hist
        kmaxs[:, q], steps[:, q] = kmax, step
    return OptionTable(rate.cpu(), dist.cpu(), counts.cpu(), kmaxs.cpu(), steps.cpu())


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
