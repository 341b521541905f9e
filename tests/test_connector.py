"""The engine-connector API (``kvtool.encode_kv`` / ``kvtool.decode_kv``): K/V already in memory → ``.kvz``
bytes → per-layer K/V, on every architecture of the shared tiny matrix (sliding windows shorter than the prefix
included), with the same bytes as the file path and the same tensors from a path, bytes or a tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import TinyLM

import kvtool
from kvtool.codecs.kvz import CodecSettings, encode_cache, prefill_cache
from kvtool.errors import ArtifactError, UsageError


def _ids(n: int = 70) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(3))


def test_lossless_round_trip_equals_the_cache(tiny: Any) -> None:
    """Lossless: every layer's decoded K/V equal the cached ones exactly, in the cache's geometry."""
    ids = _ids()
    cache = prefill_cache(tiny.model, ids)
    blob = kvtool.encode_kv(TinyLM(tiny), cache, ids, settings=CodecSettings(mode="lossless", chunk_tokens=32))
    layers = kvtool.decode_kv(blob, tiny.model)
    assert len(layers) == len(cache.layers)
    for (k, v), layer in zip(layers, cache.layers, strict=True):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_bytes_equal_the_file_and_every_source_decodes_the_same(tiny_gemma3: Any, tmp_path: Path) -> None:
    ids = _ids(40)
    lm = TinyLM(tiny_gemma3)
    cache = prefill_cache(tiny_gemma3.model, ids)
    settings = CodecSettings(mode="adaptive", chunk_tokens=16, sink_tokens=2)
    path = tmp_path / "x.kvz"
    encode_cache(lm, ids, cache, settings, path)
    # per-layer tensors as a list (what an engine holds) give the same bytes as the cache object
    pairs = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    blob = kvtool.encode_kv(lm, pairs, ids, positions=torch.arange(40), settings=settings)
    assert blob == path.read_bytes()
    got = [kvtool.decode_kv(src, tiny_gemma3.model) for src in
           (path, str(path), blob, memoryview(blob), torch.frombuffer(bytearray(blob), dtype=torch.uint8))]  # fmt: skip
    for other in got[1:]:
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got[0], other, strict=True))
    # sliding layers come back with the positions they hold (window - 1), full ones with all of them
    assert [k.shape[2] for k, _ in got[0]] == [layer.keys.shape[2] for layer in cache.layers]


def test_encode_into_caller_buffer(tiny_llama: Any) -> None:
    """``encode_kv_into`` writes exactly ``encode_kv``'s bytes at the start of a tensor or a bytearray; a buffer
    too small is refused before anything is written."""
    ids = _ids()
    cache = prefill_cache(tiny_llama.model, ids)
    lm, settings = TinyLM(tiny_llama), CodecSettings(mode="adaptive", chunk_tokens=16)
    blob = kvtool.encode_kv(lm, cache, ids, settings=settings)
    buf = torch.full((len(blob) + 100,), 0xAB, dtype=torch.uint8)
    assert kvtool.encode_kv_into(buf, lm, cache, ids, settings=settings) == len(blob)
    assert bytes(buf[: len(blob)].numpy()) == blob and bool((buf[len(blob) :] == 0xAB).all())
    arr = bytearray(len(blob))
    assert kvtool.encode_kv_into(arr, lm, cache, ids, settings=settings) == len(blob) and bytes(arr) == blob
    small = bytearray(b"\x01" * (len(blob) - 1))
    with pytest.raises(UsageError, match=f"needs {len(blob)}"):
        kvtool.encode_kv_into(small, lm, cache, ids, settings=settings)
    assert small == bytearray(b"\x01" * (len(blob) - 1))
    with pytest.raises(UsageError, match="writable"):
        kvtool.encode_kv_into(memoryview(blob), lm, cache, ids, settings=settings)
    with pytest.raises(UsageError, match="uint8"):
        kvtool.encode_kv_into(torch.zeros(len(blob)), lm, cache, ids, settings=settings)
    with pytest.raises(UsageError, match="contiguous"):
        kvtool.encode_kv_into(np.zeros((2, 2 * len(blob)), dtype=np.uint8)[:, ::2], lm, cache, ids, settings=settings)
    with pytest.raises(UsageError, match="buffer"):
        kvtool.encode_kv_into(12, lm, cache, ids, settings=settings)  # type: ignore[arg-type]


def test_decode_into_caller_buffers(tiny_llama: Any) -> None:
    ids = _ids()
    cache = prefill_cache(tiny_llama.model, ids)
    blob = kvtool.encode_kv(TinyLM(tiny_llama), cache, ids, settings=CodecSettings(mode="lossless"))
    out = [(torch.full_like(layer.keys, 7.0), torch.full_like(layer.values, 7.0)) for layer in cache.layers]
    ret = kvtool.decode_kv(blob, tiny_llama.model, out=out)
    assert ret is out
    assert all(torch.equal(k, layer.keys) and torch.equal(v, layer.values)
               for (k, v), layer in zip(out, cache.layers, strict=True))  # fmt: skip
    wrong = [(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))] * len(out)
    with pytest.raises(UsageError, match="buffers must be"):
        kvtool.decode_kv(blob, tiny_llama.model, out=wrong)


def test_bare_model_fingerprint_and_refusals(tiny_llama: Any, tiny_mistral: Any) -> None:
    """A transformers model alone: its config and weights are digested; another model's file is refused, as are
    positions that do not start at 0 and K/V of the wrong shape."""
    ids = _ids()
    cache = prefill_cache(tiny_llama.model, ids)
    blob = kvtool.encode_kv(tiny_llama.model, cache, ids)
    layers = kvtool.decode_kv(blob, tiny_llama.model)
    assert torch.allclose(layers[0][1], cache.layers[0].values, atol=0.1 * float(cache.layers[0].values.abs().max()))
    with pytest.raises(ArtifactError, match="config_digest differs"):
        kvtool.decode_kv(blob, tiny_mistral.model)
    with pytest.raises(UsageError, match="positions"):
        kvtool.encode_kv(tiny_llama.model, cache, ids, positions=torch.arange(1, 71))
    with pytest.raises(UsageError, match="layer 0"):
        kvtool.encode_kv(tiny_llama.model, [(torch.zeros(3, 5, 16), torch.zeros(3, 5, 16))] * 4, ids)
    damaged = bytearray(blob)
    damaged[-50] ^= 0x10
    with pytest.raises(ArtifactError, match="corrupted"):
        kvtool.decode_kv(bytes(damaged), tiny_llama.model)
