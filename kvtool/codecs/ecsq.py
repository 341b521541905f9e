"""Entropy-coded scalar quantization (ECSQ) of transform coefficients, and the format of its calibrated levels.

The codec quantizes each coefficient ``c`` of component ``j`` on a mid-tread uniform grid, ``s = clamp(round(c /
step_j), -K_j, K_j)``, reconstructs ``s · step_j``, and entropy-codes ``s + K_j`` with a static table (a uniform
quantizer followed by an ideal entropy coder is within 0.25 bit of the rate-distortion bound at high rate, Gish &
Pierce 1968; at low rate the zero bin makes most symbols nearly free, which fixed-length codes cannot do).

The levels are calibrated by :mod:`kvtool.calibrators.codec_rates` and stored in a projection artifact's tensors
(``codec<n>_*``); this module owns that format: :func:`level_tensors` writes it, :func:`codec_levels` reads and
checks it (the codec reads its levels here, not through the calibrators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvtool.codecs.rans import PROB_SCALE
from kvtool.errors import ArtifactError

MAX_K = 63  #: symbols in [-63, 63]: alphabet of at most 127


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


def level_tensors(levels: list[Level]) -> dict[str, torch.Tensor]:
    """The artifact tensors of ``levels`` (``codec<n>_step``, ``_kmax``, ``_freq``, ``_rate``, ``_bits``), read
    back by :func:`codec_levels`."""
    out: dict[str, torch.Tensor] = {}
    for n, lv in enumerate(levels):
        out |= {f"codec{n}_step": lv.step, f"codec{n}_kmax": lv.kmax, f"codec{n}_freq": lv.freq}
        if lv.rate is not None:
            out[f"codec{n}_rate"] = lv.rate
        out[f"codec{n}_bits"] = torch.tensor([lv.bits, lv.expected_bits], dtype=torch.float64)
    return out


def codec_levels(tensors: dict[str, torch.Tensor]) -> list[Level]:
    """The codec levels stored in an artifact's tensors (``codec<n>_*``), in order, each checked for what the
    coder relies on (an :class:`ArtifactError` names the first bad one: the tensors come from a file)."""
    levels, n = [], 0
    while f"codec{n}_step" in tensors:
        try:
            bits, expected = (float(x) for x in tensors[f"codec{n}_bits"].reshape(-1).tolist())
            level = Level(bits, tensors[f"codec{n}_step"], tensors[f"codec{n}_kmax"], tensors[f"codec{n}_freq"],
                          expected, tensors.get(f"codec{n}_rate"))  # fmt: skip
            problem = _level_problem(level)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise ArtifactError(f"projection artifact: codec level {n} is malformed ({problem})")
        levels.append(level)
        n += 1
    return levels


def _level_problem(lv: Level) -> str | None:
    step, kmax, freq = lv.step, lv.kmax, lv.freq
    if (step.dtype, kmax.dtype, freq.dtype) != (torch.float32, torch.float32, torch.int16):
        return f"step, kmax, freq must be float32, float32, int16 (got {step.dtype}, {kmax.dtype}, {freq.dtype})"
    if step.dim() != 1 or not step.is_floating_point() or not bool((torch.isfinite(step) & (step >= 0)).all()):
        return "step must be a 1-D tensor of finite non-negative numbers"
    if kmax.shape != step.shape:
        return "kmax must have one entry per component"
    k = kmax[step > 0]
    if not bool(((k >= 1) & (k <= MAX_K) & (k == k.round())).all()):
        return f"kmax of a coded component must be an integer in 1..{MAX_K}"
    if freq.dim() != 2 or freq.shape[0] != step.numel() or freq.shape[1] > 2 * MAX_K + 1 or freq.is_floating_point():
        return f"freq must be an integer table of {step.numel()} rows of at most {2 * MAX_K + 1} symbols"
    if bool((2 * k + 1 > freq.shape[1]).any()):
        return "a coded component's alphabet is wider than its table"
    used = freq[step > 0].to(torch.int64)
    if bool((used.sum(1) != PROB_SCALE).any()) or bool((used < 0).any()):
        return f"the tables of coded components must be non-negative and sum to {PROB_SCALE}"
    if bool(((used == 0) & (torch.arange(freq.shape[1])[None, :] <= 2 * k[:, None])).any()):
        return "every symbol a coded component can take needs a non-zero frequency"
    if not (math.isfinite(lv.bits) and math.isfinite(lv.expected_bits)):
        return "bits must be finite"
    return None
