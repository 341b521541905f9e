"""Interleaved rANS entropy coder: many independent streams ("lanes") coded in lock-step, static integer tables.

rANS (Duda, arXiv:1311.2540) with a 32-bit state and 16-bit renormalisation (the variant GPU coders use, e.g.
Giesen's interleaved rANS and DietGPU): state ``x ∈ [2^16, 2^32)``, probabilities quantised to ``2^PROB_BITS``;
encoding one symbol emits at most one 16-bit word, decoding reads at most one. So a step is the same work for
every lane and whole batches of lanes advance together: this module is the pure-torch reference, vectorised across
lanes (CPU at useful speed), and the layout the Triton kernels of :mod:`kvtool.kernels` reproduce bit for bit.

Layout. A batch codes ``symbols`` (flat, int) split into lanes of consecutive symbols of the given ``lane_lengths``
(:func:`lane_lengths` cuts segments, e.g. layers, into lanes that never cross them); symbol ``i`` uses table
``table_ids[i]``. Each lane's stream is its final state (two words, low
first) followed by the words the encoder emitted, in the order the decoder reads them. Streams are concatenated
lane after lane; ``words_per_lane`` gives their lengths. Everything is little-endian uint16.

Tables are built by :func:`build_tables` from counts, deterministically in integer arithmetic: every symbol of the
alphabet gets a frequency ≥ 1, so any symbol can be coded with a static table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
STATE_LOW = 1 << 16  #: lower bound of the normalised state
MAX_ALPHABET = 256


@dataclass(frozen=True)
class Tables:
    """Static coding tables: ``freq``/``cum`` ``(n_tables, alphabet + 1)`` int64 (cum has the total at the end),
    ``lut`` ``(n_tables, PROB_SCALE)`` uint8: slot → symbol for table-lookup decoding."""

    freq: torch.Tensor
    cum: torch.Tensor
    lut: torch.Tensor

    @property
    def alphabet(self) -> int:
        return self.freq.shape[1]


def quantize_counts(counts: torch.Tensor, alphabet_sizes: torch.Tensor) -> torch.Tensor:
    """Integer frequencies ``(n, A)`` summing to ``PROB_SCALE`` per row from non-negative ``counts`` ``(n, A)``.

    Symbols ``< alphabet_sizes[row]`` get at least 1; the others 0. Exact integer arithmetic (deterministic on every
    machine): ``floor(count · spare / total) + 1``, the remainder to the symbols with the largest counts (lowest index
    first on ties). On ``counts``' device (integers only: the same frequencies on every device)."""
    counts = counts.to(torch.int64).clamp_min(0)
    n, a = counts.shape
    dev = counts.device
    alphabet_sizes = alphabet_sizes.to(dev)
    if a > MAX_ALPHABET or bool(((alphabet_sizes < 1) | (alphabet_sizes > a)).any()):
        raise ValueError(f"alphabet sizes must be in 1..{min(a, MAX_ALPHABET)}")
    live = torch.arange(a, device=dev)[None, :] < alphabet_sizes[:, None]
    counts = torch.where(live, counts, torch.zeros_like(counts))
    total = counts.sum(1, keepdim=True)
    spare = PROB_SCALE - alphabet_sizes[:, None].to(torch.int64)
    base = torch.where(total > 0, counts * spare // total.clamp_min(1), torch.zeros_like(counts))
    freq = base + live.to(torch.int64)
    left = PROB_SCALE - freq.sum(1)  # 0 <= left < a
    # Hand out the remainder one by one to the largest counts (stable order: ties go to the lower symbol).
    order = torch.sort(torch.where(live, counts, torch.full_like(counts, -1)), dim=1, descending=True, stable=True)
    ranks = torch.arange(a, device=dev).expand(n, a).contiguous()
    rank = torch.empty_like(order.indices).scatter_(1, order.indices, ranks)
    # Round-robin over the live symbols in that order: a row with fewer live symbols than the remainder (an
    # all-zero row) goes round several times; each symbol gets the full rounds, plus one if its rank is below the
    # rest (the closed form of handing out one at a time).
    n_live = live.sum(1)
    rounds, rest = left // n_live, left % n_live
    return freq + (rounds[:, None] + (rank < rest[:, None]).to(torch.int64)) * live.to(torch.int64)


def symbol_counts_reference(symbols: torch.Tensor, alphabet: int) -> torch.Tensor:
    """Per row of ``symbols`` ``(rows, n)`` uint8 (values below ``alphabet``), how often each value occurs:
    ``(rows, alphabet)`` int64, on ``symbols.device``. Exact integers, so the same on every device."""
    rows = symbols.shape[0]
    if rows == 0:
        return torch.zeros(0, alphabet, dtype=torch.int64, device=symbols.device)
    offset = torch.arange(rows, dtype=torch.int32, device=symbols.device)[:, None] * alphabet
    flat = (symbols.to(torch.int32) + offset).reshape(-1)
    return torch.bincount(flat, minlength=rows * alphabet).reshape(rows, alphabet)


def build_tables(freq: torch.Tensor, check: bool = True, lut: bool = True) -> Tables:
    """:class:`Tables` from integer frequencies ``(n, A)`` (each row sums to ``PROB_SCALE``). ``check=False``
    leaves the check to the caller (a device pipeline that checks on the device, without a host round trip).
    ``lut=False``: no slot → symbol table (``(n, 0)``): an encoder reads only ``freq`` and ``cum``, and the table
    is ``PROB_SCALE`` searches per row (a 32K-token prefix has ~8,000 rows)."""
    freq = freq.to(torch.int64)
    if check and (bool((freq.sum(1) != PROB_SCALE).any()) or bool((freq < 0).any())):
        raise ValueError(f"every frequency row must be non-negative and sum to {PROB_SCALE}")
    cum = torch.zeros(freq.shape[0], freq.shape[1] + 1, dtype=torch.int64, device=freq.device)
    cum[:, 1:] = freq.cumsum(1)
    if not lut:
        return Tables(freq=freq, cum=cum, lut=torch.zeros(freq.shape[0], 0, dtype=torch.uint8, device=freq.device))
    slots = torch.arange(PROB_SCALE, device=freq.device)
    found = torch.searchsorted(cum[:, 1:].contiguous(), slots.expand(freq.shape[0], -1).contiguous(), right=True)
    return Tables(freq=freq, cum=cum, lut=found.to(torch.uint8))


def lane_lengths(segments: list[int], lane_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanes of at most ``lane_len`` symbols over consecutive ``segments`` (sizes), never crossing a segment:
    ``(lengths (n_lanes,), lanes per segment (len(segments),))``, int64. Empty segments get no lane."""
    seg = torch.tensor([int(n) for n in segments], dtype=torch.int64)
    per = (seg + lane_len - 1) // lane_len
    lengths = torch.full((int(per.sum()),), lane_len, dtype=torch.int64)
    if lengths.numel():  # each segment's last lane holds the rest (a whole lane when the size divides evenly)
        last = (per.cumsum(0) - 1)[per > 0]
        lengths[last] = seg[per > 0] - (per[per > 0] - 1) * lane_len
    return lengths, per


def encode_reference(
    symbols: torch.Tensor, table_ids: torch.Tensor, tables: Tables, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode flat ``symbols`` (int, ``< alphabet``) with per-symbol ``table_ids``.

    Returns ``(words, words_per_lane)``: uint16-valued int32 words ``(total,)`` (lanes concatenated) and int64
    ``(n_lanes,)``."""
    sym = symbols.to(torch.int64).reshape(-1)
    tid = table_ids.to(torch.int64).reshape(-1)
    n = sym.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
    if int(lengths.sum()) != n or bool((lengths < 1).any()):
        raise ValueError("lane lengths must be positive and cover the symbols")
    if bool((tables.freq.reshape(-1)[tid * tables.freq.shape[1] + sym.clamp(0, tables.freq.shape[1] - 1)] <= 0).any()):
        raise ValueError("a symbol outside its table's alphabet")
    if bool((sym < 0).any()) or bool((sym >= tables.freq.shape[1]).any()):
        raise ValueError("a symbol outside its table's alphabet")
    n_lanes, lane_len = lengths.numel(), int(lengths.max())
    lane_start = lengths.cumsum(0) - lengths
    x = torch.full((n_lanes,), STATE_LOW, dtype=torch.int64)
    emitted = torch.full((lane_len, n_lanes), -1, dtype=torch.int64)
    freq_flat, cum_flat, a = tables.freq.reshape(-1), tables.cum.reshape(-1), tables.freq.shape[1]
    for k in range(lane_len - 1, -1, -1):  # rANS encodes backwards so the decoder reads forwards
        active = k < lengths
        idx = (lane_start + k).clamp_max(n - 1)
        s, t = sym[idx], tid[idx]
        f = freq_flat[t * a + s]
        c = cum_flat[t * (a + 1) + s]
        f = torch.where(active, f, torch.ones_like(f))
        flush = active & (x >= (f << (32 - PROB_BITS)))
        emitted[k] = torch.where(flush, x & 0xFFFF, emitted[k])
        x = torch.where(flush, x >> 16, x)
        enc = ((x // f) << PROB_BITS) + (x % f) + c
        x = torch.where(active, enc, x)
    # Per lane: [state low, state high, emitted words in forward order].
    body = torch.cat([(x & 0xFFFF)[None], (x >> 16)[None], emitted], dim=0).T  # (n_lanes, lane_len + 2)
    keep = body >= 0
    return body[keep].to(torch.int32), keep.sum(1)


def decode_reference(
    words: torch.Tensor, words_per_lane: torch.Tensor, table_ids: torch.Tensor, tables: Tables, lengths: torch.Tensor
) -> torch.Tensor:
    """Inverse of :func:`encode_reference`: the flat symbols (int64). Raises ``ValueError`` when the streams are
    inconsistent (a lane reads past its end or does not end in the initial state)."""
    tid = table_ids.to(torch.int64).reshape(-1)
    n = tid.numel()
    if n == 0:
        if words.numel() or words_per_lane.numel():
            raise ValueError("words for an empty batch")
        return torch.zeros(0, dtype=torch.int64)
    n_lanes, lane_len = lengths.numel(), int(lengths.max())
    if int(lengths.sum()) != n:
        raise ValueError("lane lengths do not cover the symbols")
    if words_per_lane.numel() != n_lanes:
        raise ValueError(f"expected {n_lanes} lanes, got {words_per_lane.numel()}")
    w = words.to(torch.int64).reshape(-1)
    ends = words_per_lane.to(torch.int64).cumsum(0)
    starts = ends - words_per_lane.to(torch.int64)
    if int(ends[-1]) != w.numel() or bool((words_per_lane < 2).any()):
        raise ValueError("lane lengths do not match the stream")
    w = torch.cat([w, torch.zeros(1, dtype=torch.int64)])  # a safe slot for lanes past their end
    x = w[starts] | (w[(starts + 1).clamp_max(w.numel() - 1)] << 16)
    ptr = starts + 2
    out = torch.zeros(n, dtype=torch.int64)
    lane_start = lengths.cumsum(0) - lengths
    freq_flat, cum_flat, a = tables.freq.reshape(-1), tables.cum.reshape(-1), tables.freq.shape[1]
    lut_flat = tables.lut.reshape(-1).to(torch.int64)
    for k in range(lane_len):
        active = k < lengths
        idx = (lane_start + k).clamp_max(n - 1)
        t = tid[idx]
        slot = x & (PROB_SCALE - 1)
        s = lut_flat[t * PROB_SCALE + slot]
        f = freq_flat[t * a + s]
        c = cum_flat[t * (a + 1) + s]
        nxt = f * (x >> PROB_BITS) + slot - c
        read = active & (nxt < STATE_LOW)
        nxt = torch.where(
            read, (nxt << 16) | w[torch.where(read, ptr, torch.full_like(ptr, -1)).clamp(-1, w.numel() - 1)], nxt
        )
        ptr = ptr + read.to(torch.int64)
        x = torch.where(active, nxt, x)
        out[idx[active]] = s[active]
    if bool((ptr != ends).any()) or bool((x != STATE_LOW).any()):
        raise ValueError("corrupt stream: a lane does not end where its length says")
    return out
