"""Serdes through LMCache's own serde API, side by side (issue 15): kvtool's (``kvtool.integrations.lmcache``) and
LMCache's built-in ``fp8`` and ``turboquant``, on the same KV chunks, each built by LMCache's
``create_serde_processor`` and driven through its ``AsyncSerdeProcessor`` exactly as its L2 wrapper does (one
batch of chunk objects per task, buffers sized by ``estimate_serialized_size``, completion by eventfd).

The chunks: a model of the given shape with random bf16 weights built in code (Llama-3.1-8B: 32 layers, 8 KV heads
× 128) prefilled on Persuasion's words hashed into its vocabulary, its cache cut into LMCache's MP layout
``(2, L, 256, kv_heads·head_dim)``, in pinned host memory (where LMCache's L1 keeps objects). Reported per serde:
stored bytes per token, encode / decode GB/s fp16-equivalent (2 bytes per element, median of ``--repeats``), and the
relative RMS error of K and V after the round trip.

    python benchmarks/lmcache_serde.py --json out.json                                  # on a GPU
    python benchmarks/lmcache_serde.py --device cpu --shape smollm2 --tokens 512 --serdes kvtool@2.0,fp8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CHUNK = 256


def serde_spec(name: str, head_dim: int, model_path: str) -> dict[str, Any]:
    """``kvtool@<bits>`` (with the model's RoPE tables, from ``model_path``), ``kvtool-plain@<bits>``, ``fp8``,
    ``turboquant[:<preset>]`` → the ``"serde"`` object of an L2 adapter spec."""
    if name.startswith("kvtool@"):
        return {"type": "kvtool", "bits": float(name.split("@")[1]), "model_path": model_path}
    if name.startswith("kvtool-plain@"):
        return {"type": "kvtool", "bits": float(name.split("@")[1])}
    if name.startswith("turboquant"):
        preset = name.partition(":")[2] or "turboquant_k8v4"
        return {"type": "turboquant", "preset": preset, "head_dim": head_dim}
    return {"type": name}


def chunks_of(shape: str, tokens: int, device: str, config_dir: Path) -> tuple[torch.Tensor, int]:
    """``(n_chunks, 2, L, CHUNK, D)`` bf16 chunks of a prefilled random model's cache, and its head_dim; the
    model's config is saved in ``config_dir`` (the kvtool serde's ``model_path``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from kvz_gpu_pipeline import build_model, text_ids

    from kvtool.codecs.chunk_record import engine_layout
    from kvtool.codecs.encode import prefill_cache

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(shape, device, dtype)
    model.config.save_pretrained(config_dir)
    ids = text_ids(tokens, model.config.vocab_size)
    with torch.no_grad():
        cache = prefill_cache(model, ids)
    dim = cache.layers[0].keys.shape[-1]
    kv = engine_layout(cache).to(torch.bfloat16).cpu()
    n = kv.shape[2] // CHUNK
    del model, cache
    return torch.stack([kv[:, :, i * CHUNK : (i + 1) * CHUNK] for i in range(n)]).contiguous(), dim


def run(names: list[str], chunks: torch.Tensor, head_dim: int, repeats: int, model_path: str) -> list[dict[str, Any]]:
    from lmcache.v1.distributed.api import ObjectKey

    import kvtool.integrations.lmcache  # noqa: F401 - registers "kvtool"
    from kvtool.integrations.lmcache import objects

    pin = torch.cuda.is_available()
    shape = chunks.shape[1:]
    keys = [ObjectKey(chunk_hash=bytes([i % 256]) * 32, model_name="bench", kv_rank=0) for i in range(len(chunks))]
    srcs = []
    for c in chunks:
        o = objects.memory_obj(shape, c.dtype, pin=pin)
        o.tensor.copy_(c)
        srcs.append(o)
    fp16_bytes = 2 * chunks.numel()
    rows = []
    for name in names:
        spec = serde_spec(name, head_dim, model_path)
        row: dict[str, Any] = {"serde": name, "config": spec}
        try:
            proc = objects.serde_from_spec(spec)
            dsts = [objects.memory_obj(shape, chunks.dtype, pin=pin) for _ in srcs]
            enc, dec = [], []
            for _ in range(repeats + 1):  # the first round warms up (kernels compiled, tables cached)
                t0 = time.perf_counter()
                ok, bufs = objects.store(proc, srcs, keys, pin)
                t1 = time.perf_counter()
                ok &= objects.load(proc, bufs, dsts, keys)
                t2 = time.perf_counter()
                if not ok:
                    raise RuntimeError("a serde task failed (see LMCache's log above)")
                enc.append(t1 - t0)
                dec.append(t2 - t1)
            proc.close()
            out = torch.stack([d.tensor for d in dsts]).float()
            ref = chunks.float()
            err = [float((out[:, i] - ref[:, i]).pow(2).mean().sqrt() / ref[:, i].pow(2).mean().sqrt()) for i in (0, 1)]
            stored = sum(b.get_size() for b in bufs)
            row |= {"bytes_per_token": stored / (len(chunks) * CHUNK), "bits_per_element": 8 * stored / chunks.numel(),
                    "encode_s": statistics.median(enc[1:]), "decode_s": statistics.median(dec[1:]),
                    "encode_gb_s": fp16_bytes / statistics.median(enc[1:]) / 1e9,
                    "decode_gb_s": fp16_bytes / statistics.median(dec[1:]) / 1e9, "rel_err_k": err[0],
                    "rel_err_v": err[1]}  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a serde that cannot run here is reported in its row
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile_record(chunk: torch.Tensor, model_path: str, device: str) -> None:
    """Where one record's encode and decode spend their time (host profile; the device synchronised at the end)."""
    import cProfile
    import pstats

    from kvtool.codecs.chunk_record import RecordSettings, decode_record, encode_record, record_size
    from kvtool.integrations.lmcache.serde import ModelRope

    rope = ModelRope(model_path)
    rope_at = rope.at(chunk.shape[1])
    settings = RecordSettings(bits=2.0)
    buf = torch.empty(record_size(chunk.shape, settings), dtype=torch.uint8)
    kv = chunk.to(device)
    out = torch.empty_like(chunk)
    for _ in range(2):  # warm-up (Triton compiles), then timed
        t0 = time.perf_counter()
        encode_record(kv, settings, buf, rope_at=rope_at)
        t1 = time.perf_counter()
        decode_record(buf, out, rope_at=rope_at, device=torch.device(device))
        t2 = time.perf_counter()
    print(f"one record: encode {1e3 * (t1 - t0):.1f} ms, decode {1e3 * (t2 - t1):.1f} ms", flush=True)
    for name, call in (("encode", lambda: encode_record(kv, settings, buf, rope_at=rope_at)),
                       ("decode", lambda: decode_record(buf, out, rope_at=rope_at, device=torch.device(device)))):
        prof = cProfile.Profile()
        prof.runcall(call)
        print(f"--- {name}", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--serdes", default="kvtool@2.0,kvtool@3.0,kvtool-plain@2.0,fp8,turboquant,"
                    "turboquant:turboquant_3bit_nc")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true", help="cProfile one record's encode and decode (no LMCache)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as config_dir:
        chunks, head_dim = chunks_of(args.shape, args.tokens, args.device, Path(config_dir))
        if args.profile:
            profile_record(chunks[1], config_dir, args.device)
        rows = run(args.serdes.split(","), chunks, head_dim, args.repeats, config_dir)
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "shape": args.shape,
           "tokens": args.tokens, "chunk_shape": list(chunks.shape[1:]), "rows": rows}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"{'serde':34} {'B/token':>9} {'bits/el':>7} {'enc GB/s':>8} {'dec GB/s':>8} {'err K':>6} {'err V':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['serde']:34} {r['error'][:80]}")
            continue
        print(f"{r['serde']:34} {r['bytes_per_token']:9.0f} {r['bits_per_element']:7.3f} {r['encode_gb_s']:8.2f} "
              f"{r['decode_gb_s']:8.2f} {r['rel_err_k']:6.3f} {r['rel_err_v']:6.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
