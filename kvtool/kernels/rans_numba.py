"""Numba (CPU) twin of the interleaved rANS coder: the lanes spread over the CPU threads, each lane a sequential
loop in compiled code.

Same signatures and the same bytes as :func:`kvtool.codecs.rans.encode_reference` /
:func:`~kvtool.codecs.rans.decode_reference`, the same ``ValueError`` on the same corrupt inputs (integer arithmetic
only, so equality is exact). Inputs on another device are copied to the CPU; outputs are CPU tensors.

Speed: the decoder steps ``GROUP`` lanes in lock-step inside each thread (their dependency chains overlap in the
core) with one table load per symbol (``slot → symbol | freq − 1 | slot − cum`` packed in a uint32) and a
branch-free renormalisation. Threads: ``min(torch.get_num_threads(), NUMBA_NUM_THREADS)``.

Inputs the fast path does not cover (table ids outside the tables, negative lane lengths, tables that
:func:`~kvtool.codecs.rans.build_tables` cannot produce) are handed to the torch reference, so even those behave
exactly as the reference does.

JIT: the kernels compile on first use (a few seconds) and are cached on disk (``cache=True``: ``NUMBA_CACHE_DIR``
when set and writable, else ``__pycache__`` next to this file, else the user cache ``~/.cache/numba``); later
processes load them in a fraction of a second. When no cache location is writable (numba would then refuse
``cache=True`` at import) they are compiled in memory, in every process. See docs/kvz.md, "CPU backend (numba)".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch

from kvtool.codecs import rans
from kvtool.codecs.rans import PROB_BITS, PROB_SCALE, STATE_LOW, Tables

GROUP = 4  #: lanes a thread decodes in lock-step (the kernel is written for 4)
_SLOT_MASK = PROB_SCALE - 1
_FLUSH_SHIFT = 32 - PROB_BITS
_RCP_SHIFT = 32 + PROB_BITS  #: encoder division by reciprocal (see _encode_table)
_TABLES: dict[tuple[str, int], tuple[Tables, Any]] = {}


def _jit(fn: Callable[..., Any] | None = None, **opts: Any) -> Any:
    """``numba.njit(cache=True, nogil=True, error_model="numpy", **opts)``; without a writable cache location
    (numba then refuses ``cache=True`` outright) the same, compiled in memory."""

    def wrap(f: Callable[..., Any]) -> Any:
        kw = {"nogil": True, "error_model": "numpy", **opts}
        try:
            return numba.njit(cache=True, **kw)(f)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(cache=False, **kw)(f)

    return wrap(fn) if fn is not None else wrap


@_jit(inline="always")
def _decode_step(x, p, t, words, last, dtab):
    """One decode step of one lane: ``(state, word pointer, symbol)`` after decoding with table ``t``."""
    e = np.int64(dtab[t, x & _SLOT_MASK])
    nxt = (((e >> 8) & 0xFFF) + 1) * (x >> PROB_BITS) + (e >> 20)
    r = np.int64(nxt < STATE_LOW)
    w = np.int64(words[min(p, last)])  # a read past the lane's end fails the final check whatever it reads
    return (nxt << (r << 4)) | (w & -r), p + r, e & 0xFF


@_jit(inline="always")
def _table_id(tid, i, n_tables):
    """``(table id, 1 if outside the tables)``; an id outside reads table 0 (the caller hands over to the reference)."""
    t = np.int64(tid[i])
    bad = np.int64(np.uint64(t) >= np.uint64(n_tables))
    return t & (bad - 1), bad


@_jit(parallel=True)
def _decode_lanes(words, wstart, lstart, lengths, tid, dtab, out, state, ptr, flags):
    """Decode every lane into ``out``; per lane the final ``state`` and word pointer ``ptr``; ``flags[group]`` 1
    when a table id is outside the tables. Lanes go in groups of ``GROUP`` (4), stepped in lock-step by one thread
    for their common length (four independent dependency chains in flight), then each alone to its end."""
    n_lanes = lengths.shape[0]
    n_tables = dtab.shape[0]
    last = words.shape[0] - 1
    n_groups = (n_lanes + GROUP - 1) // GROUP
    for g in numba.prange(n_groups):
        lo = g * GROUP
        cnt = min(GROUP, n_lanes - lo)
        x = np.zeros(GROUP, np.int64)
        p = np.zeros(GROUP, np.int64)
        b = np.zeros(GROUP, np.int64)
        common = lengths[lo]
        for j in range(cnt):
            ws = wstart[lo + j]
            x[j] = np.int64(words[ws]) | (np.int64(words[ws + 1]) << 16)
            p[j] = ws + 2
            b[j] = lstart[lo + j]
            common = min(common, lengths[lo + j])
        bad = np.int64(0)
        if cnt == GROUP:
            x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
            p0, p1, p2, p3 = p[0], p[1], p[2], p[3]
            b0, b1, b2, b3 = b[0], b[1], b[2], b[3]
            for k in range(common):
                t0, e0 = _table_id(tid, b0 + k, n_tables)
                t1, e1 = _table_id(tid, b1 + k, n_tables)
                t2, e2 = _table_id(tid, b2 + k, n_tables)
                t3, e3 = _table_id(tid, b3 + k, n_tables)
                bad |= e0 | e1 | e2 | e3
                x0, p0, out[b0 + k] = _decode_step(x0, p0, t0, words, last, dtab)
                x1, p1, out[b1 + k] = _decode_step(x1, p1, t1, words, last, dtab)
                x2, p2, out[b2 + k] = _decode_step(x2, p2, t2, words, last, dtab)
                x3, p3, out[b3 + k] = _decode_step(x3, p3, t3, words, last, dtab)
            x[0], x[1], x[2], x[3] = x0, x1, x2, x3
            p[0], p[1], p[2], p[3] = p0, p1, p2, p3
        else:
            common = 0
        for j in range(cnt):  # the rest of each lane alone
            xx, pp, bb = x[j], p[j], b[j]
            for k in range(common, lengths[lo + j]):
                t, e = _table_id(tid, bb + k, n_tables)
                bad |= e
                xx, pp, out[bb + k] = _decode_step(xx, pp, t, words, last, dtab)
            state[lo + j] = xx
            ptr[lo + j] = pp
        flags[g] = bad


@_jit(inline="always")
def _encode_step(x, wp, i, sym, tid, ftab, buf):
    """One encode step of one lane (symbol ``i``): ``(state, write pointer, 1 if the symbol cannot be coded)``. An
    uncodable symbol is coded as if its frequency were 1 (the caller discards the lane and raises)."""
    t = np.int64(tid[i])
    s = np.int64(sym[i])
    bad = np.int64((np.uint64(t) >= np.uint64(ftab.shape[0])) | (np.uint64(s) >= np.uint64(ftab.shape[1])))
    t &= bad - 1
    s &= bad - 1
    e = ftab[t, s, 0]
    f = e & 0xFFFF
    bad |= np.int64(f == 0)
    f |= np.int64(f == 0)
    flush = np.int64(x >= (f << _FLUSH_SHIFT))
    buf[wp - 1] = x & 0xFFFF  # kept only when flushing (else overwritten: wp does not move)
    x >>= flush << 4
    # x div f, exactly, as a multiply: x < f·2^20 here and m = ceil(2^44 / f) (module docstring of _encode_table)
    q = np.int64((np.uint64(x) * np.uint64(ftab[t, s, 1] | bad)) >> np.uint64(_RCP_SHIFT))
    return (q << PROB_BITS) + (x - q * f) + (e >> 16), wp - flush, bad


@_jit(parallel=True)
def _encode_lanes(sym, tid, lstart, lengths, ftab, buf, first, flags):
    """Each lane backwards into its own slice of ``buf`` (``length + 2`` words, filled from the end): the lane's
    stream is ``buf[first[lane] : end of its slice]``; ``flags[group]`` 1 when a symbol cannot be coded. Groups of
    ``GROUP`` lanes in lock-step over their last ``common`` symbols (as the decoder), then each lane alone."""
    n_lanes = lengths.shape[0]
    n_groups = (n_lanes + GROUP - 1) // GROUP
    for g in numba.prange(n_groups):
        lo = g * GROUP
        cnt = min(GROUP, n_lanes - lo)
        x = np.full(GROUP, np.int64(STATE_LOW))
        wp = np.zeros(GROUP, np.int64)
        e = np.zeros(GROUP, np.int64)  # last symbol index of the lane + 1
        common = lengths[lo]
        for j in range(cnt):
            e[j] = lstart[lo + j] + lengths[lo + j]
            wp[j] = e[j] + 2 * (lo + j) + 2
            common = min(common, lengths[lo + j])
        bad = np.int64(0)
        if cnt == GROUP:
            x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
            w0, w1, w2, w3 = wp[0], wp[1], wp[2], wp[3]
            e0, e1, e2, e3 = e[0] - 1, e[1] - 1, e[2] - 1, e[3] - 1
            for k in range(common):
                x0, w0, b0 = _encode_step(x0, w0, e0 - k, sym, tid, ftab, buf)
                x1, w1, b1 = _encode_step(x1, w1, e1 - k, sym, tid, ftab, buf)
                x2, w2, b2 = _encode_step(x2, w2, e2 - k, sym, tid, ftab, buf)
                x3, w3, b3 = _encode_step(x3, w3, e3 - k, sym, tid, ftab, buf)
                bad |= b0 | b1 | b2 | b3
            x[0], x[1], x[2], x[3] = x0, x1, x2, x3
            wp[0], wp[1], wp[2], wp[3] = w0, w1, w2, w3
        else:
            common = 0
        for j in range(cnt):  # the rest of each lane alone
            xx, ww = x[j], wp[j]
            for i in range(e[j] - 1 - common, lstart[lo + j] - 1, -1):
                xx, ww, bb = _encode_step(xx, ww, i, sym, tid, ftab, buf)
                bad |= bb
            buf[ww - 2] = xx & 0xFFFF
            buf[ww - 1] = xx >> 16
            first[lo + j] = ww - 2
        flags[g] = bad


@_jit(parallel=True)
def _compact(buf, first, ends, offsets, out):
    for lane in numba.prange(first.shape[0]):
        o = offsets[lane]
        for i in range(first[lane], ends[lane]):
            out[o] = buf[i]
            o += 1


@_jit
def _pack_decode_table(lut, freq, cum, a, dtab):
    """``dtab[t, slot] = s | (f − 1) << 8 | (slot − c) << 20`` with the reference's flat indexing; False when some
    entry does not fit (then the reference decodes)."""
    nf, nc = freq.shape[0], cum.shape[0]
    for t in range(lut.shape[0]):
        for slot in range(lut.shape[1]):
            s = np.int64(lut[t, slot])
            fi = t * a + s
            ci = t * (a + 1) + s
            if s < 0 or s > 0xFF or fi < 0 or fi >= nf or ci < 0 or ci >= nc:
                return False
            f = np.int64(freq[fi])
            bias = slot - np.int64(cum[ci])
            if f < 1 or f > PROB_SCALE or bias < 0 or bias > _SLOT_MASK:
                return False
            dtab[t, slot] = np.uint32(s | ((f - 1) << 8) | (bias << 20))
    return True


def _cached(kind: str, tables: Tables, make: Callable[[Tables], Any]) -> Any:
    key = (kind, id(tables))
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is tables:
        return hit[1]
    made = make(tables)
    if len(_TABLES) >= 4:  # per-chunk (adaptive) tables are new every batch: keep only a few
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = (tables, made)  # keeps ``tables`` alive, so its id is not reused while cached
    return made


def _decode_table(tables: Tables) -> np.ndarray | None:
    lut = tables.lut
    if lut.dim() != 2 or lut.shape[1] != PROB_SCALE or tables.freq.dim() != 2:
        return None
    if not _integral(tables.freq, tables.cum, lut):
        return None
    lut_np = _np(lut.to(torch.int64) if lut.dtype not in (torch.uint8, torch.int64) else lut)
    dtab = np.zeros((lut.shape[0], PROB_SCALE), np.uint32)
    freq = _np(tables.freq.reshape(-1).to(torch.int64))
    cum = _np(tables.cum.reshape(-1).to(torch.int64))
    return dtab if _pack_decode_table(lut_np, freq, cum, tables.freq.shape[1], dtab) else None


def _encode_table(tables: Tables) -> np.ndarray | None:
    """Per (table, symbol) ``[f | c << 16, ceil(2^44 / f)]`` int64 (``f ≤ 0``: ``[0, 0]``, a symbol the encoder
    refuses, as the reference does); ``None`` for tables whose states could leave 32 bits (then the reference
    encodes).

    The reciprocal makes ``x div f`` exact as ``(x · m) >> 44`` in 64 bits: the encoder divides only states
    ``x < f · 2^20`` (after renormalisation) by ``f ≤ 2^12``; with ``m = ceil(2^44 / f) = (2^44 + e) / f``,
    ``0 ≤ e < f``, ``x·m / 2^44 = x/f + x·e / (f·2^44)`` and ``x·e < f²·2^20 ≤ 2^44``, so the error stays below
    ``1/f`` and the floor is exact; and ``x·m < 2^64``."""
    if not _integral(tables.freq, tables.cum):
        return None
    freq, cum = tables.freq.to(torch.int64), tables.cum.to(torch.int64)
    if freq.dim() != 2 or cum.dim() != 2 or cum.shape[0] != freq.shape[0] or cum.shape[1] != freq.shape[1] + 1:
        return None
    c = cum[:, :-1]
    live = freq > 0
    if bool((live & ((c < 0) | (freq + c > PROB_SCALE))).any()):
        return None
    packed = torch.where(live, freq | (c << 16), torch.zeros_like(freq))
    rcp = torch.where(live, ((1 << _RCP_SHIFT) + freq - 1) // freq.clamp_min(1), torch.zeros_like(freq))
    return _np(torch.stack([packed, rcp], dim=2))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _integral(*ts: torch.Tensor) -> bool:
    return not any(t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool for t in ts)


def _ints(t: torch.Tensor) -> np.ndarray:
    """Flat int32 or int64 view of ``t`` with its values (int64 for anything that int32 would not hold)."""
    t = t.detach().cpu().reshape(-1)
    if t.dtype in (torch.int8, torch.uint8, torch.int16, torch.uint16):
        t = t.to(torch.int32)
    elif t.dtype not in (torch.int32, torch.int64):
        t = t.to(torch.int64)
    return t.contiguous().numpy()


def _set_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def encode_numba(
    symbols: torch.Tensor, table_ids: torch.Tensor, tables: Tables, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numba twin of :func:`kvtool.codecs.rans.encode_reference` (same bytes, same errors); runs on the CPU."""
    n = symbols.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
    lengths = lengths.detach().cpu()
    if int(lengths.sum()) != n or bool((lengths < 1).any()):
        raise ValueError("lane lengths must be positive and cover the symbols")
    ftab = _cached("encode", tables, _encode_table)
    if ftab is None or lengths.dim() != 1 or table_ids.numel() != n or not _integral(lengths):
        return rans.encode_reference(symbols.cpu(), table_ids.cpu(), tables, lengths)
    lens = lengths.to(torch.int64)
    lstart = lens.cumsum(0) - lens
    n_lanes = lens.numel()
    buf = np.empty(n + 2 * n_lanes, np.int32)
    first = np.empty(n_lanes, np.int64)
    flags = np.zeros((n_lanes + GROUP - 1) // GROUP, np.uint8)
    sym, tid = _ints(symbols), _ints(table_ids)
    _set_threads()
    _encode_lanes(sym, tid, _np(lstart), _np(lens), ftab, buf, first, flags)
    if flags.any():
        # A symbol outside its table (ValueError) or a table id outside the tables: the reference fails (or wraps
        # around) on the latter before it looks at the symbols, so it decides what happens then.
        if _tid_out_of_range(table_ids, ftab.shape[0]):
            return rans.encode_reference(symbols.cpu(), table_ids.cpu(), tables, lengths)
        raise ValueError("a symbol outside its table's alphabet")
    ends = _np(lstart + lens + 2 * torch.arange(n_lanes) + 2)
    per_lane = ends - first
    offsets = np.cumsum(per_lane) - per_lane
    words = np.empty(int(per_lane.sum()), np.int32)
    _compact(buf, first, ends, offsets, words)
    return torch.from_numpy(words), torch.from_numpy(per_lane)


def _tid_out_of_range(table_ids: torch.Tensor, n_tables: int) -> bool:
    tid = table_ids.detach().cpu().reshape(-1)
    return bool(((tid < 0) | (tid >= n_tables)).any())


def decode_numba(
    words: torch.Tensor, words_per_lane: torch.Tensor, table_ids: torch.Tensor, tables: Tables, lengths: torch.Tensor
) -> torch.Tensor:
    """Numba twin of :func:`kvtool.codecs.rans.decode_reference` (same symbols, same corruption checks); runs on
    the CPU."""
    words, words_per_lane, lengths = words.detach().cpu(), words_per_lane.detach().cpu(), lengths.detach().cpu()
    n = table_ids.numel()
    if n == 0:
        if words.numel() or words_per_lane.numel():
            raise ValueError("words for an empty batch")
        return torch.zeros(0, dtype=torch.int64)
    n_lanes = lengths.numel()
    int(lengths.max())  # the reference's own failure on an empty lane list
    if int(lengths.sum()) != n:
        raise ValueError("lane lengths do not cover the symbols")
    if words_per_lane.numel() != n_lanes:
        raise ValueError(f"expected {n_lanes} lanes, got {words_per_lane.numel()}")
    per_lane = words_per_lane.to(torch.int64)
    ends = per_lane.cumsum(0)
    if int(ends[-1]) != words.numel() or bool((words_per_lane < 2).any()):
        raise ValueError("lane lengths do not match the stream")
    dtab = _cached("decode", tables, _decode_table)
    if (dtab is None or lengths.dim() != 1 or words_per_lane.dim() != 1 or not _integral(lengths, words_per_lane)
            or bool((lengths < 0).any())):  # fmt: skip
        return rans.decode_reference(words, words_per_lane, table_ids.cpu(), tables, lengths)
    lens = lengths.to(torch.int64)
    out = np.empty(n, np.int64)
    state = np.empty(n_lanes, np.int64)
    ptr = np.empty(n_lanes, np.int64)
    flags = np.zeros((n_lanes + GROUP - 1) // GROUP, np.uint8)
    _set_threads()
    _decode_lanes(_ints(words), _np(ends - per_lane), _np(lens.cumsum(0) - lens), _np(lens), _ints(table_ids), dtab,
                  out, state, ptr, flags)  # fmt: skip
    if flags.any():  # a table id outside the tables: whatever the reference does with it
        return rans.decode_reference(words, words_per_lane, table_ids.cpu(), tables, lengths)
    if bool((ptr != _np(ends)).any()) or bool((state != STATE_LOW).any()):
        raise ValueError("corrupt stream: a lane does not end where its length says")
    return torch.from_numpy(out)
