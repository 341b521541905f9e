"""Storage in a 16-bit float format: what a serving engine's fp16 / bf16 cache holds.

The reference row of every comparison: 16 bits per element, no metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvtool.config import register
from kvtool.transforms import BitCost, TensorTransform

_FORMATS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@register
@dataclass(frozen=True)
class FloatCast(TensorTransform):
    """Round to ``float16`` or ``bfloat16`` and back."""

    format: Literal["float16", "bfloat16"] = "float16"

    def __post_init__(self) -> None:
        if self.format not in _FORMATS:
            raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {self.format!r}")

    def label(self) -> str:
        return self.format

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        return BitCost(16.0, 16.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(_FORMATS[self.format]).to(x.dtype)
