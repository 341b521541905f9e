"""The numba rANS coder against the torch reference, exactly: the same words and lane sizes, the same symbols, and on
corrupt or malformed input the same outcome (the same exception type and message, or the same output).

The default run compiles the kernels once (cached on disk afterwards) and stays small; the randomized sweep over
many shapes and thousands of corruptions is ``slow``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from kvtool import kernels  # noqa: E402
from kvtool.codecs import rans  # noqa: E402
from kvtool.codecs.coding import AdaptiveCoder  # noqa: E402
from kvtool.errors import UsageError  # noqa: E402
from kvtool.kernels import pick_backend, rans_decode, rans_encode  # noqa: E402
from kvtool.kernels import rans_numba as rn  # noqa: E402


def _tables(n: int, alphabet: int, gen: torch.Generator, skew: float, width: int | None = None) -> rans.Tables:
    """``n`` tables over ``alphabet`` symbols (``skew`` 0: uniform; larger: peakier), ``width`` ≥ alphabet columns
    (the symbols above ``alphabet`` get frequency 0)."""
    width = width or alphabet
    logits = torch.randn(n, width, generator=gen) * skew
    counts = (torch.softmax(logits, 1) * 1e6).long()
    return rans.build_tables(rans.quantize_counts(counts, torch.full((n,), alphabet)))


def _case(seed: int, n: int, n_tables: int, alphabet: int, lane_len: int, skew: float, width: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    tables = _tables(n_tables, alphabet, gen, skew, width)
    tid = torch.randint(0, n_tables, (n,), generator=gen)
    probs = tables.freq[tid].double()
    sym = torch.multinomial(probs, 1, replacement=True, generator=gen)[:, 0] if n else torch.zeros(0, dtype=torch.int64)
    cut = sorted(torch.randint(0, n + 1, (3,), generator=gen).tolist())
    lengths, _ = rans.lane_lengths([cut[0], cut[1] - cut[0], 0, cut[2] - cut[1], n - cut[2]], lane_len)
    return sym, tid, tables, lengths


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except Exception as e:  # the type and message are compared
        return ("raised", type(e), str(e))


def _same(a: Any, b: Any) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "raised":
        return a[1:] == b[1:]
    x, y = a[1], b[1]
    if isinstance(x, tuple):
        return all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(x, y, strict=True))
    return torch.equal(x, y) and x.dtype == y.dtype


def _check_encode(sym, tid, tables, lengths) -> Any:
    ref = _outcome(lambda: rans.encode_reference(sym, tid, tables, lengths))
    got = _outcome(lambda: rn.encode_numba(sym, tid, tables, lengths))
    assert _same(ref, got), (ref if ref[0] == "raised" else "ok", got if got[0] == "raised" else "ok")
    return ref


def _check_decode(words, per_lane, tid, tables, lengths) -> Any:
    ref = _outcome(lambda: rans.decode_reference(words, per_lane, tid, tables, lengths))
    got = _outcome(lambda: rn.decode_numba(words, per_lane, tid, tables, lengths))
    assert _same(ref, got), (ref if ref[0] == "raised" else "ok", got if got[0] == "raised" else "ok")
    return ref


@pytest.mark.parametrize(
    ("seed", "n", "n_tables", "alphabet", "lane_len", "skew"),
    [
        (0, 1, 1, 2, 1, 0.0),
        (1, 300, 3, 2, 1, 3.0),
        (2, 3000, 5, 17, 7, 2.0),
        (3, 5000, 8, 127, 97, 0.0),  # uniform
        (4, 9000, 2, 127, 4096, 4.0),  # skewed, long lanes with short tails
        (5, 2500, 4, 64, 256, 8.0),  # extreme skew: many frequency-1 symbols
    ],
)
def test_matches_reference(
    seed: int, n: int, n_tables: int, alphabet: int, lane_len: int, skew: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    sym, tid, tables, lengths = _case(seed, n, n_tables, alphabet, lane_len, skew)
    kind, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
    assert kind == "ok" and words.dtype == torch.int32
    kind, back = _check_decode(words, per_lane, tid, tables, lengths)
    assert kind == "ok" and torch.equal(back, sym)
    # and the kernels did it, not the reference the wrapper hands unusual inputs to (nor for a corrupt stream)
    bad = words.clone()
    for i in range(words.numel()):
        bad[i] ^= 0x10
        if _outcome(lambda: rans.decode_reference(bad, per_lane, tid, tables, lengths))[0] == "raised":
            break
        bad[i] ^= 0x10

    def boom(*args: Any) -> None:
        raise AssertionError("handed to the reference")

    monkeypatch.setattr(rans, "encode_reference", boom)
    monkeypatch.setattr(rans, "decode_reference", boom)
    assert torch.equal(rn.encode_numba(sym, tid, tables, lengths)[0], words)
    assert torch.equal(rn.decode_numba(words, per_lane, tid, tables, lengths), sym)
    with pytest.raises(ValueError, match="corrupt stream"):
        rn.decode_numba(bad, per_lane, tid, tables, lengths)


def test_extreme_tables() -> None:
    """Frequencies 1 and 4096 − 255 in one table, a single-symbol table (frequency 4096, the state never grows)
    and a two-symbol table: the states reach both ends of [2^16, 2^32)."""
    one = torch.ones(1, 256, dtype=torch.int64)
    one[0, 3] = rans.PROB_SCALE - 255
    single = torch.zeros(1, 256, dtype=torch.int64)
    single[0, 0] = rans.PROB_SCALE
    two = torch.zeros(1, 256, dtype=torch.int64)
    two[0, 0], two[0, 1] = 1, rans.PROB_SCALE - 1
    tables = rans.build_tables(torch.cat([one, single, two]))
    gen = torch.Generator().manual_seed(9)
    tid = torch.randint(0, 3, (6000,), generator=gen)
    sym = torch.where(tid == 0, torch.tensor([0, 255, 3, 3, 3, 128, 3, 1] * 750), torch.zeros_like(tid))
    sym = torch.where((tid == 2) & (torch.rand(6000, generator=gen) < 0.3), torch.ones_like(sym), sym)
    for lane_len in (1, 5, 4096):
        lengths, _ = rans.lane_lengths([6000], lane_len)
        _, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
        assert torch.equal(_check_decode(words, per_lane, tid, tables, lengths)[1], sym)


def test_reciprocal_division_is_exact() -> None:
    """The encoder's ``x div f`` as ``(x · ceil(2^44 / f)) >> 44``, for every ``f`` at the edges of the states it
    divides (``2^16 ≤ x < f · 2^20``), in the same unsigned 64-bit arithmetic."""
    f = np.arange(1, rans.PROB_SCALE + 1, dtype=np.uint64)[:, None]
    m = ((np.uint64(1) << np.uint64(44)) + f - np.uint64(1)) // f
    q = np.array([16, 17, 1000, (1 << 19) + 1, (1 << 20) - 2, (1 << 20) - 1], dtype=np.uint64)[None, :]
    for x in (q * f - np.uint64(1), q * f, q * f + f - np.uint64(1)):
        x = np.clip(x, 1 << 16, f * np.uint64(1 << 20) - np.uint64(1))
        assert np.array_equal((x * m) >> np.uint64(44), x // f)


def test_empty_and_malformed_batches() -> None:
    sym, tid, tables, lengths = _case(11, 400, 2, 9, 50, 1.0)
    _, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
    empty = torch.zeros(0, dtype=torch.int64)
    # empty batch: nothing to code; words for it are refused
    assert _check_encode(empty, empty, tables, empty)[0] == "ok"
    assert _check_encode(empty, empty, tables, lengths)[0] == "ok"
    assert _check_decode(torch.zeros(0, dtype=torch.int32), empty, empty, tables, empty)[0] == "ok"
    assert _check_decode(words, per_lane, empty, tables, empty)[0] == "raised"
    assert _check_decode(torch.zeros(0, dtype=torch.int32), per_lane, empty, tables, empty)[0] == "raised"
    # lane lengths that do not cover the symbols, or are not positive (encode)
    for bad in (lengths[:-1], lengths + 1, torch.cat([lengths, torch.zeros(1, dtype=torch.int64)])):
        assert _check_encode(sym, tid, tables, bad)[0] == "raised"
    assert _check_decode(words, per_lane, tid, tables, lengths[:-1])[0] == "raised"
    assert _check_decode(words, per_lane, tid, tables, empty)[0] == "raised"  # the reference's own failure
    # symbols outside the alphabet, negative, or of frequency 0 (alphabet 9 of 12 columns)
    _, _, wide, _ = _case(11, 10, 2, 9, 50, 1.0, width=12)
    for value in (-1, 9, 11, 12, 300):
        bad = sym.clone()
        bad[123] = value
        assert _check_encode(bad, tid, wide, lengths)[0] == "raised"
    # table ids outside the tables: whatever the reference does (an IndexError, or a negative id wrapping around)
    for value in (2, 7, -1):
        bad = tid.clone()
        bad[57] = value
        _check_encode(sym, bad, tables, lengths)
        _check_decode(words, per_lane, bad, tables, lengths)


def test_corruptions_are_caught_as_the_reference_does() -> None:
    sym, tid, tables, lengths = _case(12, 3000, 3, 9, 500, 2.0)
    _, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
    raised = 0
    for i in range(0, words.numel(), 11):  # flipped bits
        bad = words.clone()
        bad[i] ^= 0x0101
        raised += _check_decode(bad, per_lane, tid, tables, lengths)[0] == "raised"
    assert raised > 0
    # truncated streams, with and without the lane sizes adjusted
    for cut in (1, 2, 5):
        short = per_lane.clone()
        short[-1] -= cut
        assert _check_decode(words[:-cut], per_lane, tid, tables, lengths)[0] == "raised"
        _check_decode(words[:-cut], short, tid, tables, lengths)
    # lane sizes that do not add up, are moved between lanes, are too small, or are too few / too many
    moved = per_lane.clone()
    moved[0] += 1
    moved[1] -= 1
    assert _check_decode(words, moved, tid, tables, lengths)[0] == "raised"
    tiny = per_lane.clone()
    tiny[0], tiny[1] = 1, per_lane[0] + per_lane[1] - 1
    assert _check_decode(words, tiny, tid, tables, lengths)[0] == "raised"
    assert _check_decode(words, per_lane + 1, tid, tables, lengths)[0] == "raised"
    assert _check_decode(words, per_lane[:-1], tid, tables, lengths)[0] == "raised"
    # words beyond 16 bits (an int32 or int64 stream of garbage) and other word dtypes
    for value in (1 << 16, -1, -(1 << 31), (1 << 31) - 1):
        bad = words.clone()
        bad[3] = value
        assert _check_decode(bad, per_lane, tid, tables, lengths)[0] == "raised"
    huge = words.to(torch.int64)
    huge[7] = 1 << 40
    _check_decode(huge, per_lane, tid, tables, lengths)
    assert _check_decode(words.to(torch.int64), per_lane, tid, tables, lengths)[0] == "ok"


def test_lane_length_corner_cases() -> None:
    """Zero-length lanes (decode accepts them when their stream is exactly the initial state) and negative ones
    (handed to the reference)."""
    sym, tid, tables, lengths = _case(13, 40, 2, 5, 10, 1.0)
    _, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
    z = torch.tensor([0, 1], dtype=torch.int32)
    for state in (z, torch.tensor([5, 1], dtype=torch.int32)):
        w = torch.cat([words[: per_lane[0]], state, words[per_lane[0] :]])
        pl = torch.cat([per_lane[:1], torch.tensor([2]), per_lane[1:]])
        ln = torch.cat([lengths[:1], torch.tensor([0]), lengths[1:]])
        _check_decode(w, pl, tid, tables, ln)
    neg = lengths.clone()
    neg[0] += 1
    neg[1] -= 1
    _check_decode(words, per_lane, tid, tables, neg)
    ln = torch.cat([lengths, torch.tensor([3, -3])])
    _check_decode(torch.cat([words, z, z]), torch.cat([per_lane, torch.tensor([2, 2])]), tid, tables, ln)


def _random_corruptions(seed: int, count: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    sym, tid, tables, lengths = _case(seed, 1500, 4, 13, 60, 2.5)
    _, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
    outcomes = {"ok": 0, "raised": 0}
    for _ in range(count):
        w, pl, t = words.clone(), per_lane.clone(), tid
        kind = int(torch.randint(0, 6, (1,), generator=gen))
        i = int(torch.randint(0, w.numel(), (1,), generator=gen))
        if kind == 0:  # one bit
            w[i] ^= 1 << int(torch.randint(0, 16, (1,), generator=gen))
        elif kind == 1:  # one word replaced
            w[i] = int(torch.randint(0, 1 << 16, (1,), generator=gen))
        elif kind == 2:  # a burst
            j = min(w.numel(), i + int(torch.randint(1, 9, (1,), generator=gen)))
            w[i:j] = torch.randint(0, 1 << 16, (j - i,), generator=gen, dtype=torch.int32)
        elif kind == 3:  # two words swapped
            j = int(torch.randint(0, w.numel(), (1,), generator=gen))
            w[i], w[j] = int(words[j]), int(words[i])
        elif kind == 4:  # a word moved between neighbouring lanes
            a = int(torch.randint(0, pl.numel() - 1, (1,), generator=gen))
            d = int(torch.randint(-2, 3, (1,), generator=gen))
            pl[a] += d
            pl[a + 1] -= d
        else:  # a table id changed (the symbols decode under another table)
            t = tid.clone()
            t[int(torch.randint(0, t.numel(), (1,), generator=gen))] = int(torch.randint(0, 4, (1,), generator=gen))
        outcomes[_check_decode(w, pl, t, tables, lengths)[0]] += 1
    assert outcomes["raised"] > 0


def test_random_corruptions() -> None:
    _random_corruptions(21, 150)


@pytest.mark.slow
def test_random_corruptions_many() -> None:
    for seed in range(4):
        _random_corruptions(100 + seed, 1000)


@pytest.mark.slow
def test_random_shapes_sweep() -> None:
    gen = torch.Generator().manual_seed(5)
    for seed in range(60):
        n = int(torch.randint(1, 40_000, (1,), generator=gen))
        lane_len = int(torch.randint(1, 4097, (1,), generator=gen)) if seed % 3 else 4096
        alphabet = int(torch.randint(2, 128, (1,), generator=gen))
        n_tables = int(torch.randint(1, 255, (1,), generator=gen)) if seed % 4 == 0 else int(torch.randint(1, 9, (1,)))
        skew = float(torch.rand(1, generator=gen)) * 6 if seed % 5 else 0.0
        width = alphabet + int(torch.randint(0, 3, (1,), generator=gen))
        sym, tid, tables, lengths = _case(seed, n, n_tables, alphabet, lane_len, skew, width)
        kind, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
        assert kind == "ok"
        assert torch.equal(_check_decode(words, per_lane, tid, tables, lengths)[1], sym)


def test_input_dtypes_and_devices() -> None:
    """Symbols, table ids and words of other integer dtypes give the same results (as the reference converts them)."""
    sym, tid, tables, lengths = _case(14, 2000, 3, 100, 300, 1.5)
    _, (words, per_lane) = _check_encode(sym, tid, tables, lengths)
    _check_encode(sym.to(torch.uint8), tid.to(torch.int16), tables, lengths.to(torch.int32))
    back = _check_decode(words.to(torch.int64), per_lane.to(torch.int32), tid.to(torch.int32), tables, lengths)
    assert torch.equal(back[1], sym)


def test_backend_switch_and_dispatch() -> None:
    cpu = torch.device("cpu")
    assert pick_backend("auto", cpu) == "numba"
    assert pick_backend("numba", cpu) == "numba"
    assert pick_backend("numba", torch.device("cuda")) == "numba"  # numba codes on the CPU whatever the model
    sym, tid, tables, lengths = _case(15, 700, 2, 20, 64, 1.0)
    words, per_lane = rans_encode(sym, tid, tables, lengths, backend="numba")
    assert _same(("ok", (words, per_lane)), ("ok", rans.encode_reference(sym, tid, tables, lengths)))
    assert torch.equal(rans_decode(words, per_lane, tid, tables, lengths, backend="auto"), sym)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        rans_decode(words, per_lane, tid, tables, lengths, backend="numba")
        import numba

        assert numba.get_num_threads() == 1  # torch's thread count is honoured
    finally:
        torch.set_num_threads(before)


def test_backend_switch_without_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_numba_problem", lambda: "ModuleNotFoundError: No module named 'numba'")
    assert pick_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(UsageError, match="numba is not usable") as e:
        pick_backend("numba", torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_cache_fallback_when_no_cache_location(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a writable cache location numba refuses ``cache=True`` at decoration time (RuntimeError, at import):
    the kernels are then compiled in memory."""
    import numba

    real = numba.njit

    def njit(*args: Any, cache: bool = False, **kw: Any) -> Any:
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **kw)

    monkeypatch.setattr(numba, "njit", njit)

    @rn._jit
    def add_one(x):  # noqa: ANN001, ANN202
        return x + 1

    assert add_one(41) == 42


def test_adaptive_coder_chunk_bytes() -> None:
    """Real coder chunks (adaptive, per-chunk tables): numba gives the torch backend's bytes and values."""
    gen = torch.Generator().manual_seed(3)
    heads, dim, tokens, layers = 2, 64, 37, 3
    kv = [(torch.randn(heads, tokens, dim, generator=gen) * torch.rand(1, 1, dim, generator=gen) * 4,
           torch.randn(heads, tokens, dim, generator=gen)) for _ in range(layers)]  # fmt: skip
    chunks, decoded = {}, {}
    for backend in ("torch", "numba"):
        coder = AdaptiveCoder(layers, heads * dim, 0.5)
        coder.lane_len, coder.backend = 97, backend
        chunks[backend] = coder.encode(kv)
        decoded[backend] = coder.decode(chunks["torch"], [tokens] * layers, heads, dim)
    a, b = chunks["torch"], chunks["numba"]
    assert torch.equal(a.words, b.words) and torch.equal(a.lanes, b.lanes)
    for (gk, gv), (wk, wv) in zip(decoded["numba"], decoded["torch"], strict=True):
        assert torch.equal(gk, wk) and torch.equal(gv, wv)
