"""Non-uniform datatypes with dense-and-sparse outliers (KVQuant, arXiv:2401.18079, §3.3–3.5).

Each vector is normalised to ``[-1, 1]`` by a zero point and a half-range, ``a = (x - zero) / range``; elements with
``|a| > 1`` are **outliers**, kept exactly in fp16 in a sparse side list; the others are rounded to the nearest of
``2^b`` levels of a lookup table (LUT) on ``[-1, 1]`` and decoded as ``level * range + zero``.

* ``axis="channel"`` (keys, pre-RoPE): ``zero`` and ``range`` per (head, channel) come from thresholds calibrated
  offline (the ``outlier_frac / 2`` and ``1 - outlier_frac / 2`` percentiles over calibration tokens), stored in the
  calibration artifact, not in the cache.
* ``axis="token"`` (values, or keys without calibration): per token, over all heads of the layer, at run time: the
  thresholds leave ``round(outlier_frac * heads * head_dim)`` extreme elements outside (half on each side); the
  token's zero and range are stored in fp16.

The LUT is either fitted per layer by Fisher-weighted k-means (:mod:`kvtool.calibrators.nuq`) or a fixed
NormalFloat table (``nf``, QLoRA arXiv:2305.14314), the no-calibration baseline. Optional Q-Norm: the looked-up
level is corrected by an affine map ``level * s + o`` that restores the mean and standard deviation of the
normalised data (KVQuant App. I).

All-in bits per element, with ``n = heads * head_dim`` elements per token and layer: ``bits`` for the code, plus for
each outlier an fp16 value and a ``ceil(log2 n)``-bit position, plus a ``ceil(log2(n + 1))``-bit outlier count per
token, plus, for ``axis="token"``, an fp16 zero and range per token. ``outlier_frac`` is the designed fraction
(an upper bound: at most that many outliers are kept per block of 256 tokens, the rest are clamped into range, in
the spirit of KVQuant's ``--cap_outliers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from kvtool.config import register
from kvtool.transforms import BitCost, TensorTransform, fp16_round_trip

#: Tokens per outlier budget: at most ``round(outlier_frac * tokens * heads * head_dim)`` fp16 outliers per block.
OUTLIER_BLOCK = 256


def normal_float_table(bits: int) -> torch.Tensor:
    """NormalFloat-style levels: quantiles of N(0, 1) at the midpoints of ``2^bits`` equal-probability bins,
    scaled to ``[-1, 1]``. Sorted float32 ``(2^bits,)``."""
    n = 1 << bits
    levels = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return (levels / levels.abs().max()).float()


@register
@dataclass(frozen=True)
class NonUniformQuantizer(TensorTransform):
    """``bits``-bit lookup-table quantizer with dense-and-sparse outliers (see module docstring).

    ``lut`` (``(2^bits,)``) and, for ``axis="channel"``, ``thr_lo`` / ``thr_hi`` (``(heads, head_dim)``) are tensors:
    calibration artifacts store them stacked over layers, not in the JSON config.
    """

    tensor_fields: ClassVar[tuple[str, ...]] = ("lut", "thr_lo", "thr_hi")

    bits: int
    axis: Literal["channel", "token"]
    heads: int
    head_dim: int
    outlier_frac: float = 0.01
    table: Literal["fitted", "nf"] = "fitted"
    qnorm: list[float] | None = None  #: ``[s, o]``: decoded level = ``level * s + o``
    lut: torch.Tensor | None = field(default=None, compare=False, repr=False)
    thr_lo: torch.Tensor | None = field(default=None, compare=False, repr=False)
    thr_hi: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.axis not in ("channel", "token"):
            raise ValueError(f"axis must be 'channel' or 'token', got {self.axis!r}")
        if not 0.0 <= float(self.outlier_frac) < 0.5:
            raise ValueError(f"outlier_frac must be in [0, 0.5), got {self.outlier_frac}")
        if self.table not in ("fitted", "nf"):
            raise ValueError(f"table must be 'fitted' or 'nf', got {self.table!r}")
        if self.table == "nf" and self.lut is None:
            object.__setattr__(self, "lut", normal_float_table(self.bits))

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor field (how artifacts slice the stacked, padded tensors back)."""
        return (1 << self.bits,) if name == "lut" else (self.heads, self.head_dim)

    def label(self) -> str:
        q = "-qn" if self.qnorm else ""
        return f"{self.table}{self.bits}/{self.axis}-o{100 * self.outlier_frac:g}%{q}"

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        n = self.heads * head_dim
        outliers = self.outlier_frac * (16 + math.ceil(math.log2(n))) if self.outlier_frac else 0.0
        count = math.ceil(math.log2(n + 1)) / n if self.outlier_frac else 0.0
        per_token = 32.0 / n if self.axis == "token" else 0.0
        return BitCost(float(self.bits), self.bits + outliers + count + per_token)

    # -- the quantizer --------------------------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, zero, range)`` for ``x`` of shape ``(batch, heads, tokens, head_dim)`` (float32)."""
        if self.axis == "channel":
            if self.thr_lo is None or self.thr_hi is None:
                raise ValueError("a per-channel non-uniform quantizer needs calibrated thresholds")
            lo = self.thr_lo.to(x.device, torch.float32)[None, :, None, :]
            hi = self.thr_hi.to(x.device, torch.float32)[None, :, None, :]
        else:
            b, h, t, d = x.shape
            flat = x.permute(0, 2, 1, 3).reshape(b, t, h * d)
            k = round(self.outlier_frac * h * d)
            lo_k, hi_k = k // 2, k - k // 2
            srt = flat.sort(dim=-1).values
            lo = srt[..., lo_k : lo_k + 1]
            hi = srt[..., h * d - 1 - hi_k : h * d - hi_k]
            # fp16 storage of the per-token zero and range, as the cache holds them
            lo, hi = lo.half().float(), hi.half().float()
            lo = lo.reshape(b, t, 1, 1).permute(0, 2, 1, 3)
            hi = hi.reshape(b, t, 1, 1).permute(0, 2, 1, 3)
        zero = (hi + lo) / 2
        rng = ((hi - lo) / 2).clamp_min(1e-8)
        return (x - zero) / rng, zero, rng

    def levels(self) -> torch.Tensor:
        """The decoded levels (``lut`` after Q-Norm)."""
        if self.lut is None:
            raise ValueError("this non-uniform quantizer has no lookup table (was the artifact's tensor bound?)")
        lut = self.lut.float()
        return lut * self.qnorm[0] + self.qnorm[1] if self.qnorm else lut

    def codes(self, a: torch.Tensor) -> torch.Tensor:
        """Index of the nearest LUT level of each normalised element (the LUT is sorted)."""
        lut = self.lut.float().to(a.device)
        return torch.bucketize(a.contiguous(), (lut[1:] + lut[:-1]) / 2)

    def outlier_mask(self, a: torch.Tensor) -> torch.Tensor:
        """Elements kept as fp16 outliers: beyond ``[-1, 1]``, at most ``round(outlier_frac * count)`` per block of
        ``OUTLIER_BLOCK`` tokens (the largest ``|a|``), so the sparse list (CSR: per-token counts, positions, fp16
        values) has a known size; the others are clamped into range. Per-token normalisation (``axis="token"``)
        leaves exactly that many per token by construction."""
        b, h, t, d = a.shape
        beyond = a.abs() > 1
        if not self.outlier_frac:
            return torch.zeros_like(beyond)
        mag = torch.where(beyond, a.abs(), torch.zeros_like(a))
        keep = torch.zeros_like(beyond)
        for start in range(0, t, OUTLIER_BLOCK):
            block = mag[:, :, start : start + OUTLIER_BLOCK]
            k = round(self.outlier_frac * block[0].numel())
            if k == 0:
                continue
            flat = block.reshape(b, -1)
            top = flat.topk(min(k, flat.shape[1]), dim=-1).indices  # exactly k, ties broken by topk
            chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True) & (flat > 0)
            keep[:, :, start : start + OUTLIER_BLOCK] = chosen.reshape(block.shape)
        return keep

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        a, zero, rng = self.normalize(xf)
        deq = self.levels().to(x.device)[self.codes(a.clamp(-1, 1))] * rng + zero
        out = torch.where(self.outlier_mask(a), fp16_round_trip(xf), deq)
        return out.to(x.dtype)
