"""FP8 (e4m3) KV storage as engines define it: x / scale rounded to e4m3 (saturating at ±448), times scale."""

from __future__ import annotations

import pytest
import torch

from kvtool.quantizers import Fp8Quantizer


def _x(seed: int = 0, smallest: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 50, 16, generator=g) * torch.tensor([smallest, 1.0, 30.0]).reshape(1, 3, 1, 1)


def test_relative_error_is_within_half_an_e4m3_step() -> None:
    """e4m3 keeps 3 mantissa bits: a normal value is rounded to within 2^-4 of itself (half a step, relative)."""
    x = _x()
    for q in (Fp8Quantizer("tensor"), Fp8Quantizer("head")):
        y = q.apply(x)
        s = q.scales_for(x)
        normal = (x / s).abs() >= 2.0**-6  # e4m3's smallest normal
        rel = ((y - x).abs() / x.abs())[normal]
        assert float(rel.max()) <= 2.0**-4 + 1e-6, q.label()


def test_per_head_scales_help_heads_of_different_range() -> None:
    x = _x(1, smallest=1e-3)  # with one scale for all heads, this head's values fall to e4m3's subnormals
    err_t = (Fp8Quantizer("tensor").apply(x) - x)[:, 0].abs().mean()
    err_h = (Fp8Quantizer("head").apply(x) - x)[:, 0].abs().mean()
    assert err_h < err_t / 4


def test_static_scale_equals_dynamic_at_amax_and_saturates_beyond() -> None:
    x = _x(2)
    amax = x.abs().amax(dim=(0, 2, 3))
    static = Fp8Quantizer("head", 3, amax / 448)
    assert torch.equal(static.apply(x), Fp8Quantizer("head").apply(x))
    small = Fp8Quantizer("head", 3, amax / 448 / 4)  # a scale calibrated on 4x smaller data: values saturate
    y = small.apply(x)
    assert torch.equal(y.abs().amax(dim=(0, 2, 3)), (amax / 4).float())
    with pytest.raises(ValueError, match="scale must be"):
        Fp8Quantizer("head", 3, torch.tensor([1.0, -1.0, 1.0]))
    assert Fp8Quantizer("tensor").cost(64, 100).nominal == 8.0


def test_nvfp4_grid_ties_blocks_and_cost() -> None:
    """NVFP4: values on the e2m1 grid (ties to the even code), one e4m3 scale per 16-element block, 4.5 bits."""
    from kvtool.quantizers import Nvfp4Quantizer
    from kvtool.quantizers.nvfp4 import round_e2m1

    a = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, 7.0, 0.3])
    assert round_e2m1(a).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, 6.0, 0.5]
    x = _x(3)
    q = Nvfp4Quantizer()
    y = q.apply(x)
    # every block of 16 is (e2m1 values) x (one e4m3 block scale) x (the global scale, amax / 448 as engines load)
    s_t = float(x.abs().amax()) / 448
    xb, yb = x.reshape(-1, 16), y.reshape(-1, 16)
    s_b = (xb.abs().amax(1, keepdim=True) / (6 * s_t)).to(torch.float8_e4m3fn).float()
    assert float(s_b.max()) <= 448 / 6 + 1e-3
    codes = yb / (s_b * s_t)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert bool(((codes.abs()[..., None] - grid).abs().amin(-1) < 1e-5).all())
    rel = float((y - x).norm() / x.norm())
    assert rel < 0.2  # ~3 bits of precision per block-scaled value
    assert q.cost(64, 100).nominal == 4.0 and abs(q.cost(64, 100).all_in - 4.5) < 0.01
    with pytest.raises(ValueError, match="multiple"):
        q.apply(torch.randn(1, 1, 4, 24))
