"""The product path on a GPU: restore a stored prefix with ``kvtool.load_cache`` vs recompute it with a prefill.

For each model shape (random bf16 weights built in code: SmolLM2-135M and Llama-3.1-8B geometry) and prefix
length T, in one run on one GPU:

* ``prefill``: one forward of the T prompt tokens with the cache on (what a user does without kvtool);
* ``encode``: ``kvtool.codecs.kvz.encode_cache`` of the prefilled cache to a ``.kvz`` file (prefill excluded);
* ``load_cache``: ``kvtool.load_cache(path, model)``: file (in the page cache) → ``DynamicCache`` on the GPU in
  the model's dtype, every check included (header, CRC-32 per chunk, content digest, lane ends);
* the same decode with its stages timed (device synchronised between stages, so their sum is a little higher);
* quality of the restored cache (relative error of K and V against the prefilled one);
* the device-to-device copy bandwidth, measured in the same run.

    python benchmarks/kvz_gpu_pipeline.py --shapes smollm2,llama-3.1-8b --tokens 2048,8192,32768 --json out.json

Timings: medians of ``--repeats`` runs after one warm-up (Triton compilation, pinned staging buffer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    # layers, kv heads, heads, head_dim, hidden, intermediate, vocab
    "smollm2": (30, 3, 9, 64, 576, 1536, 49152),
    "llama-3.1-8b": (32, 8, 32, 128, 4096, 14336, 128256),
}


class _Tok:
    def __init__(self, vocab: int):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(min(self.vocab, 1000))}


class BenchLM:
    """What kvtool's codec needs of a loaded model: the model, its architecture and fingerprint, a tokenizer."""

    def __init__(self, model: Any):
        from kvtool.arch import arch_info

        self.model = model
        self.arch = arch_info(model.config)
        self.fingerprint = {"id": "random-" + self.arch.model_type, "config_digest": self.arch.digest(),
                            "weights_digest": "sha256:" + "0" * 64}  # fmt: skip
        self.tokenizer = _Tok(self.arch.vocab_size)


def build_model(shape: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, kv, heads, dim, hidden, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(num_hidden_layers=layers, num_key_value_heads=kv, num_attention_heads=heads, head_dim=dim,
                      hidden_size=hidden, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
                      attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
    for p in model.parameters():  # a spread that keeps activations finite over 32 layers
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def text_ids(n: int, vocab: int) -> torch.Tensor:
    """Persuasion's words as token ids (a stable hash of each word into the vocabulary): real text statistics for
    the attention patterns, without a tokenizer for these random models."""
    import hashlib

    from kvtool.texts import book

    words = book("persuasion").split()
    ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % vocab for w in words]
    while len(ids) < n:
        ids += ids
    return torch.tensor(ids[:n])


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def copy_bandwidth() -> float:
    x = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    s, _ = timed(lambda: y.copy_(x), 5)
    return 2 * x.numel() / s / 1e9


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float()))


def run(shape: str, tokens: list[int], settings: Any, repeats: int, profile: bool) -> list[dict[str, Any]]:
    import kvtool
    from kvtool.codecs.device_decode import decode_file
    from kvtool.codecs.kvz import KvzFile, _coder, _on_backend, encode_cache, prefill_cache

    model = build_model(shape)
    lm = BenchLM(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in tokens:
            ids = text_ids(t, lm.arch.vocab_size)
            with torch.no_grad():
                prefill_s, _ = timed(lambda ids=ids, model=model: model(input_ids=ids[None].cuda(), use_cache=True,
                                                            logits_to_keep=1), repeats)  # fmt: skip
                cache = prefill_cache(model, ids)
            path = Path(tmp) / f"{shape}-{t}.kvz"
            t0 = time.perf_counter()
            info = encode_cache(lm, ids, cache, settings, path)
            torch.cuda.synchronize()
            encode_s = time.perf_counter() - t0
            load_s, (restored, _) = timed(lambda path=path, model=model: kvtool.load_cache(path, model), repeats)
            err_k = max(rel(a.keys, b.keys) for a, b in zip(restored.layers, cache.layers, strict=True))
            err_v = max(rel(a.values, b.values) for a, b in zip(restored.layers, cache.layers, strict=True))
            open_s, kvz = timed(lambda path=path: KvzFile(path), repeats)
            stages: dict[str, float] = {"open": open_s}
            coder = _on_backend(_coder(kvz.settings, None, kvz.arch), "auto", torch.device("cuda"))
            decode_file(kvz, model, coder, torch.device("cuda"), torch.bfloat16, "triton", timings=stages)
            if profile and t == max(tokens):  # where the host time of one decode goes (sync waits included)
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(decode_file, kvz, model, coder, torch.device("cuda"), torch.bfloat16, "triton")
                pstats.Stats(prof).sort_stats("tottime").print_stats(14)
            fp16_bytes = 2 * sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
            row = {"shape": shape, "tokens": t, "mode": settings.mode, "bytes": info["bytes"],
                   "bits_per_element": info["bits_per_element"], "prefill_s": prefill_s, "encode_s": encode_s,
                   "load_cache_s": load_s, "load_gb_s": fp16_bytes / load_s / 1e9,
                   "encode_gb_s": fp16_bytes / encode_s / 1e9, "speedup_vs_prefill": prefill_s / load_s,
                   "rel_err_k": err_k, "rel_err_v": err_v, "stages_s": stages}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache, restored
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,llama-3.1-8b")
    ap.add_argument("--tokens", default="2048,8192,32768")
    ap.add_argument("--mode", default="adaptive", choices=["adaptive"])
    ap.add_argument("--quality", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", action="store_true", help="cProfile one decode at the longest prefix")
    args = ap.parse_args()
    from kvtool.codecs.kvz import CodecSettings

    settings = CodecSettings(mode=args.mode, quality=args.quality)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gb_s": copy_bandwidth(),
           "rows": []}  # fmt: skip
    print(f"copy bandwidth {out['copy_gb_s']:.0f} GB/s (read + write)", flush=True)
    for shape in args.shapes.split(","):
        out["rows"] += run(shape, [int(x) for x in args.tokens.split(",")], settings, args.repeats, args.profile)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"{'shape':14} {'T':>6} {'bits':>5} {'prefill':>8} {'load':>8} {'x':>6} {'GB/s':>6} {'encode':>7} stages")
    for r in out["rows"]:
        st = " ".join(f"{k}={v * 1e3:.1f}" for k, v in r["stages_s"].items())
        print(f"{r['shape']:14} {r['tokens']:>6} {r['bits_per_element']:5.2f} {r['prefill_s'] * 1e3:7.1f}m "
              f"{r['load_cache_s'] * 1e3:7.1f}m {r['speedup_vs_prefill']:6.1f} {r['load_gb_s']:6.1f} "
              f"{r['encode_s']:6.2f}s {st}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
