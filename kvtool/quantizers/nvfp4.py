"""NVFP4 KV storage as NVIDIA's engines define it (TensorRT-LLM, ModelOpt, vLLM ``--kv-cache-dtype nvfp4``):
values in FP4 e2m1 (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks of 16 consecutive elements of a head's vector, each
block with an FP8 e4m3 scale computed when the cache is written, and one fp32 global scale per tensor, the
checkpoint's ``k_scale`` / ``v_scale``: ``x ≈ q · s_block · s_global``.

``s_global = amax / 448`` (ModelOpt exports "amax / 448 for both FP8 and NVFP4 KV cache", unified_export_hf.py;
static when ``scale`` is set, else from the tensor itself), ``s_block = e4m3(block_amax / (6 · s_global))`` (at
most 448 / 6), ``q = e2m1(x / (s_block · s_global))`` rounded to the nearest grid value, ties to the even code
(FlashInfer's ``nvfp4_append_quantize_block``, which vLLM calls). Stored bits: 4 per element + 8 per block of 16 =
4.5, plus the global scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvtool.config import register
from kvtool.quantizers.fp8 import E4M3_MAX
from kvtool.transforms import BitCost, TensorTransform

BLOCK = 16
E2M1_MAX = 6.0
#: the non-negative e2m1 values; codes 0..7 in this order (even codes: 0, 1, 2, 4 → ties go to them)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """``a`` (float32, |a| ≤ 6 after clamping) rounded to the nearest e2m1 value, ties to the even code."""
    mag = a.abs().clamp_max(E2M1_MAX).contiguous()
    grid = E2M1.to(a.device)
    mid = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(mag, mid)  # a value exactly on midpoint i gets code i, the lower neighbour
    on_mid = (idx < len(mid)) & (mag == mid[idx.clamp_max(len(mid) - 1)])
    idx = torch.where(on_mid & (idx % 2 == 1), idx + 1, idx)  # a tie goes to the even code of the two
    return torch.sign(a) * grid[idx]


@register
@dataclass(frozen=True)
class Nvfp4Quantizer(TensorTransform):
    """NVFP4 (see module docstring); ``scale``: a static global fp32 scale ``(1,)`` (amax / 448), or ``None``
    (dynamic: from the tensor's own amax)."""

    scale: torch.Tensor | None = None

    tensor_fields: ClassVar[tuple[str, ...]] = ("scale",)

    def __post_init__(self) -> None:
        if self.scale is not None and (tuple(self.scale.shape) != (1,) or not bool((self.scale > 0).all())):
            raise ValueError("scale must be one positive value (the global fp32 scale)")

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return (1,)

    def label(self) -> str:
        return "nvfp4" + ("" if self.scale is not None else " dynamic")

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        return BitCost(4.0, 4.0 + 8.0 / BLOCK + 32.0 / (head_dim * max(num_tokens, 1)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        if d % BLOCK:
            raise ValueError(f"NVFP4 blocks are {BLOCK} elements: head_dim {d} is not a multiple")
        xf = x.float()
        s_global = (self.scale.to(x.device, torch.float32) if self.scale is not None
                    else (xf.abs().amax() / E4M3_MAX).reshape(1))  # fmt: skip
        s_global = s_global.clamp_min(torch.finfo(torch.float32).tiny)
        blocks = xf.reshape(*x.shape[:-1], d // BLOCK, BLOCK)
        s_block = (blocks.abs().amax(-1, keepdim=True) / (E2M1_MAX * s_global)).clamp(max=E4M3_MAX)
        s_block = s_block.to(torch.float8_e4m3fn).float()
        denom = torch.where(s_block > 0, s_block * s_global, torch.ones_like(s_block))
        q = round_e2m1((blocks / denom).clamp(-E2M1_MAX, E2M1_MAX))
        return (q * s_block * s_global).reshape(x.shape).to(x.dtype)
