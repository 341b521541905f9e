"""The ``kvtool`` serde inside LMCache's own serde machinery (LMCache 0.5.6 installed ``--no-deps``; CI installs it,
see the Makefile): built by LMCache's ``create_serde_processor`` from an L2 adapter's JSON config, round trips of
real SmolLM2 KV chunks through LMCache ``MemoryObj`` objects and its ``AsyncSerdeProcessor``, the record size
equal to the estimate LMCache sizes its buffers with, and damaged or foreign records refused through LMCache's
error path (a failed task: a cache miss)."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch

serde_mod = pytest.importorskip(
    "lmcache.v1.distributed.serde.factory", reason="LMCache >= 0.5.6 is not installed (make install puts it in CI)"
)
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey  # noqa: E402
from lmcache.v1.distributed.serde import AsyncSerdeProcessor  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat, TensorMemoryObj  # noqa: E402

import kvtool.integrations.lmcache as plugin  # noqa: E402
from kvtool.codecs.chunk_record import engine_layout, read_header  # noqa: E402
from kvtool.integrations.lmcache import objects  # noqa: E402

KEY = ObjectKey(chunk_hash=b"\x07" * 32, model_name="smollm2-135m", kv_rank=0)


@pytest.fixture(scope="module")
def real_chunks() -> torch.Tensor:
    """Two 256-token chunks of SmolLM2-135M's cache on Persuasion, as LMCache's MP server lays a chunk out:
    ``(2, L, T, kv_heads·head_dim)`` post-RoPE, bf16 (the serving dtype)."""
    from kvtool.codecs.encode import prefill_cache
    from kvtool.models import load_model
    from kvtool.texts import book

    lm = load_model("smollm2-135m", device="cpu")
    ids = lm.tokenizer(book("persuasion")[:12000], return_tensors="pt").input_ids[0][:512]
    cache = prefill_cache(lm.model, ids)
    kv = engine_layout(cache).to(torch.bfloat16)
    return torch.stack([kv[:, :, :256], kv[:, :, 256:]]).contiguous()


def _obj(shape: torch.Size, dtype: torch.dtype, fmt: MemoryFormat = MemoryFormat.KV_2LTD) -> TensorMemoryObj:
    return objects.memory_obj(shape, dtype, fmt)


def _processor(**kwargs: object) -> AsyncSerdeProcessor:
    """Built the way LMCache builds it: the ``serde`` object of an ``--l2-adapter`` spec → ``SerdeConfig`` →
    ``create_serde_processor``."""
    return objects.serde_from_spec({"type": "kvtool", **kwargs})


def _store(proc: AsyncSerdeProcessor, src: TensorMemoryObj, key: ObjectKey = KEY) -> tuple[bool, TensorMemoryObj]:
    ok, bufs = objects.store(proc, [src], [key])
    return ok, bufs[0]


def _load(proc: AsyncSerdeProcessor, buf: TensorMemoryObj, shape: torch.Size, dtype: torch.dtype,
          key: ObjectKey = KEY) -> tuple[bool, TensorMemoryObj]:  # fmt: skip
    dst = _obj(shape, dtype)
    return objects.load(proc, [buf], [dst], [key]), dst


def test_registered_with_lmcache_and_built_from_its_config() -> None:
    assert "kvtool" in serde_mod.get_registered_serde_types()
    plugin.register()  # idempotent: LMCache's own registry refuses a second registration of a name
    proc = _processor(bits=2.0, quality=0.5, model="smollm2-135m", max_workers=2)
    assert isinstance(proc, AsyncSerdeProcessor)
    proc.close()
    _processor(bits=1.3, outlier_tokens=4, outlier_z=4.0).close()
    for bad, match in [({"bitz": 2}, "unknown option"), ({"bits": 0}, "bits"), ({"bits": "2"}, "number"),
                       ({"backend": "gpu"}, "backend"), ({"max_workers": 0}, "max_workers"),
                       ({"device": "tpu"}, "device"), ({"outlier_z": 0}, "outlier_z"),
                       ({"outlier_tokens": 65}, "outlier_tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            _processor(**bad)


@pytest.mark.parametrize("bits", [2.0, 4.0])
def test_real_smollm2_chunks_round_trip(real_chunks: torch.Tensor, bits: float) -> None:
    proc = _processor(bits=bits, model="smollm2-135m")
    try:
        for chunk in real_chunks:
            src = _obj(chunk.shape, chunk.dtype)
            src.tensor.copy_(chunk)
            ok, buf = _store(proc, src)
            estimate = proc.estimate_serialized_size(MemoryLayoutDesc([chunk.shape], [chunk.dtype]))
            assert ok and buf.get_size() == estimate  # the bytes LMCache stores: exactly its estimate
            fields, used = read_header(buf.raw_tensor)
            assert used <= estimate <= math.ceil(bits * chunk.numel() / 8) + 8
            ok, dst = _load(proc, buf, chunk.shape, chunk.dtype)
            assert ok
            # uniform quantizer with step q·σ: RMS error <= q/√12 of each layer's RMS (+5 %: fp16 steps, bf16 output)
            err = (dst.tensor.float() - chunk.float()).pow(2).mean((2, 3)).sqrt() / chunk.float().pow(2).mean(
                (2, 3)).sqrt()  # fmt: skip
            assert float(err.max()) <= fields.quality / math.sqrt(12) * 1.05 + 4e-3
    finally:
        proc.close()


def test_damaged_foreign_and_truncated_records_are_cache_misses(real_chunks: torch.Tensor) -> None:
    chunk = real_chunks[0]
    proc = _processor(bits=2.0, model="smollm2-135m")
    try:
        src = _obj(chunk.shape, chunk.dtype)
        src.tensor.copy_(chunk)
        ok, buf = _store(proc, src)
        assert ok
        other_key = ObjectKey(chunk_hash=b"\x08" * 32, model_name="smollm2-135m", kv_rank=0)
        assert _load(proc, buf, chunk.shape, chunk.dtype, other_key)[0] is False
        assert _load(proc, buf, chunk.shape, torch.float16)[0] is False  # another dtype
        wrong = torch.Size([2, chunk.shape[1], 128, chunk.shape[3]])
        assert _load(proc, buf, wrong, chunk.dtype)[0] is False  # another shape
        for at in (0, 10, 200, read_header(buf.raw_tensor)[1] - 1):
            bad = _obj(buf.get_shape(), torch.uint8, MemoryFormat.BINARY_BUFFER)
            bad.raw_tensor.copy_(buf.raw_tensor)
            bad.raw_tensor[at] ^= 0x10
            ok, dst = _load(proc, bad, chunk.shape, chunk.dtype)
            assert ok is False and not bool(dst.raw_tensor.any())  # nothing decoded into the destination
        other_model = _processor(bits=2.0, model="another-model")
        try:
            assert _load(other_model, buf, chunk.shape, chunk.dtype)[0] is False
        finally:
            other_model.close()
    finally:
        proc.close()


def test_layouts_the_codec_does_not_code_are_stored_raw_and_checked() -> None:
    proc = _processor(bits=2.0)
    try:
        shape = torch.Size([1, 4, 16, 64])  # MLA-like: one latent per token, not K/V
        src = _obj(shape, torch.bfloat16)
        src.tensor.copy_(torch.randn(shape))
        ok, buf = _store(proc, src)
        assert ok and buf.get_size() == proc.estimate_serialized_size(MemoryLayoutDesc([shape], [torch.bfloat16]))
        ok, dst = _load(proc, buf, shape, torch.bfloat16)
        assert ok and torch.equal(dst.tensor, src.tensor)
        buf.raw_tensor[-1] ^= 1
        assert _load(proc, buf, shape, torch.bfloat16)[0] is False
    finally:
        proc.close()


def test_server_wrapper_registers_before_lmcache_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtool.integrations.lmcache import server

    seen: dict[str, Any] = {}

    def fake_run_module(name: str, run_name: str, alter_sys: bool) -> None:
        seen.update(name=name, run_name=run_name, argv=list(sys.argv),
                    registered="kvtool" in serde_mod.get_registered_serde_types())  # fmt: skip

    monkeypatch.setattr(server.runpy, "run_module", fake_run_module)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    spec = '{"type": "fs", "base_path": "/data", "serde": {"type": "kvtool"}}'
    assert server.main(["--l2-adapter", spec]) == 0
    module = "lmcache.v1.multiprocess.http_server"
    assert seen == {"name": module, "run_name": "__main__", "argv": [module, "--l2-adapter", spec], "registered": True}


def test_model_path_rotates_keys_back_and_binds_the_records(real_chunks: torch.Tensor) -> None:
    """With ``model_path`` the keys are coded rotated back within the chunk (the record's flag), records round-trip
    within the quantizer's bound, and a serde configured without those tables refuses them (and vice versa)."""
    chunk = real_chunks[1]
    with_rope = _processor(bits=2.0, model_path="smollm2-135m")
    plain = _processor(bits=2.0)
    try:
        src = _obj(chunk.shape, chunk.dtype)
        src.tensor.copy_(chunk)
        ok, buf = _store(with_rope, src)
        assert ok and read_header(buf.raw_tensor)[0].flags == 1
        ok, dst = _load(with_rope, buf, chunk.shape, chunk.dtype)
        assert ok
        fields = read_header(buf.raw_tensor)[0]
        err = (dst.tensor.float() - chunk.float()).pow(2).mean((2, 3)).sqrt() / chunk.float().pow(2).mean(
            (2, 3)).sqrt()  # fmt: skip
        assert float(err.max()) <= fields.quality / math.sqrt(12) * 1.05 + 4e-3
        assert _load(plain, buf, chunk.shape, chunk.dtype)[0] is False
        ok, plain_buf = _store(plain, src)
        assert ok and _load(with_rope, plain_buf, chunk.shape, chunk.dtype)[0] is False
    finally:
        with_rope.close()
        plain.close()
    with pytest.raises(ValueError, match="model_path"):
        _processor(model_path="/nonexistent/model")


@pytest.fixture(scope="module")
def smollm2_pca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small PCA calibration of SmolLM2 (1 sequence of 256 tokens: enough for a codec level table)."""
    from kvtool.artifacts import write_artifact
    from kvtool.calibrators.base import calibrate, calibrator
    from kvtool.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    cal = calibrator("pca", num_seqs=1, seq_len=256, target_bits=2.0)
    arts = calibrate(lm, cal, "emma")
    path = tmp_path_factory.mktemp("pca") / "pca.kvcal.safetensors"
    write_artifact(path, next(iter(arts.values())))
    return str(path)


def test_calibrated_records_through_lmcache(real_chunks: torch.Tensor, smollm2_pca: str) -> None:
    """With a PCA artifact the serde codes pre-RoPE keys with the calibrated coder: the chunk's first position is
    recovered from the data (256 for the second chunk), the record round-trips, and a serde without the artifact
    refuses it."""
    chunk = real_chunks[1]
    proc = _processor(bits=1.5, model_path="smollm2-135m", calibration=smollm2_pca)
    adaptive = _processor(bits=1.5, model_path="smollm2-135m")
    try:
        src = _obj(chunk.shape, chunk.dtype)
        src.tensor.copy_(chunk)
        ok, buf = _store(proc, src)
        header = read_header(buf.raw_tensor)[0]
        assert ok and header.flags == 3 and header.start == 256
        ok, dst = _load(proc, buf, chunk.shape, chunk.dtype)
        assert ok
        err = (dst.tensor.float() - chunk.float()).pow(2).mean() / chunk.float().pow(2).mean()
        assert float(err) < 0.25  # relative MSE at ~1.5 bits (the adaptive record at 2 bits: ~0.1)
        assert _load(adaptive, buf, chunk.shape, chunk.dtype)[0] is False
    finally:
        proc.close()
        adaptive.close()
    with pytest.raises(ValueError, match="needs model_path"):
        _processor(calibration=smollm2_pca)


def test_model_path_needs_only_the_config(tiny_qwen2, tmp_path) -> None:
    """``model_path`` may be a folder holding config.json alone: its tables equal the model's own."""
    from kvtool.capture import prefix_rope
    from kvtool.integrations.lmcache.serde import ModelRope

    tiny_qwen2.model.config.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    rope = ModelRope(str(tmp_path))
    layers = tiny_qwen2.info.num_layers
    ours = rope.at(layers)(torch.arange(40))
    theirs = prefix_rope(tiny_qwen2.model, layers, 40)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(ValueError, match="layers"):
        rope.at(layers + 1)
