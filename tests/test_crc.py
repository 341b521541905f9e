"""The block-wise chunk CRC-32 (:mod:`kvtool.codecs.crc`, the device decode's integrity check) against zlib: the
same CRCs as the file records for every block size, the algebra it rests on, and a changed byte caught in its own
chunk. The Triton kernels against this reference: ``tests/kernel_checks.py`` (interpreted here, compiled on CUDA)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from tiny_models import TinyLM

from kvtool.codecs import crc
from kvtool.codecs.container import chunk_crc
from kvtool.codecs.device_decode import read_data
from kvtool.codecs.kvz import CodecSettings, KvzFile, encode_prefix

IDS = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def kvz_path(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("crc") / "x.kvz"
    encode_prefix(TinyLM(tiny_llama), IDS, CodecSettings(chunk_tokens=32, sink_tokens=2, recent_tokens=3), path)
    return path


def _data(kvz: KvzFile) -> torch.Tensor:
    data = read_data(kvz, pin=False)
    buf = crc.padded_bytes(data.numel(), torch.device("cpu"))
    buf.copy_(data)
    return buf


def test_register_algebra() -> None:
    """``R(s, M) = s · x^(8|M|) ⊕ R(0, M)``, with the tabled powers and ``mulmod``, as zlib computes it."""
    gen = torch.Generator().manual_seed(0)
    powers = crc.zero_powers(300)
    for n in (0, 1, 3, 17, 300):
        msg = bytes(torch.randint(0, 256, (n,), generator=gen).tolist())
        for s in (0, 1, 0xDEADBEEF, crc.MASK):
            whole = zlib.crc32(msg, s ^ crc.MASK) ^ crc.MASK  # the register after M from register s
            linear = zlib.crc32(msg, crc.MASK) ^ crc.MASK  # R(0, M)
            moved = int(crc.mulmod(powers[n : n + 1], torch.tensor([s], dtype=torch.int64)))
            assert moved ^ linear == whole, (n, hex(s))


@pytest.mark.parametrize("block", [4, 12, 64, 4096])
def test_reference_matches_recorded_crcs(kvz_path: Path, block: int) -> None:
    kvz = KvzFile(kvz_path)
    plan = crc.plan_chunk_crcs(kvz, torch.device("cpu"), block)
    got = crc.chunk_crcs(_data(kvz), plan, "torch")
    assert got.tolist() == [c["crc32"] for c in kvz.chunks]
    assert torch.equal(plan.expected, got)
    # blocks never cross a tensor or a block window, and cover each tensor exactly once
    data_blocks = plan.is_data
    assert bool(((plan.end - plan.start)[data_blocks] <= block).all())
    assert bool(((plan.end - 1)[data_blocks] // block == plan.start[data_blocks] // block).all())
    assert int((plan.end - plan.start).sum()) == sum(
        e - b for n, info in kvz._header.items() if n.startswith("chunk.") for b, e in [info["data_offsets"]]
    )


def test_a_changed_byte_is_caught_in_its_chunk(kvz_path: Path) -> None:
    kvz = KvzFile(kvz_path)
    data = _data(kvz)
    plan = crc.plan_chunk_crcs(kvz, torch.device("cpu"), 64)
    begin, end = kvz._header["chunk.000002.words"]["data_offsets"]
    data[(begin + end) // 2] ^= 0x10
    bad = (crc.chunk_crcs(data, plan, "torch") != plan.expected).nonzero().flatten().tolist()
    assert bad == [2]
    # and the definition agrees (zlib over the chunk's tensors)
    view = memoryview(data.numpy())
    names = sorted(n for n in kvz._header if n.startswith("chunk.000002."))
    buffers = {n: view[slice(*kvz._header[n]["data_offsets"])] for n in names}
    assert chunk_crc(buffers, kvz._crc_seed) != kvz.chunks[2]["crc32"]


def test_plan_refuses_a_block_that_is_not_whole_words(kvz_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        crc.plan_chunk_crcs(KvzFile(kvz_path), torch.device("cpu"), 6)


def test_padded_bytes_are_word_padded() -> None:
    for n in (0, 1, 5, 8):
        buf = crc.padded_bytes(n, torch.device("cpu"))
        assert buf.numel() == n and buf.untyped_storage().nbytes() % 4 == 0
        assert buf.untyped_storage().nbytes() >= n
