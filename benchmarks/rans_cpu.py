"""CPU rANS speed: the torch reference vs the numba twin, encode and decode, on a realistic stream.

The stream (default): the first ``--tokens`` tokens of Persuasion prefilled on the embedded SmolLM2-135M (CPU), cut
into 256-token chunks and coded by kvtool's adaptive coder exactly as ``decode_kvz`` batches them (``BATCH_CHUNKS``
chunks per call of the entropy coder, 4,096-symbol lanes, one table per layer, K/V and chunk). ``--synthetic``:
Gaussian symbols quantized to 127 levels (per-table spread), 254 tables, the same lane length, no model needed.

Reported: symbols/s and fp16-equivalent MB/s (2 bytes per symbol), best and median of ``--repeats`` calls, with
``--threads`` CPU threads (torch and numba alike); the first numba call of the process (the JIT compile, or the load
of the on-disk cache) is timed separately. Every output is checked against the reference::

    python benchmarks/rans_cpu.py                  # real SmolLM2 KV, 2,048 tokens
    python benchmarks/rans_cpu.py --synthetic --symbols 23592960
    python benchmarks/rans_cpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvtool.codecs import rans
from kvtool.codecs.kvz import BATCH_CHUNKS


def real_stream(tokens: int) -> dict[str, Any]:
    """Symbols, table ids, lane lengths and tables of the first ``BATCH_CHUNKS`` chunks' worth of SmolLM2 KV."""
    from kvtool.capture import rope_for_positions
    from kvtool.codecs.chunk_coders import batch_layers
    from kvtool.codecs.kvz import CodecSettings, Geometry, make_coder, prefill_cache
    from kvtool.models import load_model, tokenize
    from kvtool.texts import load_text

    lm = load_model("smollm2-135m", "cpu", "float32")
    ids = tokenize(lm.tokenizer, load_text("evaluation"), prompt=True)[:tokens]
    settings = CodecSettings(mode="adaptive")
    coder = make_coder(settings, None, lm.arch)
    geo = Geometry(lm.arch, ids.numel(), settings)
    with torch.no_grad():
        cache = prefill_cache(lm.model, ids)
    rope = rope_for_positions(lm.model, lm.arch.num_layers, torch.arange(ids.numel()))
    chunks = [batch_layers(geo, cache, rope, [c])[0][0] for c in range(geo.num_chunks)]
    batches = []
    for first in range(0, len(chunks), BATCH_CHUNKS):
        batch = chunks[first : first + BATCH_CHUNKS]
        coded = [coder.side_and_symbols(layers) for layers in batch]
        tables, offsets = coder._batch_tables([c[0] for c in coded])
        syms, tids, lengths = [], [], []
        for (_, s, t, segments), off in zip(coded, offsets, strict=True):
            syms.append(s)
            tids.append(t + off)
            lengths.append(rans.lane_lengths(segments, coder.lane_len)[0])
        batches.append((torch.cat(syms), torch.cat(tids), torch.cat(lengths), tables))
    return {"name": f"smollm2-135m adaptive, {ids.numel()} tokens", "batches": batches}


def synthetic_stream(n: int, n_tables: int, lane_len: int, seed: int = 0) -> dict[str, Any]:
    """Gaussian symbols quantized to 127 levels, ``n_tables`` tables of different spreads, lanes of ``lane_len``
    symbols with one table per 4 lanes' worth of symbols (as the coder's component-major layout gives)."""
    gen = torch.Generator().manual_seed(seed)
    kmax = 63
    sd = torch.rand(n_tables, generator=gen) * 6 + 0.3  # in quantization steps
    tid = (torch.arange(n) // (4 * lane_len)) % n_tables
    sym = (torch.randn(n, generator=gen) * sd[tid]).round().clamp(-kmax, kmax).to(torch.int64) + kmax
    counts = torch.zeros(n_tables, 2 * kmax + 1, dtype=torch.int64)
    counts.index_put_((tid, sym), torch.ones_like(sym), accumulate=True)
    tables = rans.build_tables(rans.quantize_counts(counts, torch.full((n_tables,), 2 * kmax + 1)))
    lengths, _ = rans.lane_lengths([n], lane_len)
    name = f"synthetic Gaussian, {n} symbols, {n_tables} tables, lanes of {lane_len}"
    return {"name": name, "batches": [(sym, tid, lengths, tables)]}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _rate(n: int, times: list[float]) -> dict[str, float]:
    best, med = min(times), statistics.median(times)
    return {"best_s": best, "median_s": med, "msym_per_s": n / best / 1e6, "fp16_mb_per_s": 2 * n / best / 1e6,
            "msym_per_s_median": n / med / 1e6}  # fmt: skip


def measure(
    sym: torch.Tensor,
    tid: torch.Tensor,
    lengths: torch.Tensor,
    tables: rans.Tables,
    repeats: int,
    ref_repeats: int,
    first_call: dict[str, float] | None,
) -> dict[str, Any]:
    """Reference and numba encode and decode of one batch, each output checked against the reference;
    ``first_call``: also time the process's first numba calls (JIT compile or cache load, table packing, one run)."""
    from kvtool.kernels.rans_numba import decode_numba, encode_numba

    n = sym.numel()
    ref_enc, (words, per_lane) = _timed(lambda: rans.encode_reference(sym, tid, tables, lengths), ref_repeats)
    if first_call is not None:
        for op, call in (("encode", lambda: encode_numba(sym, tid, tables, lengths)),
                         ("decode", lambda: decode_numba(words, per_lane, tid, tables, lengths))):  # fmt: skip
            t0 = time.perf_counter()
            call()
            first_call[op] = time.perf_counter() - t0
    nb_enc, (w2, l2) = _timed(lambda: encode_numba(sym, tid, tables, lengths), repeats)
    assert torch.equal(w2, words) and torch.equal(l2, per_lane), "numba encode differs from the reference"
    ref_dec, back = _timed(lambda: rans.decode_reference(words, per_lane, tid, tables, lengths), ref_repeats)
    nb_dec, back2 = _timed(lambda: decode_numba(words, per_lane, tid, tables, lengths), repeats)
    assert torch.equal(back, sym) and torch.equal(back2, sym), "decode differs"
    return {"symbols": n, "lanes": lengths.numel(), "tables": tables.freq.shape[0], "words": words.numel(),
            "bits_per_symbol": 16 * words.numel() / n,
            "encode_reference": _rate(n, ref_enc), "encode_numba": _rate(n, nb_enc),
            "decode_reference": _rate(n, ref_dec), "decode_numba": _rate(n, nb_dec)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--symbols", type=int, default=2048 * 30 * 2 * 192, help="synthetic: symbols (default 23.6 M)")
    p.add_argument("--tables", type=int, default=254, help="synthetic: tables")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="numba calls timed per batch")
    p.add_argument("--ref-repeats", type=int, default=1, help="reference calls timed per batch (slow)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from kvtool.kernels import rans_numba

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = synthetic_stream(args.symbols, args.tables, 4096) if args.synthetic else real_stream(args.tokens)
    print(f"{stream['name']}: built in {time.perf_counter() - t0:.1f} s")
    nb = rans_numba.numba
    print(f"threads: torch {torch.get_num_threads()}, numba {min(args.threads, nb.config.NUMBA_NUM_THREADS)}; "
          f"numba {nb.__version__}, torch {torch.__version__}")  # fmt: skip

    rows = []
    first_call: dict[str, float] = {}
    for i, batch in enumerate(stream["batches"]):
        row = measure(*batch, args.repeats, args.ref_repeats, first_call if i == 0 else None)
        rows.append(row | {"batch": i})
        print(f"batch {i}: {row['symbols']} symbols, {row['lanes']} lanes, {row['tables']} tables, "
              f"{row['bits_per_symbol']:.2f} bits/symbol")  # fmt: skip
        for op in ("encode", "decode"):
            r, m = row[f"{op}_reference"], row[f"{op}_numba"]
            print(f"  {op}: reference {r['best_s']:.3f} s ({r['msym_per_s']:.1f} Msym/s, {r['fp16_mb_per_s']:.0f} MB/s)"
                  f" | numba {m['best_s'] * 1e3:.1f} ms best, {m['median_s'] * 1e3:.1f} ms median "
                  f"({m['msym_per_s']:.0f} Msym/s, {m['fp16_mb_per_s']:.0f} MB/s fp16-eq)"
                  f" | x{r['best_s'] / m['best_s']:.0f}")  # fmt: skip
    print(f"numba: import {t_import:.2f} s; first call (JIT compile or cache load, incl. one run): "
          f"encode {first_call['encode']:.2f} s, decode {first_call['decode']:.2f} s")  # fmt: skip
    if args.json:
        doc = {"stream": stream["name"], "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "numba": rans_numba.numba.__version__, "torch": torch.__version__,
               "import_s": t_import, "first_call_s": first_call, "rows": rows}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
