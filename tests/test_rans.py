"""The rANS reference coder: exact round trips, determinism, closeness to the entropy, corrupt-stream detection,
and the integer table construction."""

from __future__ import annotations

import math

import pytest
import torch

from kvtool.codecs import rans


def _tables(n: int, alphabet: int, seed: int) -> tuple[torch.Tensor, rans.Tables]:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, alphabet, generator=gen) * 2, dim=1)
    freq = rans.quantize_counts((probs * 1e6).long(), torch.full((n,), alphabet))
    return probs, rans.build_tables(freq)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lane_len", [1, 7, 256])
def test_round_trip(seed: int, lane_len: int) -> None:
    probs, tables = _tables(5, 17, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    n = 3000
    tid = torch.randint(0, 5, (n,), generator=gen)
    sym = torch.multinomial(probs[tid], 1, generator=gen)[:, 0]
    lengths, _ = rans.lane_lengths([1000, 0, 2000], lane_len)
    words, per_lane = rans.encode_reference(sym, tid, tables, lengths)
    assert int(words.min()) >= 0 and int(words.max()) < 1 << 16
    assert torch.equal(rans.decode_reference(words, per_lane, tid, tables, lengths), sym)
    again = rans.encode_reference(sym, tid, tables, lengths)
    assert torch.equal(again[0], words) and torch.equal(again[1], per_lane)


def test_rare_symbols_and_extreme_tables() -> None:
    """A table where one symbol has almost all the mass and the others the minimum frequency 1."""
    freq = torch.ones(1, 256, dtype=torch.int64)
    freq[0, 3] = rans.PROB_SCALE - 255
    tables = rans.build_tables(freq)
    sym = torch.tensor([0, 255, 3, 3, 3, 128, 3, 1] * 50)
    tid = torch.zeros_like(sym)
    lengths, _ = rans.lane_lengths([sym.numel()], 64)
    words, per_lane = rans.encode_reference(sym, tid, tables, lengths)
    assert torch.equal(rans.decode_reference(words, per_lane, tid, tables, lengths), sym)


def test_close_to_entropy() -> None:
    """With long lanes the coded size is within 1.5 % of the ideal code length under the true probabilities
    (table quantisation to 12 bits and the 32-bit final state per lane are the only losses)."""
    probs, tables = _tables(8, 31, 0)
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    tid = torch.randint(0, 8, (n,), generator=gen)
    sym = torch.multinomial(probs[tid], 1, generator=gen)[:, 0]
    lengths, _ = rans.lane_lengths([n], 4096)
    words, _ = rans.encode_reference(sym, tid, tables, lengths)
    ideal = -float(probs[tid].gather(1, sym[:, None]).log2().sum())
    assert words.numel() * 16 <= ideal * 1.015
    assert words.numel() * 16 >= ideal * 0.99


def test_corrupt_streams_are_detected() -> None:
    probs, tables = _tables(3, 9, 2)
    gen = torch.Generator().manual_seed(3)
    tid = torch.randint(0, 3, (2000,), generator=gen)
    sym = torch.multinomial(probs[tid], 1, generator=gen)[:, 0]
    lengths, _ = rans.lane_lengths([2000], 500)
    words, per_lane = rans.encode_reference(sym, tid, tables, lengths)
    caught = 0
    for i in range(0, words.numel(), 7):
        bad = words.clone()
        bad[i] ^= 0x0101
        try:
            out = rans.decode_reference(bad, per_lane, tid, tables, lengths)
        except ValueError:
            caught += 1
            continue
        assert not torch.equal(out, sym) or torch.equal(bad, words)
    assert caught > 0
    with pytest.raises(ValueError):
        rans.decode_reference(words[:-1], per_lane, tid, tables, lengths)
    with pytest.raises(ValueError):
        rans.encode_reference(torch.tensor([9]), torch.tensor([0]), tables, torch.tensor([1]))


@pytest.mark.parametrize("seed", range(5))
def test_quantize_counts(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 1000, (6, 40), generator=gen) * (torch.rand(6, 40, generator=gen) > 0.5)
    counts[0] = 0  # an empty histogram still gives a valid table
    sizes = torch.tensor([40, 1, 2, 17, 40, 39])
    freq = rans.quantize_counts(counts, sizes)
    assert torch.equal(freq.sum(1), torch.full((6,), rans.PROB_SCALE))
    live = torch.arange(40)[None] < sizes[:, None]
    assert bool((freq[live] >= 1).all()) and bool((freq[~live] == 0).all())
    assert torch.equal(freq, rans.quantize_counts(counts, sizes))
    # Proportional up to the +1 floor and the remainder.
    row = freq[4].double()
    target = counts[4].double() / counts[4].sum() * rans.PROB_SCALE
    assert float((row - target).abs().max()) <= 41


def test_lookup_table_matches_cumulative_frequencies() -> None:
    _, tables = _tables(4, 10, 5)
    for t in range(4):
        for slot in range(0, rans.PROB_SCALE, 97):
            s = int(tables.lut[t, slot])
            assert int(tables.cum[t, s]) <= slot < int(tables.cum[t, s + 1])


def test_lane_lengths() -> None:
    lengths, per = rans.lane_lengths([10, 0, 4, 8], 4)
    assert lengths.tolist() == [4, 4, 2, 4, 4, 4] and per.tolist() == [3, 0, 1, 2]
    assert math.isclose(float(lengths.sum()), 22)
