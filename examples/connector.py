"""The engine-connector API on the embedded model: a prefix cache already in memory → ``.kvz`` bytes → K/V again,
with no file and no prefill at load time, timed beside the prefill it replaces (``make demo`` runs this).

    python examples/connector.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import time

import torch

import kvtool
from kvtool.codecs.kvz import CodecSettings, prefill_cache
from kvtool.models import tokenize
from kvtool.texts import load_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    lm = kvtool.load_model("smollm2-135m", device="cpu")
    ids = tokenize(lm.tokenizer, load_text("persuasion"), prompt=True)[: args.tokens]
    t0 = time.perf_counter()
    with torch.no_grad():
        cache = prefill_cache(lm.model, ids)  # what an engine has after its prefill
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = kvtool.encode_kv(lm, cache, ids, settings=CodecSettings(mode="adaptive", quality=0.5))
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    layers = kvtool.decode_kv(blob, lm)  # per layer (keys, values), post-RoPE, as the model caches them
    decode_s = time.perf_counter() - t0
    fp16 = 2 * sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    err = max(float((k - layer.keys).norm() / layer.keys.norm()) for (k, _), layer in zip(layers, cache.layers,
                                                                                           strict=True))  # fmt: skip
    print(f"{ids.numel()} tokens of Persuasion on {lm.fingerprint['id']}: prefill {prefill_s:.2f} s")
    print(f"encode_kv: {len(blob):,} bytes ({fp16 / len(blob):.1f}x smaller than fp16) in {encode_s:.2f} s")
    print(f"decode_kv: {len(layers)} layers of K/V in {decode_s:.2f} s ({prefill_s / decode_s:.1f}x faster than "
          f"the prefill); largest relative key error {err:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
