"""Triton kernel that decodes every lane of a whole ``.kvz`` file in one launch, dequantization fused.

Where :func:`kvtool.kernels.rans_triton.decode_interleaved` needs a table id per symbol (a tensor as large as the
output), this kernel derives each symbol's component, token and table from a small per-segment layout (a segment is
one chunk's symbols of one layer: keys, then values, component-major; ``docs/kvz.md``), so the only large inputs
are the coded words and the only large output is the dequantized coefficients, float32, in segment order (each
segment's keys then values, component-major, at ``seg_out[segment]``; segments padded to the store tile).

:func:`kvtool.codecs.device_decode.decode_symbols_reference` is its torch reference (same arguments, same
values: integer decoding, and one fp32 multiply-add per symbol in the same order).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_LANES = int(os.environ.get("KVTOOL_KVZ_BLOCK", "64"))
NUM_WARPS = int(os.environ.get("KVTOOL_KVZ_WARPS", "2"))


@triton.jit
def _decode_file_kernel(
    words_ptr, total_words, lane_word_ptr, lane_words_ptr, lane_len_ptr, lane_seg_ptr, lane_off_ptr,
    seg_n_ptr, seg_ck_ptr, seg_slot_ptr, seg_chunk_ptr, seg_out_ptr,
    comp_base_ptr, comp_tid_ptr, comp_step_ptr, comp_kmax_ptr, comp_mean_ptr,
    lut_ptr, fc_ptr, out_ptr, bad_ptr, n_lanes, max_len, n_slots, channels,
    A: tl.constexpr, PROB_BITS_: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, ADAPTIVE: tl.constexpr,
    SYMBOLS: tl.constexpr,
):  # fmt: skip
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lanes < n_lanes
    wstart = tl.load(lane_word_ptr + lanes, mask=live, other=0).to(tl.int64)
    nwords = tl.load(lane_words_ptr + lanes, mask=live, other=2).to(tl.int64)
    length = tl.load(lane_len_ptr + lanes, mask=live, other=0).to(tl.int32)
    seg = tl.load(lane_seg_ptr + lanes, mask=live, other=0).to(tl.int64)
    off = tl.load(lane_off_ptr + lanes, mask=live, other=0).to(tl.int32)
    # per lane, once: its segment's counts (int32: a segment holds < 2^31 symbols, checked by the caller)
    n = tl.maximum(tl.load(seg_n_ptr + seg, mask=live, other=1), 1).to(tl.int32)
    ck = tl.load(seg_ck_ptr + seg, mask=live, other=0).to(tl.int32)
    kslot = tl.load(seg_slot_ptr + seg, mask=live, other=0).to(tl.int32)  # the layer's key slot; values: + L
    vslot = kslot + n_slots // 2
    chunk = tl.load(seg_chunk_ptr + seg, mask=live, other=0).to(tl.int64)
    # the lane's symbols land contiguously (segment order): TILE of them are kept in registers and stored
    # together, so a thread writes whole sectors instead of one scattered word per step
    dst = tl.load(seg_out_ptr + seg, mask=live, other=0).to(tl.int64) + off
    if not ADAPTIVE:
        kcomp = tl.load(comp_base_ptr + kslot, mask=live, other=0).to(tl.int32)
        vcomp = tl.load(comp_base_ptr + vslot, mask=live, other=0).to(tl.int32)
    nck = n * ck
    end = wstart + nwords
    lo = tl.load(words_ptr + wstart, mask=live & (wstart < total_words), other=0).to(tl.int64) & 0xFFFF
    hi = tl.load(words_ptr + wstart + 1, mask=live & (wstart + 1 < total_words), other=0).to(tl.int64) & 0xFFFF
    x = lo | (hi << 16)
    ptr = wstart + 2
    cols = tl.arange(0, TILE)
    for k0 in range(0, max_len, TILE):
        if SYMBOLS:  # the symbols themselves (1 byte each); the finish kernel dequantizes
            tile = tl.zeros((BLOCK, TILE), dtype=tl.int32)
        else:
            tile = tl.zeros((BLOCK, TILE), dtype=tl.float32)
        for kk in tl.static_range(TILE):
            k = k0 + kk
            active = live & (k < length)
            j = off + k
            is_v = j >= nck
            comp = (j - tl.where(is_v, nck, 0)) // n
            if ADAPTIVE:  # per chunk and K/V slot: one table; per channel: step and mean
                t = chunk * n_slots + tl.where(is_v, vslot, kslot)
                cidx = t * channels + comp
            else:  # calibrated: per coded component of the slot: its table, step and kmax
                cidx = tl.where(is_v, vcomp, kcomp) + comp
                t = tl.load(comp_tid_ptr + cidx, mask=active, other=0).to(tl.int64)
            xslot = x & ((1 << PROB_BITS_) - 1)
            s = tl.load(lut_ptr + t * (1 << PROB_BITS_) + xslot, mask=active, other=0).to(tl.int64)
            fc = tl.load(fc_ptr + t * A + s, mask=active, other=1).to(tl.int64)  # freq | cum << 16
            f = fc & 0xFFFF
            c = fc >> 16
            nxt = f * (x >> PROB_BITS_) + xslot - c
            read = active & (nxt < 65536)
            w = tl.load(words_ptr + ptr, mask=read & (ptr < end), other=0).to(tl.int64) & 0xFFFF
            nxt = tl.where(read, (nxt << 16) | w, nxt)
            ptr += read.to(tl.int64)
            x = tl.where(active, nxt, x)
            if SYMBOLS:
                tile = tl.where(cols[None, :] == kk, s.to(tl.int32)[:, None], tile)
            else:
                step = tl.load(comp_step_ptr + cidx, mask=active, other=0.0)
                if ADAPTIVE:
                    mean = tl.load(comp_mean_ptr + cidx, mask=active, other=0.0)
                    value = (s.to(tl.float32) - 63.0) * step + mean
                else:
                    value = (s.to(tl.float32) - tl.load(comp_kmax_ptr + cidx, mask=active, other=0.0)) * step
                tile = tl.where(cols[None, :] == kk, value[:, None], tile)
        keep = live[:, None] & ((k0 + cols)[None, :] < length[:, None])
        tl.store(out_ptr + (dst + k0)[:, None] + cols[None, :], tile.to(out_ptr.dtype.element_ty), mask=keep)
    # A lane is sound when it consumed exactly its words and came back to the initial state.
    tl.store(bad_ptr + lanes, ((ptr != end) | (x != 65536)).to(tl.int32), mask=live)


def decode_file_triton(args: dict[str, torch.Tensor | int], out: torch.Tensor, bad: torch.Tensor) -> None:
    """Launch the kernel on the layout ``args`` (see :func:`kvtool.codecs.device_decode.decode_symbols_reference`
    for every entry); ``out`` (segment order) and ``bad`` (int32, one per lane) are written in place. ``out``
    float32: the dequantized coefficients; uint8: the symbols (adaptive files, dequantized by
    :func:`finish_adaptive_triton`, a quarter of the bytes written and read back)."""
    n_lanes = int(args["n_lanes"])
    if n_lanes == 0:
        return
    grid = (triton.cdiv(n_lanes, BLOCK_LANES),)
    _decode_file_kernel[grid](
        args["words"], args["words"].numel(), args["lane_word"], args["lane_words"], args["lane_len"],
        args["lane_seg"], args["lane_off"], args["seg_n"], args["seg_ck"], args["seg_slot"], args["seg_chunk"],
        args["seg_out"], args["comp_base"], args["comp_tid"], args["comp_step"], args["comp_kmax"], args["comp_mean"],
        args["lut"], args["fc"], out, bad, n_lanes, int(args["max_len"]), int(args["n_slots"]), int(args["channels"]),
        A=int(args["alphabet"]), PROB_BITS_=int(args["prob_bits"]), BLOCK=BLOCK_LANES, TILE=int(args["tile"]),
        ADAPTIVE=bool(args["adaptive"]), SYMBOLS=out.dtype == torch.uint8, num_warps=NUM_WARPS,
    )  # fmt: skip


@triton.jit
def _finish_adaptive_kernel(
    sym_ptr, seg_out_ptr, seg_n_ptr, seg_p0_ptr, seg_layer_ptr, seg_chunk_ptr, step_ptr, mean_ptr, n_slots,
    layer_base_ptr, layer_lo_ptr, layer_len_ptr, layer_rope_ptr, cos_ptr, sin_ptr, out_ptr, pre_ptr, rope_tokens,
    H: tl.constexpr, HALF: tl.constexpr, BT: tl.constexpr, KEEP_PRE: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    head = tl.program_id(2)
    n = tl.load(seg_n_ptr + seg).to(tl.int64)
    t = (tl.program_id(1) * BT + tl.arange(0, BT)).to(tl.int64)
    live = (t < n)[:, None]
    d = tl.arange(0, HALF)[None, :]
    D: tl.constexpr = 2 * HALF
    base = tl.load(seg_out_ptr + seg).to(tl.int64)
    layer = tl.load(seg_layer_ptr + seg)
    pos = tl.load(seg_p0_ptr + seg).to(tl.int64) + t
    lo = tl.load(layer_lo_ptr + layer).to(tl.int64)
    nl = tl.load(layer_len_ptr + layer).to(tl.int64)
    lbase = tl.load(layer_base_ptr + layer).to(tl.int64)
    rope = tl.load(layer_rope_ptr + layer).to(tl.int64) * rope_tokens * D + pos[:, None] * D
    # symbols: the segment's keys (channels component-major over its n tokens), then its values; dequantized with
    # the chunk's step and mean of each channel (key slot = layer, value slot = L + layer), as the reference does.
    # Loaded as [channels, tokens] tiles (tokens contiguous in memory: whole sectors) and transposed on chip: the
    # [tokens, channels] loads strode n bytes between neighbouring threads (10.4 -> 6.7 ms at 32K tokens, H100)
    ch = head * D + d
    dT = tl.arange(0, HALF)[:, None]
    tT = t[None, :]
    srcT = sym_ptr + base + (head * D + dT) * n + tT
    liveT = tT < n
    sk1 = tl.trans(tl.load(srcT, mask=liveT, other=0)).to(tl.float32)
    sk2 = tl.trans(tl.load(srcT + HALF * n, mask=liveT, other=0)).to(tl.float32)
    sv1 = tl.trans(tl.load(srcT + H * D * n, mask=liveT, other=0)).to(tl.float32)
    sv2 = tl.trans(tl.load(srcT + H * D * n + HALF * n, mask=liveT, other=0)).to(tl.float32)
    kslot = (tl.load(seg_chunk_ptr + seg).to(tl.int64) * n_slots + layer) * (H * D)
    vslot = kslot + (n_slots // 2) * (H * D)
    k1 = (sk1 - 63.0) * tl.load(step_ptr + kslot + ch) + tl.load(mean_ptr + kslot + ch)
    k2 = (sk2 - 63.0) * tl.load(step_ptr + kslot + ch + HALF) + tl.load(mean_ptr + kslot + ch + HALF)
    v1 = (sv1 - 63.0) * tl.load(step_ptr + vslot + ch) + tl.load(mean_ptr + vslot + ch)
    v2 = (sv2 - 63.0) * tl.load(step_ptr + vslot + ch + HALF) + tl.load(mean_ptr + vslot + ch + HALF)
    c1 = tl.load(cos_ptr + rope + d, mask=live, other=0.0)
    c2 = tl.load(cos_ptr + rope + HALF + d, mask=live, other=0.0)
    s1 = tl.load(sin_ptr + rope + d, mask=live, other=0.0)
    s2 = tl.load(sin_ptr + rope + HALF + d, mask=live, other=0.0)
    # the layer's output: keys (1, H, nl, D) then values (1, H, nl, D), row = position - lo
    row = (head * nl + pos - lo)[:, None] * D
    ty = out_ptr.dtype.element_ty
    kdst = out_ptr + lbase + row + d
    # transformers' rotate_half convention, the same fp32 operations as kvtool.arch.apply_rope
    tl.store(kdst, (k1 * c1 + (-k2) * s1).to(ty), mask=live)
    tl.store(kdst + HALF, (k2 * c2 + k1 * s2).to(ty), mask=live)
    vdst = kdst + H * nl * D
    tl.store(vdst, v1.to(ty), mask=live)
    tl.store(vdst + HALF, v2.to(ty), mask=live)
    if KEEP_PRE:
        pdst = pre_ptr + lbase // 2 + row + d
        tl.store(pdst, k1.to(ty), mask=live)
        tl.store(pdst + HALF, k2.to(ty), mask=live)


def finish_adaptive_triton(args: dict[str, torch.Tensor | int], sym: torch.Tensor, out: torch.Tensor,
                           pre: torch.Tensor | None) -> None:  # fmt: skip
    """Adaptive files: every segment's symbols (``sym``, uint8, the decode kernel's output), dequantized with their
    chunk's step and mean per channel (``(s − 63)·step + mean`` in float32) → the layers' keys (RoPE applied) and
    values, written in ``out``'s dtype at ``layer_base`` (per layer: keys
    ``(H, n_l, D)`` then values), and the pre-RoPE keys into ``pre`` (per layer ``(H, n_l, D)`` at
    ``layer_base / 2``) when given. Reference: :func:`kvtool.codecs.device_decode.finish_layer`."""
    n_seg = int(args["n_segments"])
    max_n = int(args["max_n"])
    if n_seg == 0 or max_n == 0:
        return
    heads, dim = int(args["heads"]), int(args["head_dim"])
    bt = max(16, min(128, 8192 // dim))
    grid = (n_seg, triton.cdiv(max_n, bt), heads)
    _finish_adaptive_kernel[grid](
        sym, args["seg_out"], args["seg_n"], args["seg_p0"], args["seg_slot"], args["seg_chunk"],
        args["comp_step"], args["comp_mean"], int(args["n_slots"]), args["layer_base"],
        args["layer_lo"], args["layer_len"], args["layer_rope"], args["cos"], args["sin"], out,
        pre if pre is not None else out, int(args["rope_tokens"]),
        H=heads, HALF=dim // 2, BT=bt, KEEP_PRE=pre is not None, num_warps=4,
    )  # fmt: skip
