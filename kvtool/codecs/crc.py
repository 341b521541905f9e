"""The ``.kvz`` chunk CRC-32s checked where the bytes already are: block CRCs in parallel, then one combine per
chunk (the GPU form of :func:`kvtool.codecs.container.chunk_crc`, same values).

A chunk's CRC-32 (zlib's, reflected polynomial ``0xEDB88320``) runs over a seed, then per tensor its name, a NUL
and its bytes. On the host that is one serial pass per chunk; a whole 32K-token file (~0.5 GB) took ~24 ms of
16 host threads after the device had finished decoding. Here the bytes are cut into blocks of at most ``block``
bytes (aligned to the data section, never crossing a tensor), and the CRC register is linear over GF(2):

    R(s, M) = s · x^(8|M|) mod P  ⊕  R(0, M)

so every block's ``R(0, block)`` is computed independently (one lane each: :func:`block_crcs_reference`, Triton:
:func:`kvtool.kernels.crc_triton.block_crcs_triton`), and each chunk folds its blocks in order from the seed's
register (:func:`combine_reference` / ``combine_triton``), with the powers ``x^(8n) mod P`` tabled for
``n`` up to the longest block. Tensor names are tiny: their ``R(0, name NUL)`` comes from zlib on the host, as
blocks of their own. This is zlib's ``crc32_combine`` (Mark Adler) applied block-wise.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from kvtool.codecs.container import chunk_name

POLY = 0xEDB88320  #: zlib's CRC-32 polynomial, reflected
MASK = 0xFFFFFFFF
X0 = 0x80000000  #: the polynomial 1 (x^0) in the reflected representation


@functools.cache
def byte_table() -> torch.Tensor:
    """(256,) int64: the register update of one byte, ``T[i]`` = ``R(0, bytes([i]))`` … as zlib's table."""
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        out.append(c)
    return torch.tensor(out, dtype=torch.int64)


@functools.cache
def zero_powers(n: int) -> torch.Tensor:
    """(n + 1,) int64: ``x^(8k) mod P`` for ``k = 0..n`` (``k`` zero bytes move a register by multiplication with
    it), by one zero-byte register step each."""
    table = byte_table().tolist()
    p, out = X0, [X0]
    for _ in range(n):
        p = (p >> 8) ^ table[p & 0xFF]
        out.append(p)
    return torch.tensor(out, dtype=torch.int64)


def mulmod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a · b mod P`` elementwise (int64 tensors of 32-bit reflected polynomials): zlib's ``multmodp``."""
    p = torch.zeros_like(b)
    for i in range(32):
        p ^= torch.where((a >> (31 - i)) & 1 != 0, b, 0)
        b = torch.where(b & 1 != 0, (b >> 1) ^ POLY, b >> 1)
    return p


@dataclass
class CrcPlan:
    """Blocks of every chunk, in CRC order (per chunk: per tensor in name order, its name then its bytes).

    Per block ``j`` (``N`` of them): ``start``/``end`` (int64, bytes of the data section; ``end == start`` for a
    name block), ``length`` (bytes the block stands for), ``preset`` (``R(0, ·)`` of a name block, 0 for a data
    block). ``first`` (C + 1,): chunk ``c``'s blocks are ``first[c]:first[c + 1]``. ``seed_state``: the register
    after the seed; ``expected`` (C,): the recorded CRC-32s. ``max_blocks``: the most blocks of one chunk."""

    start: torch.Tensor
    end: torch.Tensor
    length: torch.Tensor
    preset: torch.Tensor
    is_data: torch.Tensor
    first: torch.Tensor
    seed_state: int
    expected: torch.Tensor
    block: int
    max_blocks: int
    max_length: int  #: the longest block (a data block holds at most ``block`` bytes; a name may hold more)


@functools.lru_cache(maxsize=1 << 16)
def name_register(name: str) -> int:
    """``R(0, name NUL)``: what a tensor's name contributes to its chunk's CRC register (names repeat from file to
    file: cached)."""
    return zlib.crc32(name.encode() + b"\0", MASK) ^ MASK


def plan_chunk_crcs(kvz: Any, device: torch.device, block: int) -> CrcPlan:
    """The :class:`CrcPlan` of ``kvz``'s chunks (a :class:`kvtool.codecs.container.KvzFile`), on ``device``: the
    pieces (a name or a tensor: a couple of thousand) are listed on the host and sent in one copy, their blocks
    expanded on the device."""
    if block % 4 or block < 4:
        raise ValueError(f"the CRC block must be a positive multiple of 4 bytes (got {block})")
    header = kvz._header
    n_chunks = len(kvz.chunks)
    prefix = chunk_name(0, "")
    parts = sorted({name[len(prefix) :] for name in kvz._expected if name.startswith(prefix)})  # every chunk's
    rows: list[list[int]] = []  # per piece: start, end, preset, name length, blocks
    per_chunk = []
    for c in range(n_chunks):
        count = 0
        for part in parts:
            name = chunk_name(c, part)
            b, e = header[name]["data_offsets"]
            n = -(-e // block) - b // block if e > b else 0
            rows.append([0, 0, name_register(name), len(name) + 1, 1])
            rows.append([b, e, 0, 0, n])
            count += 1 + n
        per_chunk.append(count)
    host = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)
    counts = host[:, 4]
    total = int(counts.sum())
    dev = host.to(device, non_blocking=True)  # no stream synchronisation: the queued decode kernels run on
    p_start, p_end, p_preset, p_name, p_count = dev.unbind(1)
    piece = torch.repeat_interleave(torch.arange(host.shape[0], device=device), p_count, output_size=total)
    k = torch.arange(total, device=device) - (p_count.cumsum(0) - p_count)[piece]
    p_start, p_end = p_start[piece], p_end[piece]
    is_data = p_end > p_start
    window = (p_start // block + k) * block
    start = torch.where(is_data, torch.maximum(p_start, window), 0)
    end = torch.where(is_data, torch.minimum(p_end, window + block), 0)
    length = torch.where(is_data, end - start, p_name[piece])
    chunk_counts = torch.tensor(per_chunk, dtype=torch.int64)
    first = torch.cat([torch.zeros(1, dtype=torch.int64), chunk_counts.cumsum(0)])
    expected = torch.tensor([c["crc32"] for c in kvz.chunks], dtype=torch.int64)
    first, expected = torch.cat([first, expected]).to(device, non_blocking=True).split([n_chunks + 1, n_chunks])
    seed_state = zlib.crc32(kvz._crc_seed) ^ MASK
    longest = max((len(chunk_name(0, part)) + 1 for part in parts), default=0)
    return CrcPlan(start, end, length, p_preset[piece], is_data, first, seed_state, expected, block,
                   max(per_chunk, default=0), max(block, longest))  # fmt: skip


def block_crcs_reference(data: torch.Tensor, plan: CrcPlan) -> torch.Tensor:
    """(N,) int64: ``R(0, block)`` of every data block of ``data`` (the data section, uint8), a name block's
    preset for the others; one byte step of every block at a time (the kernel's order)."""
    data = data.cpu()
    start, end = plan.start.cpu(), plan.end.cpu()
    table = byte_table()
    s = plan.preset.cpu().clone()
    data_blocks = plan.is_data.cpu()
    s[data_blocks] = 0
    for i in range(plan.block):
        at = start + i
        act = data_blocks & (at < end)
        if not bool(act.any()):
            break
        byte = data[at[act]].to(torch.int64)
        s[act] = (s[act] >> 8) ^ table[(s[act] ^ byte) & 0xFF]
    return s


def combine_reference(crcs: torch.Tensor, plan: CrcPlan) -> torch.Tensor:
    """(C,) int64: each chunk's CRC-32, folding its blocks' ``R(0, ·)`` (``crcs``) in order from the seed's
    register: ``s ← s · x^(8·length) ⊕ crc`` (all chunks at once, one block index at a time)."""
    crcs, length, first = crcs.cpu(), plan.length.cpu(), plan.first.cpu()
    powers = zero_powers(plan.max_length)
    n_chunks = first.numel() - 1
    s = torch.full((n_chunks,), plan.seed_state, dtype=torch.int64)
    for j in range(plan.max_blocks):
        at = first[:-1] + j
        act = at < first[1:]
        if not bool(act.any()):
            break
        idx = at[act]
        s[act] = mulmod(powers[length[idx]], s[act]) ^ crcs[idx]
    return s ^ MASK


def chunk_crcs(data: torch.Tensor, plan: CrcPlan, backend: str) -> torch.Tensor:
    """(C,) int64 on ``data``'s device: every chunk's CRC-32 of ``data`` (the data section; for ``triton`` a uint8
    tensor whose storage is padded to a multiple of 4 bytes: :func:`padded_bytes`)."""
    if backend == "triton":
        from kvtool.kernels.crc_triton import block_crcs_triton, combine_triton

        return combine_triton(block_crcs_triton(data, plan), plan)
    return combine_reference(block_crcs_reference(data, plan), plan).to(data.device)


def padded_bytes(n: int, device: torch.device, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 buffer of ``n`` bytes on ``device`` whose storage holds a multiple of 4 bytes (the
    CRC kernel reads whole 32-bit words; the bytes past ``n`` are never used)."""
    return torch.empty(-(-n // 4) * 4, dtype=torch.uint8, device=device, pin_memory=pin)[:n]
