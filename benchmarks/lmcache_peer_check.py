"""Smoke check of the LMCache CacheGen peer (benchmarks/lmcache_peer.py) on random KV.

    python benchmarks/lmcache_peer_check.py [--tokens 512] [--chunk 256]

Random N(0, 1) K/V for a SmolLM2-shaped cache (30 layers x 3 KV heads x 64 head_dim); prints stored bytes, bits per
K+V element, errors and encode/decode seconds (CPU, LMCache's numba coder).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvtool.eval.cachegen_peer import cachegen_available, cachegen_roundtrip  # noqa: E402


def coding_is_lossless(keys, values, r, chunk: int) -> bool:
    """Decoded values must equal LMCache's own quantize -> dequantize (no entropy coding), chunk by chunk."""
    from lmcache.storage_backend.serde.cachegen_decoder import do_dequantize
    from lmcache.storage_backend.serde.cachegen_encoder import torch_quant_vectorized

    for name, xs, bins in (("keys", keys, r["key_bins"]), ("values", values, r["value_bins"])):
        x = torch.stack(xs).permute(0, 2, 1, 3).flatten(2)  # [L, T, H*D], LMCache's per-layer channel layout
        y = torch.stack(r[name]).permute(0, 2, 1, 3).flatten(2)
        b = torch.tensor(bins, dtype=torch.float32)
        for s in range(0, x.shape[1], chunk):
            q, m = torch_quant_vectorized(b, x[:, s : s + chunk])
            if not torch.equal(do_dequantize(q.to(torch.uint8).float(), b, m), y[:, s : s + chunk]):
                return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()

    ok, why = cachegen_available()
    if not ok:
        print(f"CacheGen unavailable: {why}")
        return 1

    g = torch.Generator().manual_seed(0)
    shape = (args.heads, args.tokens, args.head_dim)
    keys = [torch.randn(shape, generator=g) for _ in range(args.layers)]
    values = [torch.randn(shape, generator=g) for _ in range(args.layers)]

    r = cachegen_roundtrip(keys, values, chunk_tokens=args.chunk)

    n_elem = 2 * args.layers * args.heads * args.tokens * args.head_dim
    x = torch.stack(keys + values)
    y = torch.stack(r["keys"] + r["values"])
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (y - x).abs()
    print(
        f"shape: {args.layers} layers x {args.heads} heads x {args.head_dim} head_dim x {args.tokens} tokens "
        f"(chunks {r['chunks']}), {n_elem} K+V elements"
    )
    print(f"bins: K {r['key_bins']}")
    print(f"      V {r['value_bins']}")
    print(f"bytes: {r['bytes']}  breakdown: {r['bytes_breakdown']}")
    print(
        f"bits per element: {8 * r['bytes'] / n_elem:.4f} all-in, "
        f"{8 * r['bytes_breakdown']['bitstream'] / n_elem:.4f} bitstream only"
    )
    print(f"max relative error (max|x^-x| / max|x|): {err.max().item() / x.abs().max().item():.4g}")
    print(
        f"max |x^-x| / |x| per (layer,token) row max: "
        f"{(err.amax(dim=(1, 3)) / x.abs().amax(dim=(1, 3))).max().item():.4g}"
    )

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()

    n = args.layers
    print(f"relative RMSE ||x^-x|| / ||x||: {rel(y, x):.4g}  (K {rel(y[:n], x[:n]):.4g}, V {rel(y[n:], x[n:]):.4g})")
    print(
        f"arithmetic coding lossless (decoded == LMCache quantize->dequantize without coding): "
        f"{coding_is_lossless(keys, values, r, args.chunk)}"
    )
    print(f"encode_s: {r['encode_s']:.3f}  decode_s: {r['decode_s']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
