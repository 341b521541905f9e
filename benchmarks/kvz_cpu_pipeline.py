"""The product path on the CPU with the embedded default: ``kvtool.load_cache`` of a stored SmolLM2 prefix vs its
prefill, measured in one run on this machine.

    python benchmarks/kvz_cpu_pipeline.py [--tokens 2048] [--repeats 3] [--json out.json]

For each mode (adaptive at ``--quality``, lossless): encode once, then the median of ``--repeats`` prefills (one
forward of the prompt with the cache on, the pieces ``encode`` uses) and of ``--repeats`` ``load_cache`` calls
(file → ``DynamicCache``, every check included), and the fp16-equivalent decode rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--quality", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import kvtool
    from kvtool.codecs.kvz import CodecSettings, encode_prefix, prefill_cache
    from kvtool.kernels import pick_backend
    from kvtool.models import load_model, tokenize
    from kvtool.texts import book

    lm = load_model("smollm2-135m", "cpu", "float32")
    ids = tokenize(lm.tokenizer, book("persuasion"), prompt=True)[: args.tokens]
    prefill_cache(lm.model, ids)  # warm-up
    prefill_s = _median(lambda: prefill_cache(lm.model, ids), args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for settings in (CodecSettings(mode="adaptive", quality=args.quality), CodecSettings(mode="lossless")):
            path = Path(tmp) / f"{settings.mode}.kvz"
            info = encode_prefix(lm, ids, settings, path)
            kvtool.load_cache(path, lm)  # warm-up (JIT cache load)
            load_s = _median(lambda path=path: kvtool.load_cache(path, lm), args.repeats)
            fp16_bytes = 2 * lm.arch.kv_elements_per_token() * int(ids.numel())
            rows.append({"mode": settings.mode, "bytes": info["bytes"], "bits_per_element": info["bits_per_element"],
                         "load_cache_s": load_s, "prefill_s": prefill_s, "decode_mb_s": fp16_bytes / load_s / 1e6,
                         "faster_than_prefill": prefill_s / load_s})  # fmt: skip
    out = {"tokens": int(ids.numel()), "threads": torch.get_num_threads(),
           "backend": pick_backend("auto", torch.device("cpu")), "rows": rows}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"SmolLM2-135M, {out['tokens']} tokens, {out['threads']} threads, rANS backend {out['backend']}")
    print(f"{'mode':9} {'bits':>6} {'prefill s':>10} {'load_cache s':>13} {'MB/s':>7} {'x prefill':>10}")
    for r in rows:
        print(f"{r['mode']:9} {r['bits_per_element']:6.3f} {r['prefill_s']:10.3f} {r['load_cache_s']:13.3f} "
              f"{r['decode_mb_s']:7.1f} {r['faster_than_prefill']:10.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
