"""Projections (``--method pca|svd``): the transform, the bit allocator, the fit on tiny models, the artifact and
``--resolve``, and the Palu equivalence of the ``svd`` basis."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvtool.artifacts import read_artifact, write_artifact
from kvtool.calibration import transform_of
from kvtool.calibrators import resolve_budget
from kvtool.calibrators.bit_allocation import allocate_bits
from kvtool.calibrators.fisher import calibration_windows
from kvtool.calibrators.projection import (
    KINDS,
    OPTION_BITS,
    Budget,
    ProjectionCalibration,
    allocate,
    fit_projection,
    projection_artifact,
)
from kvtool.cli.app import app
from kvtool.errors import ArtifactError, UsageError
from kvtool.quantizers.projection import ProjectionQuantizer

runner = CliRunner()

# -- the allocator ---------------------------------------------------------------------------------------------------


def _brute(dist: torch.Tensor, bits: torch.Tensor, weight: torch.Tensor, budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(range(len(bits)), repeat=dist.shape[0]):
        cost = sum(float(weight[n] * bits[o]) for n, o in enumerate(combo))
        if cost <= budget + 1e-9:
            best = min(best, sum(float(dist[n, o]) for n, o in enumerate(combo)))
    return best


def _cost(pick: torch.Tensor, bits: torch.Tensor, weight: torch.Tensor) -> float:
    return float((weight.double() * bits.double()[pick]).sum())


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_on_convex_curves(seed: int) -> None:
    """Gaussian-like distortion ``σ² 4^-b`` (convex in b), unit weights: greedy water-filling is exactly optimal for
    every integer budget; compare with brute force."""
    gen = torch.Generator().manual_seed(seed)
    var = torch.rand(4, generator=gen, dtype=torch.float64) * 10
    bits = torch.tensor([0.0, 1, 2, 3, 4])
    dist = var[:, None] * 4.0 ** (-bits.double()[None, :])
    w = torch.ones(4)
    for budget in range(0, 17):
        pick = allocate_bits(dist, bits, w, float(budget))
        assert _cost(pick, bits, w) <= budget
        assert float(dist.gather(1, pick[:, None]).sum()) == pytest.approx(_brute(dist, bits, w, budget))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_within_one_step_of_optimal(seed: int) -> None:
    """Arbitrary (non-convex) distortion and weights: the budget is met, and the result is at least as good as the
    optimum with one largest step less budget (the Lagrangian guarantee)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.tensor([0.0, 1, 2, 4, 8])
    dist = torch.rand(4, 5, generator=gen, dtype=torch.float64).sort(dim=1, descending=True).values * 5
    w = torch.randint(1, 4, (4,), generator=gen).double()
    max_step = float(w.max() * bits.max())
    previous = float("inf")
    for budget in range(0, 70, 3):
        pick = allocate_bits(dist, bits, w, float(budget))
        got = float(dist.gather(1, pick[:, None]).sum())
        assert _cost(pick, bits, w) <= budget
        assert got <= _brute(dist, bits, w, budget - max_step) + 1e-9
        assert got <= previous + 1e-12  # more budget never hurts
        previous = got


def test_allocation_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        allocate_bits(torch.zeros(2, 2), torch.tensor([1.0, 2.0]), torch.ones(2), 4.0)


# -- the transform ------------------------------------------------------------------------------------------------


def _random_quantizer(granularity: str, bits: float, heads: int = 2, head_dim: int = 8) -> ProjectionQuantizer:
    g, d = (heads, head_dim) if granularity == "head" else (1, heads * head_dim)
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(g, d, d, generator=gen))[0]
    b = torch.full((g, d), float(bits))
    return ProjectionQuantizer(
        heads, head_dim, granularity, mean=torch.randn(g, d, generator=gen), basis=basis, bits=b,
        lo=torch.full((g, d), -4.0), step=torch.full((g, d), 8.0 / 2**bits if bits <= 8 else 0.0),
    )  # fmt: skip


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_fp16_components_reconstruct(granularity: str) -> None:
    q = _random_quantizer(granularity, 16)
    x = torch.randn(1, 2, 5, 8)
    assert torch.allclose(q.apply(x), x, atol=2e-3)
    assert q.cost(8, 5).all_in == 16


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_dropped_components_give_the_mean(granularity: str) -> None:
    q = _random_quantizer(granularity, 0)
    y = q.apply(torch.randn(1, 2, 5, 8))
    assert torch.allclose(q.to_blocks(y), q.mean[None, :, None, :].expand_as(q.to_blocks(y)), atol=1e-5)
    assert q.cost(8, 5).all_in == 0


@pytest.mark.parametrize("granularity", ["head", "layer"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_symbols_in_range_and_decode_matches_apply(granularity: str, bits: int) -> None:
    q = _random_quantizer(granularity, bits)
    x = torch.randn(2, 2, 7, 8) * 3
    c = q.coefficients(x)
    s = q.symbols(c)
    assert s.dtype == torch.int32 and int(s.min()) >= 0 and int(s.max()) <= 2**bits - 1
    assert torch.equal(q.reconstruct(q.dequantize(s), x.dtype), q.apply(x))
    # Within the grid the error is at most half a step per component.
    inside = (c > -4) & (c < 4)
    assert bool(((q.dequantize(s) - c).abs()[inside] <= 4.0 / 2**bits + 1e-5).all())


def test_to_blocks_round_trip() -> None:
    x = torch.randn(2, 3, 4, 5)
    for g in ("head", "layer"):
        q = ProjectionQuantizer(3, 5, g)
        assert torch.equal(q.from_blocks(q.to_blocks(x)), x)
    assert ProjectionQuantizer(3, 5, "layer").to_blocks(x)[0, 0, 1].tolist() == x[0, :, 1].reshape(-1).tolist()


def test_bad_bits_rejected() -> None:
    with pytest.raises(ValueError):
        ProjectionQuantizer(1, 4, "head", bits=torch.full((1, 4), 12.0))


# -- the fit --------------------------------------------------------------------------------------------------------

CFG = ProjectionCalibration(num_seqs=2, seq_len=64, table_tokens=96)


@pytest.fixture(scope="module")
def fitted(tiny_llama):
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    return tiny_llama, ids, fit_projection(tiny_llama.model, tiny_llama.info, ids, CFG)


def test_bases_are_orthonormal_sorted_and_deterministic(fitted) -> None:
    tiny, ids, table = fitted
    again = fit_projection(tiny.model, tiny.info, ids, CFG)
    for k in KINDS:
        b = table.basis[k]
        eye = torch.eye(b.shape[-1]).expand_as(b)
        assert torch.allclose(b.transpose(-1, -2) @ b, eye, atol=1e-5)
        ev = table.eigenvalues[k]
        assert bool((ev[..., :-1] >= ev[..., 1:] - 1e-6).all())
        assert torch.equal(again.basis[k], b) and torch.equal(again.distortion[k], table.distortion[k])
        d = table.distortion[k]
        assert d.shape[-1] == len(OPTION_BITS) and bool((d >= 0).all())
        # More bits, less error (up to the clipping grid's granularity); fp16 is nearly exact.
        assert bool((d[..., 8] <= d[..., 1] + 1e-9).all()) and bool((d[..., -1] <= d[..., 4] + 1e-9).all())


def test_pca_mean_is_the_data_mean_and_svd_has_none(fitted, tiny_llama) -> None:
    tiny, ids, table = fitted
    assert table.mean["k"].abs().max() > 0
    svd = fit_projection(tiny.model, tiny.info, ids, ProjectionCalibration(method="svd", num_seqs=2, seq_len=64))
    assert torch.equal(svd.mean["k"], torch.zeros_like(svd.mean["k"]))


@pytest.mark.parametrize("target", [1.0, 2.0, 3.0, 5.0])
def test_allocation_meets_bit_budget(fitted, target: float) -> None:
    tiny, _, table = fitted
    art, t = projection_artifact({**_model(tiny)}, CFG, {}, table, Budget(bits=target))
    assert t.bits(tiny.info, CFG.seq_len)["all_in"] <= target + 1e-9
    assert art.extra["bits"]["all_in"] <= target + 1e-9


def test_more_bits_less_error(fitted) -> None:
    tiny, _, table = fitted
    x = torch.randn(1, tiny.info.num_kv_heads, 40, tiny.info.head_dim)
    errs = []
    for target in (1.0, 2.0, 4.0, 8.0):
        bits = allocate(table, Budget(bits=target))
        total = sum(float(table.distortion[k].gather(-1, _option(bits[k])).sum()) for k in KINDS)
        errs.append(total)
    assert errs == sorted(errs, reverse=True)
    assert x.shape[1] == tiny.info.num_kv_heads


def _option(bits: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(OPTION_BITS.float(), bits.float().contiguous())[..., None]


@pytest.mark.parametrize("kinds", ["k", "v", "kv"])
def test_rank_budget(fitted, kinds: str) -> None:
    tiny, _, table = fitted
    bits = allocate(table, Budget(rank_fraction=0.5, kinds=kinds))
    for k in KINDS:
        assert set(bits[k].unique().tolist()) <= {0.0, 16.0}
        if k not in kinds:
            assert bool((bits[k] == 16).all())
    kept = torch.cat([(bits[k] > 0).reshape(-1).float() for k in kinds]).mean()
    assert float(kept) <= 0.5 + 1e-9 and float(kept) > 0.4


def test_budget_parse() -> None:
    assert Budget.parse("2.5") == Budget(bits=2.5)
    assert Budget.parse("r0.25k") == Budget(rank_fraction=0.25, kinds="k")
    assert Budget.parse("r0.5") == Budget(rank_fraction=0.5, kinds="kv")
    with pytest.raises(UsageError):
        Budget.parse("rx")


def _model(tiny) -> dict:
    digests = {"config_digest": "sha256:" + "0" * 64, "weights_digest": "sha256:" + "1" * 64}
    return {"id": "tiny", **digests, "arch": tiny.info.to_dict()}


def test_artifact_round_trip_and_resolve(fitted, tmp_path: Path) -> None:
    tiny, _, table = fitted
    art, t = projection_artifact(_model(tiny), CFG, {}, table, Budget(bits=2.0))
    path = tmp_path / "p.kvcal.safetensors"
    write_artifact(path, art)
    back = read_artifact(path)
    t2 = transform_of(back)
    x = torch.randn(1, tiny.info.num_kv_heads, 12, tiny.info.head_dim)
    assert torch.equal(t2.keys[1].apply(x), t.keys[1].apply(x))
    assert torch.equal(t2.values[0].apply(x), t.values[0].apply(x))
    same, _ = resolve_budget(back, "2.0")
    write_artifact(tmp_path / "same.kvcal.safetensors", same)
    assert (tmp_path / "same.kvcal.safetensors").read_bytes() == path.read_bytes()
    other, t3 = resolve_budget(back, "r0.25v")
    assert other.extra["projection"]["budget"] == {"bits": None, "rank_fraction": 0.25, "kinds": "v", "level": None}
    assert all(bool((q.bits == 16).all()) for q in t3.keys)
    rows = other.extra["projection"]["spectrum"]["k"]
    assert len(rows) == tiny.info.num_layers and all(r["rank"] == r["dims"] for r in rows)


def test_resolve_rejects_a_projection_table_that_is_missing(fitted) -> None:
    tiny, _, table = fitted
    art, _ = projection_artifact(_model(tiny), CFG, {}, table, Budget(bits=2.0))
    del art.tensors["proj_k_distortion"]
    with pytest.raises(ArtifactError):
        resolve_budget(art, "3")


def test_config_validation() -> None:
    with pytest.raises(UsageError):
        ProjectionCalibration(target_bits=2.0, target_rank_fraction=0.5)
    with pytest.raises(UsageError):
        ProjectionCalibration(target_bits=None)
    with pytest.raises(UsageError):
        ProjectionCalibration(granularity="group")


def test_fit_on_every_architecture(tiny) -> None:
    """Every tiny architecture (sliding windows, qkv bias, k_norm, mixed layer types) fits and runs."""
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(0))
    cfg = ProjectionCalibration(granularity="head", num_seqs=2, seq_len=48, table_tokens=64)
    table = fit_projection(tiny.model, tiny.info, ids, cfg)
    _, t = projection_artifact(_model(tiny), cfg, {}, table, Budget(bits=3.0))
    from kvtool.eval.harness import perplexity

    base = perplexity(tiny.model, ids[:96], 48)
    got = perplexity(tiny.model, ids[:96], 48, t)
    assert got.ppl == pytest.approx(base.ppl, rel=0.5) and got.ppl != base.ppl


def test_svd_basis_is_palus_whitened_svd(tiny_llama) -> None:
    """For a linear key projection ``k = W h``, the uncentred eigenbasis of the keys spans the top left singular
    vectors of ``W S`` with ``S Sᵀ = H Hᵀ`` (Palu's activation-aware SVD). The test reads the Llama module names
    to get ``W`` and ``H``; the library never does."""
    model, info = tiny_llama.model, tiny_llama.info
    ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(0))
    cfg = ProjectionCalibration(method="svd", granularity="head", num_seqs=2, seq_len=64, sink_tokens=0)
    table = fit_projection(model, info, ids, cfg)
    inputs: list[torch.Tensor] = []
    attn = model.model.layers[0].self_attn
    handle = attn.k_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()[0]))
    try:
        with torch.no_grad():
            for w in calibration_windows(ids, cfg.seq_len, cfg.num_seqs, cfg.seed):
                model(w[None])
    finally:
        handle.remove()
    h = torch.cat(inputs).double()  # (T, hidden)
    s = torch.linalg.cholesky(h.T @ h + 1e-9 * torch.eye(h.shape[1], dtype=torch.float64))
    weight = attn.k_proj.weight.double()  # (heads * head_dim, hidden)
    r = 4
    for head in range(info.num_kv_heads):
        w_h = weight[head * info.head_dim : (head + 1) * info.head_dim]
        u = torch.linalg.svd(w_h @ s).U[:, :r]
        ours = table.basis["k"][0, head, :, :r].double()
        assert torch.allclose(ours @ ours.T, u @ u.T, atol=1e-3)


# -- the CLI -----------------------------------------------------------------------------------------------------


def test_cli_pca_and_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, text_file: Path):
    monkeypatch.setenv("KVTOOL_HOME", str(tmp_path / "kvhome"))
    out = tmp_path / "p.kvcal.safetensors"
    args = ["calibrate", str(tiny_model_dir), "--text", str(text_file), "--num-seqs", "2", "--seq-len", "32"]
    r = runner.invoke(app, [*args, "--method", "pca", "--target-bits", "2.5", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["method"] == "ProjectionCalibration" and doc["all_in_bits"] <= 2.5
    assert len(doc["spectrum"]["k"]) == 2
    ins = runner.invoke(app, ["inspect", str(out), "--json"])
    assert ins.exit_code == 0, ins.stderr
    rows = json.loads(ins.stdout)["layers"]
    assert "K rank" in rows[0] and "V energy" in rows[0]
    res = tmp_path / "r.kvcal.safetensors"
    r2 = runner.invoke(app, ["calibrate", "--resolve", str(out), "--target-rank-fraction", "0.5", "-o", str(res)])
    assert r2.exit_code == 0, r2.stderr
    assert read_artifact(res).extra["projection"]["budget"]["rank_fraction"] == 0.5
    bad = runner.invoke(app, [*args, "--method", "pca", "--target-bits", "2", "--target-rank-fraction", "0.5"])
    assert bad.exit_code == 2 and "exactly one" in bad.stderr
    bad = runner.invoke(app, [*args, "--method", "nuq", "--target-rank-fraction", "0.5"])
    assert bad.exit_code == 2


def test_entropy_coded_levels_in_attention(fitted) -> None:
    """``@L<n>``: the codec level's quantization as an in-attention transform; its bits are the calibrated rate,
    which grows with the level, and so does fidelity."""
    tiny, ids, table = fitted
    art, _ = projection_artifact(_model(tiny), CFG, {}, table, Budget(bits=2.0))
    x = torch.randn(1, tiny.info.num_kv_heads, 30, tiny.info.head_dim)
    errs, bits = [], []
    for n in range(len(table.codec_levels)):
        _, t = resolve_budget(art, f"L{n}")
        b = t.bits(tiny.info, CFG.seq_len)
        bits.append(b["all_in"])
        y = t.values[0].apply(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        errs.append(float((y - x).square().mean()))
        back = type(t).from_dict(t.to_dict()).bind(t.stacked_tensors())
        assert torch.equal(back.keys[1].apply(x), t.keys[1].apply(x))
    assert bits == sorted(bits) and bits[-1] > bits[0]
    with pytest.raises(UsageError):
        resolve_budget(art, "L99")
