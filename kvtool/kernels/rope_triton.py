"""Triton RoPE for decoded keys: the last stage of the decode hot path, writing the keys in one pass.

Reference: :func:`kvtool.arch.apply_rope` (transformers' ``rotate_half`` convention): for the halves
``x1, x2`` of a head, ``out1 = x1·cos1 − x2·sin1`` and ``out2 = x2·cos2 + x1·sin2``. Computed in float32 and
rounded once to the output dtype, so results agree with the float32 reference within one rounding step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, rows, heads, tokens, HALF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]  # rows of (batch, token, head), head-minor
    col = tl.arange(0, HALF)[None, :]
    live = row < rows
    token = (row // heads) % tokens
    base = row.to(tl.int64) * (2 * HALF)
    x1 = tl.load(x_ptr + base + col, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF + col, mask=live, other=0.0).to(tl.float32)
    rope = token.to(tl.int64) * (2 * HALF)
    c1 = tl.load(cos_ptr + rope + col, mask=live, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + rope + HALF + col, mask=live, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + rope + col, mask=live, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + rope + HALF + col, mask=live, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + col, (x1 * c1 - x2 * s1).to(ty), mask=live)
    tl.store(out_ptr + base + HALF + col, (x2 * c2 + x1 * s2).to(ty), mask=live)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE of ``x`` ``(batch, tokens, heads, head_dim)`` with ``cos``/``sin`` ``(tokens, head_dim)``; returns
    ``out`` (new, or given: may be ``x`` itself) in ``x``'s dtype. ``head_dim`` must be a power of two."""
    b, t, h, d = x.shape
    if d & (d - 1) or d < 2:
        raise ValueError(f"head_dim must be a power of two, got {d}")
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    rows = b * t * h
    block = max(1, 4096 // d)
    _rope_kernel[(triton.cdiv(rows, block),)](
        x, cos.contiguous(), sin.contiguous(), out, rows, h, t, HALF=d // 2, BLOCK=block
    )
    return out
