"""Triton kernels against their torch references, exactly (run by ``test_kernels.py`` under TRITON_INTERPRET=1 on
tiny shapes, and on a GPU at real sizes: ``python tests/kernel_checks.py --device cuda --big``).

Checks, for every case: the Triton encoder's words equal the reference's; each backend decodes the other's stream
to the original symbols; on real KV chunks (the adaptive coder on KV of several shapes: 1 KV head, head_dim 64 /
128 / 256, odd token counts) the ``.kvz`` chunk bytes are identical across backends.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvtool.codecs import rans
from kvtool.codecs.coding import AdaptiveCoder
from kvtool.kernels import rans_decode, rans_encode


def _random_case(seed: int, n: int, tables_n: int, alphabet: int, lane_len: int, device: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(tables_n, alphabet, generator=gen) * 3, dim=1)
    tables = rans.build_tables(rans.quantize_counts((probs * 1e6).long(), torch.full((tables_n,), alphabet)))
    tid = torch.randint(0, tables_n, (n,), generator=gen)
    sym = torch.multinomial(probs[tid], 1, generator=gen)[:, 0]
    cut = sorted(torch.randint(0, n + 1, (3,), generator=gen).tolist())
    lengths, _ = rans.lane_lengths([cut[0], cut[1] - cut[0], 0, cut[2] - cut[1], n - cut[2]], lane_len)
    ref_w, ref_l = rans.encode_reference(sym, tid, tables, lengths)
    tri_w, tri_l = rans_encode(sym.to(device), tid.to(device), tables, lengths, backend="triton")
    assert torch.equal(ref_w, tri_w.cpu()) and torch.equal(ref_l, tri_l.cpu()), f"encode differs (seed {seed})"
    back = rans_decode(ref_w.to(device), ref_l, tid.to(device), tables, lengths, backend="triton")
    assert torch.equal(back.cpu(), sym), f"triton decode of the reference stream differs (seed {seed})"
    assert torch.equal(rans.decode_reference(tri_w.cpu(), tri_l.cpu(), tid, tables, lengths), sym)


def _kv_case(heads: int, head_dim: int, tokens: int, layers: int, device: str) -> None:
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim + tokens)
    kv = [(torch.randn(heads, tokens, head_dim, generator=gen) * torch.rand(1, 1, head_dim, generator=gen) * 4,
           torch.randn(heads, tokens, head_dim, generator=gen)) for _ in range(layers)]  # fmt: skip
    chunks = {}
    for backend, dev in (("torch", "cpu"), ("triton", device)):
        coder = AdaptiveCoder(layers, heads * head_dim, 0.5)
        coder.lane_len, coder.backend, coder.device = 97, backend, torch.device(dev)
        chunks[backend] = coder.encode(kv)
    a, b = chunks["torch"], chunks["triton"]
    assert torch.equal(a.words, b.words) and torch.equal(a.lanes, b.lanes), f"chunk bytes differ {heads}x{head_dim}"
    coder = AdaptiveCoder(layers, heads * head_dim, 0.5)
    coder.lane_len, coder.backend, coder.device = 97, "triton", torch.device(device)
    ref = AdaptiveCoder(layers, heads * head_dim, 0.5)
    ref.lane_len = 97
    got = coder.decode(a, [tokens] * layers, heads, head_dim)
    want = ref.decode(a, [tokens] * layers, heads, head_dim)
    for (gk, gv), (wk, wv) in zip(got, want, strict=True):
        assert torch.equal(gk, wk) and torch.equal(gv, wv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--big", action="store_true", help="real sizes (GPU)")
    args = p.parse_args(argv)
    scale = 200 if args.big else 1
    for seed in range(4):
        _random_case(seed, 500 * scale + seed, 5, 17 + seed * 40, 13 * (1 + seed) * (scale if args.big else 1),
                     args.device)  # fmt: skip
    _random_case(9, 3, 1, 2, 1, args.device)  # tiny: one table, binary alphabet, lanes of one symbol
    shapes = [(1, 64, 7), (2, 128, 5), (1, 256, 3)] if not args.big else [(1, 64, 1023), (8, 128, 2047), (2, 256, 511)]
    for heads, dim, tokens in shapes:
        _kv_case(heads, dim, tokens, 2, args.device)
    print("kernel checks: all equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
