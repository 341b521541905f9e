"""One shared matrix over every TensorTransform method (kvpress style): a new method is tested by adding a line.

Each entry is ``(id, factory)``; the factory gets (heads, head_dim) and a calibration tensor for methods that need
thresholds, and returns the transform. Properties checked for all: shape and dtype kept, finite output, sensible
costs, JSON + tensor round trip through a calibration-style KVTransform, and a forward pass of every tiny
architecture with the method in every layer.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvtool.attention import transformed_attention
from kvtool.quantizers import (
    FloatCast,
    Fp8Quantizer,
    NonUniformQuantizer,
    Nvfp4Quantizer,
    ProjectionQuantizer,
    UniformQuantizer,
)
from kvtool.quantizers.projection import EntropyCodedProjection
from kvtool.transforms import KVTransform, TensorTransform


def _thresholds(x: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = x[0].permute(1, 0, 2).reshape(x.shape[2], -1)
    shape = x.shape[1], x.shape[3]
    return {"thr_lo": flat.quantile(0.01, 0).reshape(shape), "thr_hi": flat.quantile(0.99, 0).reshape(shape)}


def _pca(h: int, d: int, x: torch.Tensor, granularity: str, bits: float) -> ProjectionQuantizer:
    """A projection fitted on ``x`` (eigenbasis, ±3σ grids), every component at ``bits``."""
    shell = ProjectionQuantizer(h, d, granularity)
    blocks = shell.to_blocks(x.float())[0]  # (G, T, d)
    mean = blocks.mean(1)
    cov = (blocks - mean[:, None]).transpose(1, 2) @ (blocks - mean[:, None]) / blocks.shape[1]
    evals, basis = torch.linalg.eigh(cov)
    sigma = evals.clamp_min(1e-6).sqrt()
    return ProjectionQuantizer(
        h, d, granularity, mean=mean, basis=basis, bits=torch.full_like(mean, bits), lo=-3 * sigma,
        step=6 * sigma / 2**bits if bits <= 8 else torch.zeros_like(sigma),
    )  # fmt: skip


def _pca_ec(h: int, d: int, x: torch.Tensor, granularity: str, sigmas: float) -> EntropyCodedProjection:
    """The codec's quantization in a fitted eigenbasis: per component a step of ``sigmas`` standard deviations
    (the weakest quarter dropped), a clamp covering ±4σ, and the Gaussian entropy of that grid as its rate."""
    p = _pca(h, d, x, granularity, 16)
    sigma = (-p.lo / 3).clamp_min(1e-6)  # the fit stored lo = -3σ
    step = (sigmas * sigma).half().float()
    step = torch.where(sigma >= sigma.flatten().quantile(0.25), step, torch.zeros_like(step))
    kmax = torch.where(step > 0, torch.ceil(4 * sigma / step.clamp_min(1e-30)).clamp(1, 63), torch.zeros_like(step))
    rate = torch.where(step > 0, (torch.log2(sigma / step.clamp_min(1e-30)) + 2.05).clamp_min(0.05),
                       torch.zeros_like(step))  # fmt: skip
    return EntropyCodedProjection(h, d, granularity, mean=p.mean, basis=p.basis, step=step, kmax=kmax, rate=rate)


Factory = Callable[[int, int, torch.Tensor], TensorTransform]

#: (id, factory): every method kvtool ships, in easy-to-hard order.
METHODS: list[tuple[str, Factory]] = [
    ("fp16", lambda h, d, x: FloatCast("float16")),
    ("bf16", lambda h, d, x: FloatCast("bfloat16")),
    ("fp8-tensor-dynamic", lambda h, d, x: Fp8Quantizer("tensor")),
    ("fp8-head-static", lambda h, d, x: Fp8Quantizer("head", h, x.float().abs().amax(dim=(0, 2, 3)) / 448)),
    ("nvfp4-dynamic", lambda h, d, x: Nvfp4Quantizer()),
    ("nvfp4-static", lambda h, d, x: Nvfp4Quantizer(x.float().abs().amax().reshape(1) / (448 * 6))),
    ("int8-token", lambda h, d, x: UniformQuantizer(8, "token")),
    ("int4-token-g8", lambda h, d, x: UniformQuantizer(4, "token", 8)),
    ("int4-token-had", lambda h, d, x: UniformQuantizer(4, "token", rotate=True)),
    ("int4-channel-g4", lambda h, d, x: UniformQuantizer(4, "channel", 4)),
    ("int2-channel-g32", lambda h, d, x: UniformQuantizer(2, "channel", 32)),
    ("nf4-token", lambda h, d, x: NonUniformQuantizer(4, "token", h, d, 0.05, table="nf")),
    ("nf3-channel", lambda h, d, x: NonUniformQuantizer(3, "channel", h, d, 0.05, table="nf", **_thresholds(x))),
    ("nf2-token-no-outliers", lambda h, d, x: NonUniformQuantizer(2, "token", h, d, 0.0, table="nf")),
    ("pca-layer-fp16", lambda h, d, x: _pca(h, d, x, "layer", 16)),
    ("pca-head-4bit", lambda h, d, x: _pca(h, d, x, "head", 4)),
    ("pca-layer-3bit", lambda h, d, x: _pca(h, d, x, "layer", 3)),
    ("pca-ec-head", lambda h, d, x: _pca_ec(h, d, x, "head", 0.5)),
    ("pca-ec-layer-coarse", lambda h, d, x: _pca_ec(h, d, x, "layer", 2.0)),
]
IDS = [m[0] for m in METHODS]


def _kv(seed: int = 0, heads: int = 2, tokens: int = 24, head_dim: int = 16) -> torch.Tensor:
    x = torch.randn(1, heads, tokens, head_dim, generator=torch.Generator().manual_seed(seed))
    x[..., 1] *= 6
    return x


@pytest.mark.parametrize("factory", [m[1] for m in METHODS], ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shape_dtype_finite(factory: Factory, dtype: torch.dtype) -> None:
    x = _kv()
    y = factory(2, 16, x).apply(x.to(dtype))
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("factory", [m[1] for m in METHODS], ids=IDS)
def test_error_is_bounded(factory: Factory) -> None:
    """Relative MSE below 0.5 even for 2-bit methods (a broken method would be ~1 or worse)."""
    x = _kv()
    y = factory(2, 16, x).apply(x)
    assert float((y - x).square().mean() / x.square().mean()) < 0.5


@pytest.mark.parametrize("factory", [m[1] for m in METHODS], ids=IDS)
def test_costs(factory: Factory) -> None:
    c = factory(2, 16, _kv()).cost(16, 24)
    assert 0 < c.nominal <= c.all_in <= 16 + 1e-9 or c.nominal == c.all_in == 16


@pytest.mark.parametrize("factory", [m[1] for m in METHODS], ids=IDS)
def test_round_trip_through_artifact_form(factory: Factory) -> None:
    """JSON config + stacked tensors (what a calibration artifact stores) rebuild a transform that gives the same
    output."""
    x = _kv()
    t = KVTransform([factory(2, 16, x), None], [None, factory(2, 16, x)], sink_tokens=1)
    back = KVTransform.from_dict(t.to_dict()).bind(t.stacked_tensors())
    assert torch.equal(back.keys[0].apply(x), t.keys[0].apply(x))
    assert torch.equal(back.values[1].apply(x), t.values[1].apply(x))


@pytest.mark.parametrize("factory", [m[1] for m in METHODS], ids=IDS)
def test_forward_on_every_arch(tiny, factory: Factory) -> None:
    """The method in every layer (keys pre-RoPE, one sink) runs inside each tiny model's attention."""
    model, info = tiny.model, tiny.info
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    # calibration-style thresholds from the model's own K (shape matches the model's heads and head_dim)
    x = _kv(heads=info.num_kv_heads, head_dim=info.head_dim)
    method = factory(info.num_kv_heads, info.head_dim, x)
    t = KVTransform.uniform(info.num_layers, method, method, sink_tokens=1)
    with torch.no_grad(), transformed_attention(model, t):
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
