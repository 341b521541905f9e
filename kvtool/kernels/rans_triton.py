"""Triton kernels of the interleaved rANS coder: one program per block of lanes, each lane a sequential loop.

Same signatures and the same bytes as :func:`kvtool.codecs.rans.encode_reference` /
:func:`~kvtool.codecs.rans.decode_reference` (integer arithmetic only, so equality is exact, not within a
tolerance). All inputs are moved to the tensors' CUDA device; ``TRITON_INTERPRET=1`` runs the kernels on CPU (the CI
tests do, on tiny shapes).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from kvtool.codecs.rans import PROB_BITS, PROB_SCALE, STATE_LOW, Tables

BLOCK_LANES = int(os.environ.get("KVTOOL_RANS_BLOCK", "32"))  #: lanes per program (one lane per thread)
NUM_WARPS = int(os.environ.get("KVTOOL_RANS_WARPS", "1"))
_DEVICE_TABLES: dict[tuple[int, str], tuple[Tables, tuple[torch.Tensor, ...]]] = {}


@triton.jit
def _decode_kernel(
    words_ptr, total_words, word_start_ptr, length_ptr, tid_ptr, lut_ptr, freq_ptr, cum_ptr,
    out_ptr, state_out_ptr, ptr_out_ptr, n_lanes, max_len, step_ptr, kmax_ptr,
    A: tl.constexpr, PROB_BITS_: tl.constexpr, BLOCK: tl.constexpr, DEQUANT: tl.constexpr,
):  # fmt: skip
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lanes < n_lanes
    wstart = tl.load(word_start_ptr + lanes, mask=live, other=0).to(tl.int64)
    length = tl.load(length_ptr + lanes, mask=live, other=0).to(tl.int64)
    lo = tl.load(words_ptr + wstart, mask=live & (wstart < total_words), other=0).to(tl.int64)
    hi = tl.load(words_ptr + wstart + 1, mask=live & (wstart + 1 < total_words), other=0).to(tl.int64)
    x = lo | (hi << 16)
    ptr = wstart + 2
    for k in range(0, max_len):
        active = live & (k < length)
        t = tl.load(tid_ptr + k * n_lanes + lanes, mask=active, other=0).to(tl.int64)
        slot = x & ((1 << PROB_BITS_) - 1)
        s = tl.load(lut_ptr + t * (1 << PROB_BITS_) + slot, mask=active, other=0).to(tl.int64)
        fc = tl.load(freq_ptr + t * A + s, mask=active, other=1).to(tl.int64)  # freq | cum << 16: one load
        f = fc & 0xFFFF
        c = fc >> 16
        nxt = f * (x >> PROB_BITS_) + slot - c
        read = active & (nxt < 65536)
        w = tl.load(words_ptr + ptr, mask=read & (ptr < total_words), other=0).to(tl.int64)
        nxt = tl.where(read, (nxt << 16) | w, nxt)
        ptr += read.to(tl.int64)
        x = tl.where(active, nxt, x)
        if DEQUANT:  # fused: the coefficient (s - kmax) * step of the symbol's component, in fp32
            step = tl.load(step_ptr + t, mask=active, other=0.0)
            kmax = tl.load(kmax_ptr + t, mask=active, other=0.0)
            value = (s.to(tl.float32) - kmax) * step
            tl.store(out_ptr + k * n_lanes + lanes, value.to(out_ptr.dtype.element_ty), mask=active)
        else:
            tl.store(out_ptr + k * n_lanes + lanes, s, mask=active)
    tl.store(state_out_ptr + lanes, x, mask=live)
    tl.store(ptr_out_ptr + lanes, ptr, mask=live)


@triton.jit
def _encode_kernel(
    sym_ptr, tid_ptr, length_ptr, freq_ptr, cum_ptr, buf_ptr, count_ptr, state_ptr, bad_ptr, n_lanes,
    max_len, cap, A: tl.constexpr, PROB_BITS_: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lanes < n_lanes
    length = tl.load(length_ptr + lanes, mask=live, other=0).to(tl.int64)
    x = tl.full((BLOCK,), 65536, tl.int64)
    emitted = tl.zeros((BLOCK,), tl.int64)
    bad = tl.zeros((BLOCK,), tl.int32)
    for j in range(0, max_len):
        k = max_len - 1 - j  # backwards: the decoder reads forwards
        active = live & (k < length)
        s = tl.load(sym_ptr + k * n_lanes + lanes, mask=active, other=0).to(tl.int64)
        t = tl.load(tid_ptr + k * n_lanes + lanes, mask=active, other=0).to(tl.int64)
        inside = active & (s >= 0) & (s < A)
        fc = tl.load(freq_ptr + t * A + s, mask=inside, other=0).to(tl.int64)  # freq | cum << 16: one load
        f = fc & 0xFFFF
        # a symbol outside its table's alphabet, or of frequency 0, cannot be coded: the lane is flagged (the
        # caller refuses the batch) and coded on with frequency 1 (no division by zero)
        bad = tl.where(active & (f == 0), 1, bad)
        f = tl.where(f == 0, 1, f)
        c = fc >> 16
        flush = active & (x >= (f << (32 - PROB_BITS_)))
        tl.store(buf_ptr + emitted * n_lanes + lanes, x & 0xFFFF, mask=flush)  # step-major: coalesced
        emitted += flush.to(tl.int64)
        x = tl.where(flush, x >> 16, x)
        x = tl.where(active, ((x // f) << PROB_BITS_) + (x % f) + c, x)
    tl.store(count_ptr + lanes, emitted, mask=live)
    tl.store(state_ptr + lanes, x, mask=live)
    tl.store(bad_ptr + lanes, bad, mask=live)


def _device_tables(tables: Tables, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(lut, packed, packed)`` on ``device`` (uint8 slot table; int32 ``freq | cum << 16``), cached per table set
    (reused for every chunk)."""
    key = (id(tables), str(device))
    hit = _DEVICE_TABLES.get(key)
    if hit is not None and hit[0] is tables:
        return hit[1]
    # The slot→symbol table is the big one (tables × 4096): uint8. Frequency and cumulative frequency of a symbol
    # are packed in one int32 (freq | cum << 16, both <= 4096) so a step does one dependent load for both.
    packed = tables.freq | (tables.cum[:, :-1] << 16)
    made = (tables.lut.to(device, torch.uint8).contiguous(), packed.to(device, torch.int32).contiguous(),
            packed.to(device, torch.int32).contiguous())  # fmt: skip
    if len(_DEVICE_TABLES) >= 8:
        _DEVICE_TABLES.pop(next(iter(_DEVICE_TABLES)))
    _DEVICE_TABLES[key] = (tables, made)  # keeps ``tables`` alive, so its id is not reused while cached
    return made


def _grid(n_lanes: int) -> tuple[int]:
    return (triton.cdiv(n_lanes, BLOCK_LANES),)


def interleave(flat: torch.Tensor, lengths: torch.Tensor, *more: torch.Tensor) -> Any:
    """Lane-major flat values → step-major ``(max_len, n_lanes)`` (entry ``[k, lane]`` = symbol ``k`` of ``lane``;
    padding 0). The kernels read and write this layout: at each step, neighbouring lanes touch neighbouring
    addresses (coalesced), where the flat layout would put them ``lane_len`` apart. ``more``: further flat tensors
    of the same layout, interleaved with the same index (a tuple is returned then)."""
    max_len = int(lengths.max())  # host lengths: no device synchronisation
    lengths = lengths.to(flat.device)
    starts = lengths.cumsum(0) - lengths
    k = torch.arange(max_len, device=flat.device)[:, None]
    idx = (starts[None, :] + k).clamp_max(flat.numel() - 1)
    pad = k >= lengths[None, :]
    out = [t[idx].masked_fill_(pad, 0) for t in (flat, *more)]
    return tuple(out) if more else out[0]


def deinterleave(steps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave`."""
    lengths = lengths.to(steps.device)
    k = torch.arange(steps.shape[0], device=steps.device)[:, None]
    return steps.T[(k < lengths[None, :]).T]


def encode_triton(
    symbols: torch.Tensor, table_ids: torch.Tensor, tables: Tables, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`kvtool.codecs.rans.encode_reference` (same bytes, the same ``ValueError`` for a symbol
    outside its table's alphabet); runs on ``symbols.device``. uint8 symbols stay bytes until the kernel reads
    them (a 32K-token prefix has billions)."""
    device = symbols.device
    n = symbols.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    host_lengths = lengths.to("cpu", torch.int64)
    if int(host_lengths.sum()) != n or bool((host_lengths < 1).any()):
        raise ValueError("lane lengths must be positive and cover the symbols")
    keep = symbols.dtype in (torch.uint8, torch.int32)
    sym = symbols.to(device, symbols.dtype if keep else torch.int32).reshape(-1).contiguous()
    tid = table_ids.to(device, torch.int32).reshape(-1).contiguous()
    return encode_interleaved(*interleave(sym, host_lengths, tid), tables, host_lengths)


def encode_interleaved(
    sym: torch.Tensor, tid: torch.Tensor, tables: Tables, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_triton` on step-major ``(max_len, n_lanes)`` integer symbols and int32 table ids;
    ``ValueError`` when a symbol lies outside its table's alphabet (checked by the kernel)."""
    device = sym.device
    _, freq, cum = _device_tables(tables, device)
    a = tables.freq.shape[1]
    lengths = lengths.to(device, torch.int64)
    n_lanes, max_len = lengths.numel(), int(sym.shape[0])
    cap = max_len
    buf = torch.zeros(n_lanes * cap, dtype=torch.int32, device=device)
    count = torch.zeros(n_lanes, dtype=torch.int64, device=device)
    state = torch.zeros(n_lanes, dtype=torch.int64, device=device)
    bad = torch.empty(n_lanes, dtype=torch.int32, device=device)
    _encode_kernel[_grid(n_lanes)](
        sym, tid, lengths, freq, cum, buf, count, state, bad, n_lanes, max_len, cap,
        A=a, PROB_BITS_=PROB_BITS, BLOCK=BLOCK_LANES, num_warps=NUM_WARPS,
    )  # fmt: skip
    # Each lane: [state low, state high, emitted words in reverse emission order].
    per_lane = count + 2
    total, n_bad = torch.stack([per_lane.sum(), bad.sum().to(torch.int64)]).tolist()  # one synchronisation
    if n_bad:
        raise ValueError("a symbol outside its table's alphabet")
    lane = torch.repeat_interleave(torch.arange(n_lanes, device=device), per_lane, output_size=total)
    first = per_lane.cumsum(0) - per_lane
    j = torch.arange(total, device=device) - first[lane]
    emitted_idx = (count[lane] - 1 - (j - 2)).clamp_min(0)
    body = buf.view(cap, n_lanes)[emitted_idx.clamp_max(cap - 1), lane].to(torch.int64)
    words = torch.where(j == 0, state[lane] & 0xFFFF, torch.where(j == 1, state[lane] >> 16, body))
    return words.to(torch.int32), per_lane


def decode_triton(
    words: torch.Tensor,
    words_per_lane: torch.Tensor,
    table_ids: torch.Tensor,
    tables: Tables,
    lengths: torch.Tensor,
    out_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Triton twin of :func:`kvtool.codecs.rans.decode_reference` (same symbols, same corruption checks);
    ``out_dtype`` int32 halves the output traffic."""
    device = words.device
    tid = table_ids.to(device, torch.int32).reshape(-1).contiguous()
    n = tid.numel()
    if n == 0:
        if words.numel() or words_per_lane.numel():
            raise ValueError("words for an empty batch")
        return torch.zeros(0, dtype=torch.int64, device=device)
    lengths = lengths.to(device, torch.int64)
    per_lane = words_per_lane.to(device, torch.int64)
    if int(lengths.sum()) != n:
        raise ValueError("lane lengths do not cover the symbols")
    if per_lane.numel() != lengths.numel():
        raise ValueError(f"expected {lengths.numel()} lanes, got {per_lane.numel()}")
    ends = per_lane.cumsum(0)
    if int(ends[-1]) != words.numel() or bool((per_lane < 2).any()):
        raise ValueError("lane lengths do not match the stream")
    w = words.to(device, torch.int32).reshape(-1).contiguous()
    out, state, ptr = decode_interleaved(w, per_lane, interleave(tid, lengths), tables, lengths, out_dtype)
    if bool((ptr != ends).any()) or bool((state != STATE_LOW).any()):
        raise ValueError("corrupt stream: a lane does not end where its length says")
    return deinterleave(out, lengths).to(out_dtype)


def decode_interleaved(
    words: torch.Tensor,
    words_per_lane: torch.Tensor,
    tid: torch.Tensor,
    tables: Tables,
    lengths: torch.Tensor,
    out_dtype: torch.dtype = torch.int32,
    dequant: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode kernel on step-major table ids ``(max_len, n_lanes)`` int32: returns step-major symbols and, per
    lane, the final state and word pointer (the caller checks them). Table ids depend only on the stream layout
    (artifact level and chunk geometry), so callers can build them once and reuse them.

    ``dequant=(step, kmax)`` (float32, one entry per table): write the dequantized coefficient
    ``(s − kmax) · step`` (``out_dtype`` float) instead of the symbol, as :func:`kvtool.codecs.ecsq.dequantize`
    computes it."""
    device = words.device
    lut, freq, cum = _device_tables(tables, device)
    per_lane = words_per_lane.to(device, torch.int64)
    lengths = lengths.to(device, torch.int64)
    n_lanes, max_len = lengths.numel(), int(tid.shape[0])
    out = torch.empty((max_len, n_lanes), dtype=out_dtype, device=device)
    step, kmax = dequant if dequant is not None else (out, out)
    state = torch.zeros(n_lanes, dtype=torch.int64, device=device)
    ptr = torch.zeros(n_lanes, dtype=torch.int64, device=device)
    _decode_kernel[_grid(n_lanes)](
        words, words.numel(), (per_lane.cumsum(0) - per_lane).contiguous(), lengths, tid, lut,
        freq, cum, out, state, ptr, n_lanes, max_len, step, kmax, A=tables.freq.shape[1], PROB_BITS_=PROB_BITS,
        BLOCK=BLOCK_LANES, DEQUANT=dequant is not None, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out, state, ptr


assert PROB_SCALE == 1 << PROB_BITS
