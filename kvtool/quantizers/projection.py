"""Transform coding of K or V: project on a calibrated orthonormal basis, quantize each component with its own bit
width, reconstruct.

This is the transform stage KVTC (arXiv:2511.01815) applies to the whole cache and Loki / Palu / Eigen Attention
apply per layer or per head (arXiv:2406.02542, 2407.21118, 2410.05258): a token's vector ``x`` (one head's
``head_dim`` channels, or all heads of the layer concatenated) becomes coefficients ``c = (x - mean) @ basis``;
component ``j`` is stored with ``bits[j]`` bits on a static uniform grid ``lo[j] + (s + 0.5) * step[j]``
(``s = 0 .. 2^bits - 1``; calibrated per component, so nothing is stored per token), dropped (``bits = 0``:
reconstructed as the mean) or kept as fp16 (``bits = 16``: low-rank projection without quantization). The decoder
computes ``x̂ = ĉ @ basisᵀ + mean``.

The same object is the codec's transform (:mod:`kvtool.codecs`): :meth:`ProjectionQuantizer.coefficients` and
:meth:`ProjectionQuantizer.reconstruct` are the basis change the calibrated coder applies around its own
entropy-coded quantization (:class:`EntropyCodedProjection` is that quantization inside attention);
:meth:`ProjectionQuantizer.symbols` / :meth:`ProjectionQuantizer.dequantize` are the fixed-length codes of this
method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kvtool.config import register
from kvtool.transforms import BitCost, TensorTransform

FP16_COEFFICIENT = 16  #: ``bits`` value of a component stored as an fp16 number (projection only)
MAX_CODE_BITS = 8


@register
@dataclass(frozen=True)
class ProjectionQuantizer(TensorTransform):
    """Per-component quantization in a calibrated orthonormal basis.

    Shapes (``G`` blocks of ``d`` features: ``granularity="head"``: ``G = heads``, ``d = head_dim``;
    ``"layer"``: ``G = 1``, ``d = heads * head_dim``, heads concatenated in order):

    * ``mean`` ``(G, d)``, ``basis`` ``(G, d, d)`` (columns = components, by decreasing calibration energy);
    * ``bits`` ``(G, d)``: 0 (dropped), 1–8 (static uniform grid), 16 (fp16 coefficient);
    * ``lo``, ``step`` ``(G, d)``: the grid of each quantized component.
    """

    heads: int
    head_dim: int
    granularity: Literal["head", "layer"] = "layer"
    mean: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    step: torch.Tensor | None = None

    tensor_fields: ClassVar[tuple[str, ...]] = ("mean", "basis", "bits", "lo", "step")

    def __post_init__(self) -> None:
        if self.granularity not in ("head", "layer"):
            raise ValueError(f"granularity must be 'head' or 'layer', got {self.granularity!r}")
        if self.heads < 1 or self.head_dim < 1:
            raise ValueError("heads and head_dim must be >= 1")
        if self.bits is not None:
            b = self.bits
            ok = (b == 0) | (b == FP16_COEFFICIENT) | ((b >= 1) & (b <= MAX_CODE_BITS))
            if not bool(ok.all()) or not torch.equal(b, b.round()):
                raise ValueError("bits must be 0, 1..8 or 16 per component")

    @property
    def blocks(self) -> tuple[int, int]:
        """``(G, d)``: number of projected blocks per token and their width."""
        if self.granularity == "head":
            return self.heads, self.head_dim
        return 1, self.heads * self.head_dim

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        g, d = self.blocks
        return (g, d, d) if name == "basis" else (g, d)

    def _require(self) -> tuple[torch.Tensor, ...]:
        if any(t is None for t in (self.mean, self.basis, self.bits, self.lo, self.step)):
            raise ValueError("ProjectionQuantizer needs its calibrated mean, basis, bits, lo and step")
        return self.mean, self.basis, self.bits, self.lo, self.step  # type: ignore[return-value]

    def label(self) -> str:
        if self.bits is None:
            return f"pca/{self.granularity}"
        b = self.bits.float()
        kept = float((b > 0).float().mean())
        return f"pca/{self.granularity} r{kept:.2f} {float(b.mean()):.2f}b"

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        """Mean stored bits per component; the basis, mean and grids are per model, so nothing is per token."""
        _, _, bits, _, _ = self._require()
        mean_bits = float(bits.float().mean())
        return BitCost(mean_bits, mean_bits)

    # -- the transform-coding steps (shared with the codec) ---------------------------------------------------

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, heads, tokens, head_dim)`` → ``(batch, G, tokens, d)``."""
        if self.granularity == "head":
            return x
        b, h, t, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, 1, t, h * d)

    def from_blocks(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`."""
        if self.granularity == "head":
            return y
        b, _, t, _ = y.shape
        return y.reshape(b, t, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 coefficients ``(batch, G, tokens, d)`` of ``x`` ``(batch, heads, tokens, head_dim)``."""
        mean, basis, _, _, _ = self._require()
        blocks = self.to_blocks(x.float())
        return (blocks - mean[None, :, None, :]) @ basis[None]

    def symbols(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Integer codes ``(batch, G, tokens, d)`` (int32) of coefficients; components that are dropped or fp16
        get 0 (fp16 ones are carried separately by whoever stores them)."""
        _, _, bits, lo, step = self._require()
        levels = torch.where((bits >= 1) & (bits <= MAX_CODE_BITS), 2.0**bits - 1, torch.zeros_like(bits))
        safe = torch.where(step > 0, step, torch.ones_like(step))
        s = torch.floor((coeffs - lo[None, :, None, :]) / safe[None, :, None, :])
        return torch.minimum(s.clamp_min(0), levels[None, :, None, :]).to(torch.int32)

    def dequantize(self, codes: torch.Tensor, coeffs_fp16: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients a decoder reconstructs from ``codes`` (and the fp16 components, when there are any)."""
        _, _, bits, lo, step = self._require()
        coded = (bits >= 1) & (bits <= MAX_CODE_BITS)
        values = lo[None, :, None, :] + (codes.float() + 0.5) * step[None, :, None, :]
        out = torch.where(coded[None, :, None, :], values, torch.zeros_like(values))
        if coeffs_fp16 is not None:
            keep = (bits == FP16_COEFFICIENT)[None, :, None, :]
            out = torch.where(keep, coeffs_fp16.to(torch.float16).float(), out)
        return out

    def reconstruct(self, coeffs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(batch, G, tokens, d)`` coefficients → ``(batch, heads, tokens, head_dim)`` in ``dtype``."""
        mean, basis, _, _, _ = self._require()
        blocks = coeffs @ basis.transpose(-1, -2)[None] + mean[None, :, None, :]
        return self.from_blocks(blocks).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Project, quantize, reconstruct ``x`` ``(batch, heads, tokens, head_dim)``; computed in float32."""
        if x.shape[1] != self.heads or x.shape[3] != self.head_dim:
            raise ValueError(f"expects {self.heads} heads of {self.head_dim}, got shape {tuple(x.shape)}")
        c = self.coefficients(x)
        return self.reconstruct(self.dequantize(self.symbols(c), c), x.dtype)


@register
@dataclass(frozen=True)
class EntropyCodedProjection(ProjectionQuantizer):
    """The codec's quantization in the same basis (:mod:`kvtool.codecs.ecsq`): per component a mid-tread step
    (0: dropped) and clamp ``kmax``; ``rate`` is the calibrated entropy-coded bits per symbol, so :meth:`cost` is
    what a ``.kvz`` with static tables spends (an estimate from the calibration text; the codec measures the real
    bytes). Shapes ``(G, d)`` like :class:`ProjectionQuantizer`'s ``bits``."""

    kmax: torch.Tensor | None = None
    rate: torch.Tensor | None = None

    tensor_fields: ClassVar[tuple[str, ...]] = ("mean", "basis", "step", "kmax", "rate")

    def _ready(self) -> tuple[torch.Tensor, ...]:
        if any(t is None for t in (self.mean, self.basis, self.step, self.kmax, self.rate)):
            raise ValueError("EntropyCodedProjection needs its calibrated mean, basis, step, kmax and rate")
        return self.step, self.kmax, self.rate  # type: ignore[return-value]

    def label(self) -> str:
        if self.rate is None:
            return f"pca-ec/{self.granularity}"
        kept = float((self.step > 0).float().mean())  # type: ignore[operator]
        return f"pca-ec/{self.granularity} r{kept:.2f} {float(self.rate.mean()):.2f}b"

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        _, _, rate = self._ready()
        mean_bits = float(rate.float().mean())
        return BitCost(mean_bits, mean_bits)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        from kvtool.codecs.ecsq import dequantize, quantize

        step, kmax, _ = self._ready()
        if x.shape[1] != self.heads or x.shape[3] != self.head_dim:
            raise ValueError(f"expects {self.heads} heads of {self.head_dim}, got shape {tuple(x.shape)}")
        mean, basis = self.mean, self.basis
        blocks = self.to_blocks(x.float())
        c = (blocks - mean[None, :, None, :]) @ basis[None]  # type: ignore[index]
        s, k = step[None, :, None, :], kmax[None, :, None, :]
        ch = torch.where(s > 0, dequantize(quantize(c, s, k), s, k), torch.zeros_like(c))
        out = ch @ basis.transpose(-1, -2)[None] + mean[None, :, None, :]  # type: ignore[union-attr,index]
        return self.from_blocks(out).to(x.dtype)
