"""kvtool's codec inside LMCache on the embedded model: SmolLM2's prefix cache, cut into LMCache's 256-token chunk
objects, stored and loaded through LMCache's own serde API (``create_serde_processor`` + ``AsyncSerdeProcessor``)
with the ``kvtool`` serde beside LMCache's ``fp8``; then a damaged record, refused (LMCache's cache miss).
``make demo`` runs this; LMCache >= 0.5.6 must be importable (``make install`` puts it in the venv).

    python examples/lmcache_serde.py [--tokens 512] [--bits 3.0]
"""

from __future__ import annotations

import argparse
import logging

import torch
from lmcache.v1.distributed.api import ObjectKey

import kvtool
import kvtool.integrations.lmcache  # noqa: F401 - registers the "kvtool" serde with LMCache
from kvtool.codecs.chunk_record import engine_layout
from kvtool.codecs.kvz import prefill_cache
from kvtool.integrations.lmcache import objects
from kvtool.models import tokenize
from kvtool.texts import load_text

CHUNK = 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--bits", type=float, default=3.0)
    args = ap.parse_args()
    lm = kvtool.load_model("smollm2-135m", device="cpu")
    ids = tokenize(lm.tokenizer, load_text("persuasion"), prompt=True)[: args.tokens - args.tokens % CHUNK]
    with torch.no_grad():
        cache = prefill_cache(lm.model, ids)
    kv = engine_layout(cache).to(torch.bfloat16)
    t = kv.shape[2]
    chunks = [kv[:, :, a : a + CHUNK].contiguous() for a in range(0, t, CHUNK)]  # LMCache's MP layout, bf16
    keys = [ObjectKey(chunk_hash=bytes([i]) * 32, model_name="smollm2-135m", kv_rank=0) for i in range(len(chunks))]
    srcs = []
    for c in chunks:
        srcs.append(objects.memory_obj(c.shape, c.dtype))
        srcs[-1].tensor.copy_(c)
    print(f"{len(chunks)} LMCache objects of shape {tuple(chunks[0].shape)} (K/V, layers, tokens, heads x head_dim)")
    print(f"{'serde':22} {'bytes/token':>11} {'vs fp8':>7} {'rel. error K / V':>17}")
    fp8_bytes = None
    for spec in ({"type": "fp8"}, {"type": "kvtool", "bits": args.bits, "model_path": "smollm2-135m"}):
        proc = objects.serde_from_spec(spec)
        ok, bufs = objects.store(proc, srcs, keys)
        dsts = [objects.memory_obj(c.shape, c.dtype) for c in chunks]
        ok &= objects.load(proc, bufs, dsts, keys)
        assert ok, "a serde task failed"
        stored = sum(b.get_size() for b in bufs) / t
        fp8_bytes = fp8_bytes or stored
        out, ref = torch.stack([d.tensor for d in dsts]).float(), torch.stack(chunks).float()
        err = [float((out[:, i] - ref[:, i]).pow(2).mean().sqrt() / ref[:, i].pow(2).mean().sqrt()) for i in (0, 1)]
        name = "fp8" if spec["type"] == "fp8" else f"kvtool, {args.bits:g} bits"
        print(f"{name:22} {stored:11,.0f} {stored / fp8_bytes:6.2f}x {err[0]:8.3f} / {err[1]:.3f}")
        if spec["type"] == "kvtool":
            bufs[0].raw_tensor[100] ^= 0x01  # one flipped bit in a stored record
            # LMCache logs the refusal with its traceback (expected here): its loggers are quiet for this one load
            loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("lmcache")]
            levels = [lg.level for lg in loggers]
            for lg in loggers:
                lg.setLevel(logging.CRITICAL)
            refused = not objects.load(proc, bufs[:1], dsts[:1], keys[:1])
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            verdict = "refused (LMCache reports a cache miss)" if refused else "ACCEPTED"
            print(f"a record with one flipped bit: {verdict}")
        proc.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
