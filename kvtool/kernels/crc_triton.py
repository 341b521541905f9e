"""Triton kernels of the chunk CRC-32 check (:mod:`kvtool.codecs.crc`): one lane per block, then one lane per
chunk. References: :func:`kvtool.codecs.crc.block_crcs_reference` and :func:`kvtool.codecs.crc.combine_reference`
(same arguments, the same integers).

The block kernel reads whole aligned 32-bit words (a lane's block lies in one ``block``-byte window of the data
section, so at most ``block / 4`` words); bytes of the first word before the block's start are taken as zeros,
which leave a zero register unchanged, and bytes past its end are not applied. Registers are held in int64 (values
below 2^32) so that shifts are logical on every backend, the interpreter's included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtool.codecs.crc import MASK, POLY, CrcPlan, byte_table, zero_powers

BLOCK_LANES = 128


@triton.jit
def _block_crc_kernel(words_ptr, start_ptr, end_ptr, preset_ptr, table_ptr, out_ptr, n_blocks,
                      WORDS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < n_blocks
    start = tl.load(start_ptr + idx, mask=live, other=0)
    end = tl.load(end_ptr + idx, mask=live, other=0)
    data = live & (end > start)
    w0 = start // 4
    nw = (end + 3) // 4 - w0
    s = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(WORDS):
        act = data & (i < nw)
        w = tl.load(words_ptr + w0 + i, mask=act, other=0).to(tl.int64)  # sign-extended: bytes taken by & 0xFF
        at = (w0 + i) * 4
        for k in tl.static_range(4):
            byte = tl.where(at + k >= start, (w >> (8 * k)) & 0xFF, 0)
            t = tl.load(table_ptr + ((s ^ byte) & 0xFF), mask=act, other=0)
            s = tl.where(act & (at + k < end), (s >> 8) ^ t, s)
    preset = tl.load(preset_ptr + idx, mask=live, other=0)
    tl.store(out_ptr + idx, tl.where(data, s, preset), mask=live)


@triton.jit
def _combine_kernel(crc_ptr, length_ptr, first_ptr, powers_ptr, consts_ptr, out_ptr, n_chunks, max_blocks,
                    BLOCK: tl.constexpr):  # fmt: skip
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = c < n_chunks
    # 32-bit constants from memory (int64): literals over 2^31 would be typed uint32 and promoted differently by
    # the compiler and the interpreter
    poly = tl.load(consts_ptr)
    mask32 = tl.load(consts_ptr + 1)
    seed_state = tl.load(consts_ptr + 2)
    first = tl.load(first_ptr + c, mask=live, other=0)
    last = tl.load(first_ptr + c + 1, mask=live, other=0)
    s = tl.zeros([BLOCK], dtype=tl.int64) + seed_state
    for j in range(max_blocks):
        act = live & (first + j < last)
        crc = tl.load(crc_ptr + first + j, mask=act, other=0)
        n = tl.load(length_ptr + first + j, mask=act, other=0)
        a = tl.load(powers_ptr + n, mask=act, other=0)
        # s · a mod P (zlib's multmodp, unrolled)
        p = tl.zeros([BLOCK], dtype=tl.int64)
        b = s
        for i in tl.static_range(32):
            p = p ^ tl.where(((a >> (31 - i)) & 1) != 0, b, 0)
            b = tl.where((b & 1) != 0, (b >> 1) ^ poly, b >> 1)
        s = tl.where(act, p ^ crc, s)
    tl.store(out_ptr + c, s ^ mask32, mask=live)


def block_crcs_triton(data: torch.Tensor, plan: CrcPlan) -> torch.Tensor:
    """(N,) int64: :func:`kvtool.codecs.crc.block_crcs_reference` on ``data``'s device. ``data``: the data
    section, uint8, its storage padded to whole 32-bit words (:func:`kvtool.codecs.crc.padded_bytes`)."""
    n = plan.start.numel()
    out = torch.empty(n, dtype=torch.int64, device=data.device)
    if n == 0:
        return out
    padded = -(-data.numel() // 4) * 4
    if data.untyped_storage().nbytes() - data.storage_offset() < padded or data.storage_offset() % 4:
        raise ValueError("the CRC kernel needs the data section in a word-aligned, word-padded buffer")
    words = torch.as_strided(data, (padded,), (1,)).view(torch.int32)
    table = byte_table().to(data.device, non_blocking=True)
    _block_crc_kernel[(triton.cdiv(n, BLOCK_LANES),)](
        words, plan.start, plan.end, plan.preset, table, out, n, WORDS=plan.block // 4, BLOCK=BLOCK_LANES,
        num_warps=4,
    )  # fmt: skip
    return out


def combine_triton(crcs: torch.Tensor, plan: CrcPlan) -> torch.Tensor:
    """(C,) int64: :func:`kvtool.codecs.crc.combine_reference` on ``crcs``' device."""
    n_chunks = plan.first.numel() - 1
    out = torch.empty(n_chunks, dtype=torch.int64, device=crcs.device)
    if n_chunks == 0:
        return out
    powers = zero_powers(plan.max_length).to(crcs.device, non_blocking=True)
    consts = torch.tensor([POLY, MASK, plan.seed_state], dtype=torch.int64).to(crcs.device, non_blocking=True)
    lanes = 32
    _combine_kernel[(triton.cdiv(n_chunks, lanes),)](
        crcs, plan.length, plan.first, powers, consts, out, n_chunks, plan.max_blocks, BLOCK=lanes, num_warps=1,
    )  # fmt: skip
    return out
