"""Fixed-size chunk records (:mod:`kvtool.codecs.chunk_record`): round trips within the quantizer's error bound, the
size fixed per shape whatever the data, rate control, and every damaged or foreign record refused with
``ValueError``."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvtool.codecs.chunk_record import (
    HEADER,
    RecordSettings,
    binding,
    decode_record,
    encode_record,
    read_header,
    record_size,
)

SHAPE = (2, 3, 128, 32)


def _chunk(seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g) * torch.linspace(0.05, 4.0, SHAPE[-1]) * scale
    x[:, :, :, 3] += 7.0  # an offset channel: the mean is coded apart from the step
    return x.to(dtype)


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per K/V and layer: RMS error relative to the RMS of the original."""
    return (a.float() - b.float()).pow(2).mean((2, 3)).sqrt() / b.float().pow(2).mean((2, 3)).sqrt()


@pytest.mark.parametrize("bits", [2.0, 3.5, 6.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_within_the_quantizer_bound(bits: float, dtype: torch.dtype) -> None:
    kv = _chunk(dtype=dtype)
    s = RecordSettings(bits=bits, lane_symbols=256)
    size = record_size(kv.shape, s)
    buf = torch.full((size + 100,), 0xAB, dtype=torch.uint8)
    assert encode_record(kv, s, buf, binding("k")) == size
    assert bool((buf[size:] == 0xAB).all())  # nothing written past the record
    fields, used = read_header(buf)
    assert used <= size and bool((buf[used:size] == 0).all())  # zero padding up to the fixed size
    out = torch.empty_like(kv)
    decode_record(buf, out, binding("k"))
    # a uniform quantizer with step q·σ errs by q·σ/√12 RMS; relative to the channel's RMS (>= σ) at most q/√12,
    # + 5 % for the fp16 step and mean and the output dtype's rounding
    quality = fields.quality
    assert float(_rel_rms(out, kv).max()) <= quality / math.sqrt(12) * 1.05 + 4e-3


def test_rate_control_fits_any_data_and_uses_the_budget() -> None:
    s = RecordSettings(bits=2.5, quality=0.01, lane_symbols=256)  # far too fine to start with: coarsened
    size = record_size(SHAPE, s)
    for seed, scale in [(1, 1.0), (2, 1e3), (3, 1e-3)]:
        buf = torch.zeros(size, dtype=torch.uint8)
        encode_record(_chunk(seed, scale), s, buf)
        fields, used = read_header(buf)
        assert fields.quality > 0.01 and used > 0.8 * size  # coarser than asked, and most of the budget used
    coarse = RecordSettings(bits=2.5, quality=60.0, lane_symbols=256)  # far too coarse: refined
    buf = torch.zeros(size, dtype=torch.uint8)
    encode_record(_chunk(), coarse, buf)
    assert read_header(buf)[0].quality < 60.0


def test_too_few_bits_for_the_side_information_is_refused() -> None:
    with pytest.raises(ValueError, match="needs at least"):
        record_size(SHAPE, RecordSettings(bits=0.1))
    with pytest.raises(ValueError, match="bits"):
        RecordSettings(bits=0)


def test_foreign_and_damaged_records_are_refused() -> None:
    kv = _chunk()
    s = RecordSettings(bits=3.0, lane_symbols=256)
    buf = torch.zeros(record_size(kv.shape, s), dtype=torch.uint8)
    encode_record(kv, s, buf, binding("key-1"))
    out = torch.empty_like(kv)
    with pytest.raises(ValueError, match="another key"):
        decode_record(buf, out, binding("key-2"))
    with pytest.raises(ValueError, match="destination"):
        decode_record(buf, torch.empty(2, 3, 129, 32, dtype=kv.dtype), binding("key-1"))
    with pytest.raises(ValueError, match="destination"):
        decode_record(buf, torch.empty_like(kv, dtype=torch.float16), binding("key-1"))
    with pytest.raises(ValueError, match="claimed"):
        decode_record(buf[: read_header(buf)[1] - 1], out, binding("key-1"))
    rng = random.Random(0)
    used = read_header(buf)[1]
    for _ in range(60):  # any flipped byte of the header or body: refused, and only with ValueError
        bad = buf.clone()
        at = rng.randrange(used)
        bad[at] ^= 1 << rng.randrange(8)
        with pytest.raises(ValueError):
            decode_record(bad, out, binding("key-1"))
    for junk in (torch.zeros(HEADER.size - 1, dtype=torch.uint8), torch.zeros(4096, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="too short|magic"):
            decode_record(junk, out, binding("key-1"))


def test_outlier_tokens_are_kept_in_fp16() -> None:
    kv = _chunk().float()
    kv[:, :, 5] = 0.01 * torch.randn(2, SHAPE[1], SHAPE[3], generator=torch.Generator().manual_seed(5))  # a "sink"
    kv = kv.to(torch.bfloat16)
    s = RecordSettings(bits=3.0, lane_symbols=256)
    buf = torch.zeros(record_size(kv.shape, s), dtype=torch.uint8)
    encode_record(kv, s, buf)
    assert read_header(buf)[0].outliers == 1
    out = torch.empty_like(kv)
    decode_record(buf, out)
    assert torch.equal(out[:, :, 5], kv[:, :, 5])  # bf16 -> fp16 -> bf16: exact at these magnitudes
    others = torch.ones(SHAPE[2], dtype=torch.bool)
    others[5] = False
    fields = read_header(buf)[0]
    err = _rel_rms(out[:, :, others], kv[:, :, others])
    assert float(err.max()) <= fields.quality / math.sqrt(12) * 1.05 + 4e-3
    none = RecordSettings(bits=3.0, lane_symbols=256, outlier_tokens=0)
    encode_record(kv, none, buf[: record_size(kv.shape, none)])
    assert read_header(buf)[0].outliers == 0


def test_relative_rope_removes_the_rotation_without_positions(tiny_llama) -> None:
    """Keys rotated at unknown positions p0..p0+T-1 are rotated back by 0..T-1 only: every token is then off by
    the same rotation, the per-channel means come back, and at equal bits the keys' error falls."""
    from kvtool.capture import rope_for_positions

    info = tiny_llama.info
    layers, dim, heads, t = info.num_layers, info.head_dim, info.num_kv_heads, 128
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(layers, heads, t, dim, generator=g) + 6.0 * torch.randn(layers, heads, 1, dim, generator=g)
    at = rope_for_positions(tiny_llama.model, layers, torch.arange(1000, 1000 + t))
    from kvtool.arch import apply_rope

    keys = torch.stack([apply_rope(pre[i][None], *at[i])[0] for i in range(layers)])  # post-RoPE, as cached
    values = torch.randn(layers, heads, t, dim, generator=g)
    kv = torch.stack([keys, values]).permute(0, 1, 3, 2, 4).reshape(2, layers, t, heads * dim).to(torch.bfloat16)
    def rope(positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return rope_for_positions(tiny_llama.model, layers, positions)

    s = RecordSettings(bits=3.0, lane_symbols=256, outlier_tokens=0)
    errs = {}
    for name, tables in (("plain", None), ("rope", rope)):
        buf = torch.zeros(record_size(kv.shape, s), dtype=torch.uint8)
        encode_record(kv, s, buf, rope_at=tables)
        out = torch.empty_like(kv)
        decode_record(buf, out, rope_at=tables)
        errs[name] = float(_rel_rms(out, kv)[0].mean())
        with pytest.raises(ValueError, match="RoPE"):
            decode_record(buf, out, rope_at=None if tables is not None else rope)
    assert errs["rope"] < 0.5 * errs["plain"]


def test_hostile_headers_with_valid_crc_fail_cleanly() -> None:
    """A record whose header fields were rewritten and its CRC recomputed (hostile, not damaged) either decodes or
    is refused with ValueError: never another exception, never a write past the destination."""
    import struct
    import zlib

    kv = _chunk()
    s = RecordSettings(bits=3.0, lane_symbols=256)
    buf = torch.zeros(record_size(kv.shape, s), dtype=torch.uint8)
    encode_record(kv, s, buf)
    used = read_header(buf)[1]
    fields = list(HEADER.unpack(bytes(buf[: HEADER.size].tolist())))
    rng = random.Random(1)
    values = [0, 1, 2, 3, 63, 64, 255, 256, 4096, 65535, 1 << 20, (1 << 32) - 1]
    for _ in range(80):
        bad = list(fields)
        i = rng.choice([2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14])  # every integer field but magic and version
        bad[i] = rng.choice([v for v in values if i != 2 or v <= 65535])  # the dtype code is 16 bits
        head = HEADER.pack(*bad[:-1], 0)
        body = bytes(buf[HEADER.size : used].tolist())
        crc = zlib.crc32(body, zlib.crc32(head))
        hostile = torch.frombuffer(bytearray(head[:-4] + struct.pack("<I", crc) + body), dtype=torch.uint8)
        out = torch.empty_like(kv)
        try:
            decode_record(hostile, out)
        except ValueError:
            pass


def test_engine_layout_round_trips_and_sliding_caches_are_refused_by_the_bench_rows(tiny_llama, tiny_gemma3) -> None:
    """``engine_layout`` / ``cache_layout`` are inverse; a cache whose sliding-window layers hold fewer positions than
    the prefix has no single ``(2, L, T, D)`` layout, and the bench's record rows say so (exit 2 wording) instead of
    coding something else."""
    from tiny_models import TinyLM

    from kvtool.codecs.chunk_record import cache_layout, engine_layout
    from kvtool.codecs.encode import prefill_cache
    from kvtool.errors import UsageError
    from kvtool.eval.codec_rows import codec_row

    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0))
    cache = prefill_cache(tiny_llama.model, ids)
    kv = engine_layout(cache)
    assert kv.shape == (2, tiny_llama.info.num_layers, 150, tiny_llama.info.num_kv_heads * tiny_llama.info.head_dim)
    back = cache_layout(kv, tiny_llama.info.num_kv_heads)
    assert all(torch.equal(k, layer.keys) and torch.equal(v, layer.values)
               for (k, v), layer in zip(back, cache.layers, strict=True))  # fmt: skip
    sliding = prefill_cache(tiny_gemma3.model, ids)
    assert len({layer.keys.shape[-2] for layer in sliding.layers}) > 1  # the window is shorter than the prefix
    with pytest.raises(UsageError, match="sliding window"):
        codec_row("lmcache-kvtool@8.0", TinyLM(tiny_gemma3)).code_cache(sliding, ids)


def test_record_rows_take_the_serde_outlier_options(tiny_llama) -> None:  # noqa: ANN001
    """``lmcache-kvtool@<bits>o<N>z<Z>`` codes with the serde's ``outlier_tokens`` and ``outlier_z``; a value the
    serde refuses is the bench's usage error."""
    from tiny_models import TinyLM

    from kvtool.errors import UsageError
    from kvtool.eval.codec_rows import codec_row

    row = codec_row("lmcache-kvtool@3.0o5z3.5", TinyLM(tiny_llama))
    assert (row.record.bits, row.record.outlier_tokens, row.record.outlier_z) == (3.0, 5, 3.5)
    assert codec_row("lmcache-kvtool@3.0", TinyLM(tiny_llama)).record == RecordSettings(bits=3.0)
    for bad in ("lmcache-kvtool@3.0o65", "lmcache-kvtool@3.0z0", "lmcache-kvtool@3.0x1"):
        with pytest.raises(UsageError):
            codec_row(bad, TinyLM(tiny_llama))
