"""Uniform asymmetric quantization with fp16 scale and fp16 zero point.

Two grouping axes, as in KIVI (arXiv:2402.02750) and KVTuner (arXiv:2502.04420):

* ``token``: each token of each head is split into groups of ``group_size`` consecutive channels along
  ``head_dim`` (default: the whole head, one scale and zero point per token and head; a last, shorter group
  takes the remaining channels);
* ``channel``: each channel of each head is split into groups of ``group_size`` consecutive tokens (KIVI's
  per-channel keys; default 32 tokens). A last, shorter group takes the remaining tokens.

With ``rotate``, per-token groups are quantized after an orthonormal Hadamard rotation of the head dimension
(QuaRot, arXiv:2404.00456): it spreads outlier channels over the whole head at no storage cost, since the
rotation is fixed; the decoder rotates back.

The zero point is the group minimum stored in fp16, not an integer-rounded zero (KVQuant, arXiv:2401.18079,
found integer zero points hurt per-channel keys). Code ``q = clamp(round((x - zero) / scale), 0, 2^b - 1)``,
reconstruction ``q * scale + zero``, with ``scale = (max - min) / (2^b - 1)`` rounded to fp16 first, so the
simulation reproduces what a decoder of the stored fp16 metadata computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from kvtool.config import register
from kvtool.transforms import FP16_MAX, BitCost, TensorTransform


@register
@dataclass(frozen=True)
class UniformQuantizer(TensorTransform):
    """``bits``-bit uniform asymmetric quantizer, grouped along ``axis`` (see module docstring)."""

    bits: int
    axis: Literal["token", "channel"] = "token"
    group_size: int | None = None
    rotate: bool = False  #: per-token only: quantize ``x @ H`` (orthonormal Hadamard over head_dim), decode ``· Hᵀ``

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ValueError(f"bits must be an integer, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)):
            raise ValueError(f"group_size must be an integer or None, got {self.group_size!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not isinstance(self.rotate, bool) or (self.rotate and self.axis != "token"):
            raise ValueError("rotate is a bool and applies to the token axis only")

    def _group(self, head_dim: int) -> int:
        if self.group_size is not None:
            return self.group_size
        return head_dim if self.axis == "token" else 32

    def _rotated_off(self) -> UniformQuantizer:
        return UniformQuantizer(self.bits, self.axis, self.group_size)

    def label(self) -> str:
        rot = "-had" if self.rotate else ""
        return f"int{self.bits}/{self.axis}-g{self.group_size or ('D' if self.axis == 'token' else 32)}{rot}"

    def cost(self, head_dim: int, num_tokens: int) -> BitCost:
        g = self._group(head_dim)
        if self.axis == "token":
            groups_per_token = math.ceil(head_dim / g)
            meta = 32.0 * groups_per_token / head_dim
        else:
            meta = 32.0 * math.ceil(num_tokens / g) / max(num_tokens, 1)
        return BitCost(float(self.bits), self.bits + meta)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` of shape ``(batch, heads, tokens, head_dim)``; computed in float32."""
        b, h, t, d = x.shape
        g = self._group(d)
        xf = x.float()
        if self.rotate:
            hadamard = _hadamard(d, x.device)
            return (self._rotated_off().apply(xf @ hadamard) @ hadamard.T).to(x.dtype)
        if self.axis == "token":
            n_groups = math.ceil(d / g)
            pad = n_groups * g - d
            # A last, shorter group (head_dim not a multiple of the group): padding with the last channel leaves its
            # min and max unchanged, and cost() counts it as a whole group.
            xp = torch.cat([xf, xf[..., -1:].expand(b, h, t, pad)], dim=-1) if pad else xf
            groups = xp.reshape(b, h, t, n_groups, g)
            out = _fake_quant_lastdim(groups, self.bits).reshape(b, h, t, n_groups * g)[..., :d]
        else:
            n_groups = math.ceil(t / g)
            pad = n_groups * g - t
            # Padding with the last token leaves the last group's min and max unchanged.
            xp = torch.cat([xf, xf[:, :, -1:, :].expand(b, h, pad, d)], dim=2) if pad else xf
            groups = xp.reshape(b, h, n_groups, g, d).transpose(-1, -2)  # (b, h, n_groups, d, g)
            out = _fake_quant_lastdim(groups, self.bits).transpose(-1, -2).reshape(b, h, n_groups * g, d)[:, :, :t]
        return out.to(x.dtype)


def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    """Orthonormal rotation of order ``n``: a Sylvester-Hadamard matrix when ``n`` is a power of two, otherwise a
    block-diagonal of them, one block per power of two in ``n``'s binary expansion (80 = 64 + 16)."""
    blocks = []
    for bit in range(n.bit_length() - 1, -1, -1):
        if n >> bit & 1:
            h = torch.ones(1, 1, device=device)
            while h.shape[0] < 1 << bit:
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            blocks.append(h / math.sqrt(1 << bit))
    return torch.block_diag(*blocks)


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """Round float32 ``x`` to an fp16 value on the ``direction`` side (-inf: <= x, +inf: >= x), as float32."""
    h = x.clamp(-FP16_MAX, FP16_MAX).half()
    bad = (h.float() > x) if direction < 0 else (h.float() < x)
    stepped = torch.nextafter(h, torch.full_like(h, direction))
    return torch.where(bad, stepped, h).float()


def _fake_quant_lastdim(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max quantize-dequantize over the last dimension, fp16 scale and zero point.

    The zero point is rounded down and the scale up to fp16, so ``[zero, zero + levels * scale]`` still covers the
    group after rounding (rounding to nearest could put the zero above the minimum and clip the whole group).
    """
    levels = (1 << bits) - 1
    mn = x.amin(dim=-1, keepdim=True)
    mx = x.amax(dim=-1, keepdim=True)
    zero = _fp16_toward(mn, float("-inf"))
    scale = _fp16_toward((mx - zero) / levels, float("inf"))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((x - zero) / safe), 0, levels)
    return q * scale + zero
