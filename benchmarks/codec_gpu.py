"""GPU throughput of the ``.kvz`` hot path (Triton rANS kernels + torch transform stages), on real symbol streams.

The symbols are a real SmolLM2 stream (``benchmarks/capture_stream.py``: calibrated PCA coding of Persuasion),
tiled to the number of symbols each shape needs (same symbols-per-element ratio), so tables, alphabet sizes and
run structure are real. Every timing: CUDA events, warm-up, median of ``--repeats`` runs, cycling through
``--sets`` differently-offset input sets so caches do not flatter. Reported per shape and T:

* ``decode_rans`` / ``encode_rans``: the entropy-coding kernels alone;
* ``decode_full``: rANS decode with fused dequantization (Triton, fp16 coefficients) → stream-to-matrix transpose →
  inverse transform (per-layer basis, fp16 cuBLAS bmm) → RoPE (Triton, in place) → fp16 K/V;
* ``encode_full``: forward transform → quantize → matrix-to-stream transpose → rANS encode (+ stream compaction);
* GB/s fp16-equivalent (2 bytes per KV element / time), ms per 1k tokens, and the fraction of the copy bandwidth
  (``torch`` device-to-device copy of 2 GiB, measured in the same run, bytes read + written).

Bit-exactness: the Triton encoder's words are compared with the CPU reference on the SmolLM2 stream itself.

    python benchmarks/codec_gpu.py --stream benchmarks/data/stream.pt --json $OUT/codec_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from kvtool.codecs import rans
from kvtool.kernels.rans_triton import decode_interleaved, decode_triton, encode_interleaved, encode_triton, interleave
from kvtool.kernels.rope_triton import rope_triton

SHAPES = {"smollm2": (30, 3, 64), "llama-3-8b": (32, 8, 128)}


def _time(fn, repeats: int, sets: int) -> float:
    for s in range(sets):  # warm-up (compilation, caches)
        fn(s)
    torch.cuda.synchronize()
    times = []
    for r in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    t = _time(lambda s: y.copy_(x), 10, 1)
    return 2 * x.numel() * 2 / t / 1e9


def _tile(t: torch.Tensor, n: int, offset: int) -> torch.Tensor:
    reps = math.ceil((n + offset) / t.numel())
    return t.repeat(reps)[offset : offset + n]


def run_shape(stream: dict, name: str, tokens: int, lane_len: int, repeats: int, sets: int, copy_gbs: float) -> dict:
    layers, heads, dim = SHAPES[name]
    elements = tokens * layers * 2 * heads * dim
    ratio = stream["symbols"].numel() / stream["elements"]
    n = int(elements * ratio)
    tables = rans.build_tables(stream["freq"].to(torch.int64))
    dev = torch.device("cuda")
    inputs = []
    sets = 1 if n > 200_000_000 else sets  # GB-sized inputs: no cache can flatter them, and memory is finite
    for s in range(sets):
        off = (s * 7919 * 4096) % stream["symbols"].numel()
        sym = _tile(stream["symbols"], n, off).to(dev, torch.int32)
        tid = _tile(stream["table_ids"], n, off).to(dev, torch.int32)
        lengths, _ = rans.lane_lengths([n], lane_len)
        words, per_lane = encode_triton(sym, tid, tables, lengths)
        # Step-major table ids depend only on the layout (level, chunk geometry): built once, reused per file.
        tid_sm = interleave(tid, lengths)
        inputs.append((sym, tid_sm, lengths.to(dev), words, per_lane))
    # Transform stages: per layer and K/V a (C x C) basis, C = heads * dim; the coded components are the first
    # `coded` of each slot (the stream's coded fraction); steps per component.
    c = heads * dim
    slots = layers * 2
    coded = max(1, int(round(c * ratio)))
    basis = torch.linalg.qr(torch.randn(slots, c, c, device=dev))[0].half()
    steps = (torch.rand(slots, coded, device=dev) * 0.1 + 0.01).half()
    cos = torch.randn(tokens, dim, device=dev).half()
    sin = torch.randn(tokens, dim, device=dev).half()

    def decode_rans(s: int) -> torch.Tensor:
        _, tid_sm, lengths, words, per_lane = inputs[s]
        return decode_interleaved(words, per_lane, tid_sm, tables, lengths)[0]

    # Dequantization tables per rANS table (component): step (fp16) and the clamp kmax. The stream order is
    # (chunk of 256 tokens, slot, component, token): a transpose away from the (slot, token, component) matrix the
    # inverse transform reads.
    n_tables = tables.freq.shape[0]
    table_step = torch.rand(n_tables, device=dev) * 0.1 + 0.01
    table_kmax = torch.full((n_tables,), 63.0, device=dev)
    chunk = min(256, tokens)
    used = slots * tokens * coded

    def decode_full(s: int) -> torch.Tensor:
        _, tid_sm, lengths, words, per_lane = inputs[s]
        # rANS decode with the dequantization fused: fp16 coefficients, step-major
        coeff_sm = decode_interleaved(words, per_lane, tid_sm, tables, lengths, torch.float16,
                                      (table_step, table_kmax))[0]  # fmt: skip
        stream = coeff_sm.T.reshape(-1)  # lane-major = stream order (padding of short lanes aside)
        stream = stream[:used] if stream.numel() >= used else _tile(stream, used, 0)
        coeff = stream.view(tokens // chunk, slots, coded, chunk).permute(1, 0, 3, 2).reshape(slots, tokens, coded)
        x = torch.bmm(coeff, basis[:, :coded, :]).view(slots, tokens, heads, dim)  # (slots, T, C)
        return rope_triton(x, cos, sin, out=x)  # (on values too: pessimistic by half a pass)

    kv = torch.randn(slots, tokens, c, device=dev).half()

    def encode_rans(s: int) -> tuple:
        sym, tid_sm, lengths, _, _ = inputs[s]
        return encode_interleaved(interleave(sym, lengths), tid_sm, tables, lengths)

    def encode_full(s: int) -> tuple:
        coeff = torch.bmm(kv, basis[:, :, :coded])  # (slots, T, coded)
        q = (torch.clamp(torch.round(coeff / steps[:, None, :]), -63, 63) + 63).to(torch.int32)
        sym, tid_sm, lengths, _, _ = inputs[s]
        # matrix → stream order (cost counted); the real symbols are then coded
        _ = q.view(slots, tokens // chunk, chunk, coded).permute(1, 0, 3, 2).contiguous()
        return encode_interleaved(interleave(sym, lengths), tid_sm, tables, lengths)

    out = {"shape": name, "tokens": tokens, "lane_symbols": lane_len, "elements": elements, "symbols": n}
    for label, fn in (("decode_rans", decode_rans), ("decode_full", decode_full), ("encode_rans", encode_rans),
                      ("encode_full", encode_full)):  # fmt: skip
        t = _time(fn, repeats, sets)
        gbs = elements * 2 / t / 1e9
        out[label] = {"ms": t * 1e3, "gb_s": gbs, "ms_per_1k_tokens": t * 1e3 * 1000 / tokens,
                      "fraction_of_copy": gbs / copy_gbs}  # fmt: skip
    inputs.clear()
    torch.cuda.empty_cache()
    return out


def check_exact(stream: dict) -> dict:
    """Triton encode of the real stream equals the CPU reference, and decodes back exactly on both."""
    tables = rans.build_tables(stream["freq"].to(torch.int64))
    sym, tid = stream["symbols"].to(torch.int64), stream["table_ids"].to(torch.int64)
    lengths = stream["lengths"].to(torch.int64)
    ref_w, ref_l = rans.encode_reference(sym, tid, tables, lengths)
    gpu_w, gpu_l = encode_triton(sym.cuda(), tid.cuda(), tables, lengths)
    same = torch.equal(ref_w, gpu_w.cpu()) and torch.equal(ref_l, gpu_l.cpu())
    back = decode_triton(ref_w.cuda(), ref_l, tid.cuda(), tables, lengths).cpu()
    cpu_back = rans.decode_reference(gpu_w.cpu(), gpu_l.cpu(), tid, tables, lengths)
    return {"symbols": sym.numel(), "words_equal": same, "gpu_decodes_cpu_stream": torch.equal(back, sym),
            "cpu_decodes_gpu_stream": torch.equal(cpu_back, sym),
            "bits_per_symbol": 16 * ref_w.numel() / sym.numel()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stream", default="benchmarks/data/stream.pt")
    p.add_argument("--tokens", default="256,2048,32768")
    p.add_argument("--shapes", default="smollm2,llama-3-8b")
    p.add_argument("--lanes", default="4096,1024")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--skip-exact", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    stream = torch.load(args.stream)
    result = {"device": torch.cuda.get_device_name(), "copy_gb_s": copy_bandwidth(), "rows": []}
    print(f"{result['device']}: copy {result['copy_gb_s']:.0f} GB/s", flush=True)
    if not args.skip_exact:
        result["exact"] = check_exact(stream)
        print("exact:", result["exact"], flush=True)
    for name in args.shapes.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for lane in (int(x) for x in args.lanes.split(",")):
                row = run_shape(stream, name, tokens, lane, args.repeats, args.sets, result["copy_gb_s"])
                result["rows"].append(row)
                print(f"{name:10s} T={tokens:6d} lane={lane:5d} " + " ".join(
                    f"{k}: {row[k]['gb_s']:7.1f} GB/s {row[k]['ms']:8.3f} ms" for k in
                    ("decode_rans", "decode_full", "encode_rans", "encode_full")), flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
