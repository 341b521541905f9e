"""FP8 (e4m3) KV storage with a scale, as serving engines hold it (vLLM ``--kv-cache-dtype fp8``, TensorRT-LLM,
SGLang): ``q = fp8_e4m3(x / scale)`` (saturating at ±448), read back as ``q · scale``.

``granularity``: one scale per tensor (``"tensor"``: vLLM's ``kv_cache_scheme.strategy = "tensor"``) or per KV head
(``"head"``: ``"attn_head"``, scales ``(kv_heads, 1, 1)``). With ``scale`` given the scale is static (what an
engine loads from a checkpoint); without, it is taken from the tensor itself (``amax / 448``, the dynamic fallback).
Engines apply it to the **post-RoPE** keys the cache holds: a :class:`~kvtool.transforms.KVTransform` using it for
keys should have ``keys_pre_rope=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from kvtool.config import register
from kvtool.transforms import BitCost, TensorTransform

E4M3_MAX = 448.0  #: the largest finite float8_e4m3fn value


@register
@dataclass(frozen=True)
class Fp8Quantizer(TensorTransform):
    """FP8 e4m3 with a per-tensor or per-head scale (static when ``scale`` is set: ``(1,)`` or ``(kv_heads,)``)."""

    granularity: Literal["tensor", "head"] = "tensor"
    heads: int = 0  #: KV heads (``granularity="head"`` with a static scale)
    scale: torch.Tensor | None = None

    tensor_fields: ClassVar[tuple[str, ...]] = ("scale",)

    def __post_init__(self) -> None:
        if self.granularity not in ("tensor", "head"):
            raise ValueError(f"granularity must be tensor or head (got {self.granularity!r})")
        if self.scale is not None:
            want = (1,) if self.granularity == "tensor" else (self.heads,)
            if tuple(self.scale.shape) != want or not bool((self.scale > 0).all()) or not bool(
                torch.isfinite(self.scale).all()
            ):
                raise ValueError(f"scale must be {want} finite positive values")

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return (1,) if self.granularity == "tensor" else (self.heads,)

    def label(self) -> str:
        return f"fp8-e4m3/{self.granularity}" + ("" if self.scale is not None else " dynamic")

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        # one fp32 scale per tensor (or per head), shared by every token: nothing per element beyond the 8 bits
        return BitCost(8.0, 8.0 + 32.0 / (head_dim * max(num_tokens, 1)))

    def scales_for(self, x: torch.Tensor) -> torch.Tensor:
        """The scale of ``x`` ``(batch, heads, tokens, head_dim)`` broadcastable against it (float32)."""
        if self.scale is not None:
            s = self.scale.to(x.device, torch.float32)
            return s.reshape(1, -1, 1, 1) if self.granularity == "head" else s.reshape(1, 1, 1, 1)
        dims = (0, 2, 3) if self.granularity == "head" else (0, 1, 2, 3)
        amax = x.float().abs().amax(dim=dims, keepdim=True)
        return (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scales_for(x)
        q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return (q.float() * s).to(x.dtype)
