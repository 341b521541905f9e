"""Sliding-window models whose window is shorter than the prefix: every restore path gives back the cache a fresh
prefill would have left.

The tiny gemma3 (window 8 on 2 of its 4 layers, different RoPE theta per layer type) and mistral (window 8 on every
layer) are fed 40- and 150-token prefixes, so sliding layers hold only the last 7 tokens and early chunks hold no
token of them at all. Lossless files must continue greedy generation token for token like a fresh prefill; lossy
ones must give a cache of the same geometry (per-layer lengths, sequence length, positions) and a continuation
close to the fresh one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import TinyLM

from kvtool.artifacts import read_artifact, write_artifact
from kvtool.cache_restore import restore_cache
from kvtool.calibrators.projection import Budget, ProjectionCalibration, fit_projection, projection_artifact
from kvtool.capture import capture_kv
from kvtool.codecs.kvz import CodecSettings, KvzFile, decode_kvz, encode_prefix, load_cache
from kvtool.eval.codec_rows import CodecRow
from kvtool.eval.harness import continuation_quality
from kvtool.models import cache_kwargs
from kvtool.texts import book

SLIDING = ("gemma3", "mistral")


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=SLIDING)
def sliding(request: pytest.FixtureRequest, tiny_gemma3: Any, tiny_mistral: Any) -> Any:
    return {"gemma3": tiny_gemma3, "mistral": tiny_mistral}[request.param]


@pytest.fixture(scope="module")
def calibrations(tiny_gemma3: Any, tiny_mistral: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A PCA calibration (with codec levels) of each sliding tiny model, written and read back as a user's is."""
    out = {}
    cfg = ProjectionCalibration(method="pca", num_seqs=2, seq_len=48)
    for tiny in (tiny_gemma3, tiny_mistral):
        table = fit_projection(tiny.model, tiny.info, _ids(200, seed=7), cfg)
        model = {"id": f"tiny-{tiny.arch}", "config_digest": tiny.info.digest(), "weights_digest": "sha256:" + "2" * 64,
                 "arch": tiny.info.to_dict()}  # fmt: skip
        art, _ = projection_artifact(model, cfg, {}, table, Budget(bits=4.0))
        path = tmp_path_factory.mktemp("cal") / f"{tiny.arch}.kvcal.safetensors"
        write_artifact(path, art)
        out[tiny.arch] = read_artifact(path)
    return out


def _greedy(model: Any, ids: torch.Tensor, cache: Any = None) -> torch.Tensor:
    new = torch.tensor([5, 6, 7])
    full = torch.cat([ids, new])[None]
    kwargs = {} if cache is None else cache_kwargs(model, cache)
    with torch.no_grad():
        out = model.generate(full, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(full), **kwargs)
    return out[0, full.shape[1] :]


def test_window_is_shorter_than_the_prefix(sliding: Any) -> None:
    """The premise of this file: some layer keeps fewer tokens than the prefix."""
    cap = capture_kv(sliding.model, _ids(40))
    assert min(layer.keys.shape[-2] for layer in cap.layers) == sliding.info.sliding_window - 1 < 40


@pytest.mark.parametrize("tokens", [40, 150])
def test_lossless_load_cache_generates_like_a_fresh_prefill(sliding: Any, tokens: int, tmp_path: Path) -> None:
    ids = _ids(tokens)
    encode_prefix(TinyLM(sliding, "2"), ids, CodecSettings(mode="lossless", chunk_tokens=16), tmp_path / "x.kvz")
    cache, got_ids = load_cache(tmp_path / "x.kvz", sliding.model)
    assert torch.equal(got_ids, ids)
    assert cache.get_seq_length() == tokens
    assert torch.equal(_greedy(sliding.model, ids, cache), _greedy(sliding.model, ids))


def test_restored_cache_matches_the_prefilled_one_layer_by_layer(sliding: Any) -> None:
    """restore_cache from the prefilled tensors reproduces every layer's length, held tokens and mask sizes."""
    ids = _ids(40)
    ref = capture_kv(sliding.model, ids).cache
    got = restore_cache(sliding.model, [(layer.keys, layer.values) for layer in ref.layers], 40)
    for a, b in zip(got.layers, ref.layers, strict=True):
        assert a.get_seq_length() == b.get_seq_length() == 40
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.get_mask_sizes(3) == b.get_mask_sizes(3)


@pytest.mark.parametrize("mode", ["adaptive", "calibrated"])
def test_lossy_files_restore_the_right_geometry(sliding: Any, mode: str, calibrations: dict[str, Any],
                                                tmp_path: Path) -> None:  # fmt: skip
    """Adaptive and calibrated files of a prefix longer than the window (with chunks in which the sliding layers
    hold no token) encode, decode and continue; the continuation stays close to the fresh one."""
    ids = _ids(150)
    cal = calibrations[sliding.arch] if mode == "calibrated" else None
    settings = CodecSettings(mode=mode, level=-1, quality=0.05, chunk_tokens=32)
    encode_prefix(TinyLM(sliding, "2"), ids, settings, tmp_path / "x.kvz", cal)
    cache, _ = load_cache(tmp_path / "x.kvz", sliding.model, cal)
    ref = capture_kv(sliding.model, ids).cache
    for a, b in zip(cache.layers, ref.layers, strict=True):
        assert a.get_seq_length() == 150 and a.keys.shape == b.keys.shape
        assert a.get_mask_sizes(3) == b.get_mask_sizes(3)
    row = CodecRow(f"kvz-{mode}", TinyLM(sliding, "2"), settings, cal)
    (res,) = continuation_quality(sliding.model, _ids(200, seed=3), [row], prefix_len=150, cont_len=20)
    assert res.kl < 0.05 and res.top1 > 0.8, res


def test_lossless_pre_rope_keys_are_the_captured_ones(sliding: Any, tmp_path: Path) -> None:
    """decode with keep_pre_rope on a lossless file gives the pre-RoPE keys (RoPE inverted), deterministically."""
    ids = _ids(40)
    encode_prefix(TinyLM(sliding, "2"), ids, CodecSettings(mode="lossless", chunk_tokens=16), tmp_path / "x.kvz")
    first = decode_kvz(KvzFile(tmp_path / "x.kvz"), sliding.model, keep_pre_rope=True)
    second = decode_kvz(KvzFile(tmp_path / "x.kvz"), sliding.model, keep_pre_rope=True)
    cap = capture_kv(sliding.model, ids)
    for a, b, c in zip(first, second, cap.layers, strict=True):
        assert torch.equal(a.keys_pre_rope, b.keys_pre_rope)
        assert torch.allclose(a.keys_pre_rope, c.keys_pre_rope, atol=1e-5, rtol=1e-5)


def test_bench_rows_on_a_sliding_model(sliding: Any) -> None:
    """The bench's lossless-equivalent row (fp16 cast, then lossless) continues like the fp16 cache itself."""
    text_ids = _ids(220, seed=5)
    row = CodecRow("lossless", TinyLM(sliding, "2"), CodecSettings(mode="lossless", chunk_tokens=32))
    (res,) = continuation_quality(sliding.model, text_ids, [row], prefix_len=150, cont_len=30)
    assert res.kl < 1e-6 and res.top1 == 1.0, res


def test_real_text_prefix(tiny_gemma3: Any, tmp_path: Path) -> None:
    """Book text through the tiny model's vocabulary: the same holds for a non-random prefix."""
    ids = torch.tensor([ord(c) % 128 for c in book("persuasion")[:300]])
    encode_prefix(TinyLM(tiny_gemma3, "2"), ids, CodecSettings(mode="lossless", chunk_tokens=64), tmp_path / "x.kvz")
    cache, _ = load_cache(tmp_path / "x.kvz", tiny_gemma3.model)
    assert torch.equal(_greedy(tiny_gemma3.model, ids, cache), _greedy(tiny_gemma3.model, ids))


def test_a_failing_codec_row_is_reported_and_the_others_measured(tiny_gemma3: Any, calibrations: dict) -> None:
    """A codec row that cannot code this model's cache (a calibration made for another model) fails alone: the
    harness records why and still measures the rows after it."""
    lm = TinyLM(tiny_gemma3, "2")
    bad = CodecRow("kvz-wrong-calibration", lm, CodecSettings(mode="calibrated"), calibrations["mistral"])
    good = CodecRow("lossless", lm, CodecSettings(mode="lossless", chunk_tokens=32))
    failed, ok = continuation_quality(tiny_gemma3.model, _ids(220, seed=5), [bad, good], prefix_len=150, cont_len=30)
    assert failed.error is not None and "model" in failed.error and failed.num_predictions == 0
    assert ok.error is None and ok.top1 == 1.0
