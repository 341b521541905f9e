"""Non-uniform datatypes (KVQuant): the quantizer, the weighted k-means, the calibration and its artifact."""

from __future__ import annotations

import math

import pytest
import torch

from kvtool.calibration import calibration_artifact, transform_of
from kvtool.calibrators.nuq import NUQCalibration, fit_nuq, weighted_kmeans_1d
from kvtool.quantizers.nonuniform import NonUniformQuantizer, normal_float_table
from kvtool.quantizers.nonuniform import NonUniformQuantizer as N


def _x(seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(seed))
    x[..., 3] *= 8  # an outlier channel
    return x


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normal_float_table(bits: int) -> None:
    t = normal_float_table(bits)
    assert t.shape == (1 << bits,) and torch.all(t[1:] > t[:-1])
    assert t.min() == -1 and t.max() == 1
    torch.testing.assert_close(t, -t.flip(0))  # symmetric


def test_decoded_values_are_levels_or_exact_outliers() -> None:
    """Every reconstructed element is either a LUT level mapped back (``level * range + zero``) or the input
    rounded to fp16 (an outlier); at most ``round(frac * tokens * heads * head_dim)`` outliers per block of tokens."""
    x = _x()
    q = N(3, "token", heads=2, head_dim=16, outlier_frac=0.1, table="nf")
    y = q.apply(x)
    a, zero, rng = q.normalize(x)
    out = q.outlier_mask(a)
    assert int(out.sum()) <= round(0.1 * 40 * 32)  # one block of 40 tokens x 32 elements
    assert torch.equal(y[out], x[out].half().float())
    level = ((y - zero) / rng)[~out]
    dist = (level[:, None] - q.levels()[None]).abs().min(dim=1).values
    assert float(dist.max()) < 1e-5


@pytest.mark.parametrize("axis", ["token", "channel"])
def test_error_decreases_with_bits(axis: str) -> None:
    x = _x()
    flat = x[0].permute(1, 0, 2).reshape(40, -1)
    kw = {}
    if axis == "channel":
        kw = {"thr_lo": flat.quantile(0.01, 0).reshape(2, 16), "thr_hi": flat.quantile(0.99, 0).reshape(2, 16)}
    errs = [float((N(b, axis, 2, 16, table="nf", **kw).apply(x) - x).square().mean()) for b in (2, 3, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > errs[3]


def test_outliers_make_the_rest_finer() -> None:
    """Keeping 1 outlier per token in fp16 lowers the error of a per-token 3-bit code on data with one huge
    element per token (the range is set by the inliers)."""
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(1))
    x[0, 0, :, 5] = 50.0
    none = float((N(3, "token", 2, 16, outlier_frac=0.0, table="nf").apply(x) - x).square().mean())
    some = float((N(3, "token", 2, 16, outlier_frac=1 / 32, table="nf").apply(x) - x).square().mean())
    assert some < none / 10


def test_cost_accounting() -> None:
    """n = heads * head_dim = 192: code bits + 1% x (16-bit value + 8-bit position) + 8-bit count per token, plus
    an fp16 zero and range per token on the token axis."""
    n = 3 * 64
    tok = N(3, "token", 3, 64, outlier_frac=0.01, table="nf").cost(64, 100)
    assert tok.nominal == 3
    assert tok.all_in == pytest.approx(3 + 0.01 * (16 + 8) + 8 / n + 32 / n)
    chan = N(3, "channel", 3, 64, outlier_frac=0.01, table="nf").cost(64, 100)
    assert chan.all_in == pytest.approx(3 + 0.01 * 24 + 8 / n)
    assert N(3, "token", 3, 64, outlier_frac=0.0, table="nf").cost(64, 100).all_in == pytest.approx(3 + 32 / n)


def test_weighted_kmeans_recovers_clusters() -> None:
    centres = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    weights = torch.zeros_like(centres)
    for c in (-0.6, 0.1, 0.7):
        weights[(centres - c).abs().argmin()] = 1.0
    levels = weighted_kmeans_1d(centres, weights, 3, 50)
    torch.testing.assert_close(levels, torch.tensor([-0.6, 0.1, 0.7]), atol=1e-3, rtol=0)


def test_weighted_kmeans_follows_the_weights() -> None:
    """With all the weight on the right half, most levels move there."""
    centres = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    weights = torch.where(centres > 0, 1.0, 1e-3).double()
    assert int((weighted_kmeans_1d(centres, weights, 8, 50) > 0).sum()) >= 6


@pytest.fixture(scope="module")
def fitted(tiny_llama):
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    cfg = NUQCalibration(bits=[2, 3], num_seqs=2, seq_len=64, outlier_frac=0.05)
    return cfg, fit_nuq(tiny_llama.model, tiny_llama.info, ids, cfg)


def test_fit_gives_one_transform_per_bit_width(fitted, tiny_llama) -> None:
    cfg, transforms = fitted
    assert sorted(transforms) == [2, 3]
    for b, t in transforms.items():
        assert t.keys_pre_rope and t.sink_tokens == cfg.sink_tokens
        for k, v in zip(t.keys, t.values, strict=True):
            assert k.axis == "channel" and v.axis == "token" and k.bits == v.bits == b
            assert k.lut.shape == (1 << b,) and torch.all(k.lut[1:] >= k.lut[:-1])
            assert k.thr_lo.shape == (2, 16) and torch.all(k.thr_hi >= k.thr_lo)
            assert float(k.lut.abs().max()) <= 1.0 + 1e-6


def test_fit_is_deterministic(fitted, tiny_llama) -> None:
    cfg, transforms = fitted
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    again = fit_nuq(tiny_llama.model, tiny_llama.info, ids, cfg)
    for b in transforms:
        for t1, t2 in zip(transforms[b].keys + transforms[b].values, again[b].keys + again[b].values, strict=True):
            assert torch.equal(t1.lut, t2.lut)


def test_artifact_round_trip_binds_tables(fitted, tiny_llama, tmp_path) -> None:
    """Tables and thresholds are stacked tensors (``k_lut [L, 2^b]``, ``k_thr_lo [L, H, D]``), not JSON; reading
    the artifact rebinds them so the transform reconstructs exactly as before."""
    from kvtool.artifacts import read_artifact, write_artifact

    cfg, transforms = fitted
    model = {"id": "tiny", "config_digest": "sha256:" + "0" * 64, "weights_digest": "sha256:" + "1" * 64}
    model["arch"] = tiny_llama.info.to_dict()
    art = calibration_artifact(model, cfg, {}, transforms[3], {}, {}, 64)
    assert art.tensors["k_lut"].shape == (2, 8) and art.tensors["k_thr_lo"].shape == (2, 2, 16)
    assert "lut" not in str(art.extra["transform"])
    path = tmp_path / "n.kvcal.safetensors"
    write_artifact(path, art)
    back = transform_of(read_artifact(path))
    x = _x()
    for a, b in zip(transforms[3].keys + transforms[3].values, back.keys + back.values, strict=True):
        assert torch.equal(a.apply(x), b.apply(x))


def test_calibrated_beats_normal_float_on_real_kv(fitted, tiny_llama) -> None:
    """On the tiny model's own (held-out) keys and values, the fitted 2-bit tables give a lower Fisher-free MSE than
    NormalFloat with the same normalisation, for most layers (k-means minimises that error on the calibration)."""
    from kvtool.capture import capture_kv

    _, transforms = fitted
    cap = capture_kv(tiny_llama.model, torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(9)))
    wins = 0
    for i, layer in enumerate(cap.layers):
        for fitted_q, x in ((transforms[2].keys[i], layer.keys_pre_rope), (transforms[2].values[i], layer.values)):
            nf = N(2, fitted_q.axis, 2, 16, fitted_q.outlier_frac, "nf", thr_lo=fitted_q.thr_lo, thr_hi=fitted_q.thr_hi)
            wins += float((fitted_q.apply(x) - x).square().mean()) <= float((nf.apply(x) - x).square().mean())
    assert wins >= math.ceil(0.5 * 2 * len(cap.layers))


def test_outlier_budget_is_per_block_of_tokens() -> None:
    """Beyond-range elements concentrated in a few tokens are all kept while the block's budget allows (a per-token
    cap would drop them), and never more than the budget: 1 % of 256 tokens x 32 elements = 82 per block."""
    from kvtool.quantizers.nonuniform import OUTLIER_BLOCK

    x = torch.randn(1, 2, 2 * OUTLIER_BLOCK, 16, generator=torch.Generator().manual_seed(2)).clamp(-2, 2)
    lo, hi = torch.full((2, 16), -2.0), torch.full((2, 16), 2.0)
    x[0, :, 5, :] = 9.0  # token 5: all 32 elements beyond range
    x[0, :, 300:310, :] = 9.0  # tokens 300..309 of the second block: 320 elements beyond range
    q = NonUniformQuantizer(3, "channel", 2, 16, 0.01, table="nf", thr_lo=lo, thr_hi=hi)
    out = q.outlier_mask(q.normalize(x)[0])
    budget = round(0.01 * OUTLIER_BLOCK * 32)
    assert int(out[:, :, :OUTLIER_BLOCK].sum()) == 32  # all of token 5: within the first block's budget
    assert int(out[:, :, OUTLIER_BLOCK:].sum()) == budget  # capped at the second block's budget
