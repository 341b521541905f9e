"""The product path on a GPU: restore a stored prefix with ``kvtool.load_cache`` vs recompute it with a prefill.

For each model shape (random bf16 weights built in code: SmolLM2-135M and Llama-3.1-8B geometry) and prefix
length T, in one run on one GPU:

* ``prefill``: one forward of the T prompt tokens with the cache on (what a user does without kvtool);
* ``encode``: ``kvtool.codecs.kvz.encode_cache`` of the prefilled cache to a ``.kvz`` file (prefill excluded), and
  ``kvtool.encode_kv`` of the same cache to ``.kvz`` bytes in host memory (the connector API; same bytes), and
  ``kvtool.encode_kv_into`` a reused pinned buffer (what an engine's staging memory would be; same bytes);
* ``load_cache``: ``kvtool.load_cache(path, model)``: file (in the page cache) → ``DynamicCache`` on the GPU in
  the model's dtype, every check included (header, CRC-32 per chunk, content digest, lane ends);
* ``decode_kv``: ``kvtool.decode_kv`` of those bytes held in pinned host memory → per-layer K/V on the GPU (the
  connector API: no file read);
* ``--lmcache``: LMCache's CacheGen CUDA codec on the same KV, in the same run (see :func:`lmcache_row`);
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


def build_model(shape: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, kv, heads, dim, hidden, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(num_hidden_layers=layers, num_key_value_heads=kv, num_attention_heads=heads, head_dim=dim,
                      hidden_size=hidden, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
                      attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
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


def lmcache_row(cache: Any, repeats: int, chunk: int = 256) -> dict[str, Any]:
    """LMCache's CacheGen codec on its CUDA kernels (``lmcache.c_ops``), on the same KV: its serializer and
    deserializer (``CacheGenSerializer.to_bytes`` / ``CacheGenDeserializer.from_bytes``: quantization, CDFs,
    arithmetic coding, pickling, and back to bf16 tensors on the GPU), one object per ``chunk`` tokens as LMCache
    stores them (its default chunk size). Bins: LMCache's rule for a model it does not list (``CacheGenConfig
    .from_model_name`` with a stub config of this many layers), as :mod:`kvtool.eval.cachegen_peer` does."""
    from types import SimpleNamespace
    from unittest import mock

    import lmcache.storage_backend.serde.cachegen_basics as cg_basics
    from lmcache import torch_device_type  # noqa: F401, I001  (platform detection first)
    from lmcache.storage_backend.serde.cachegen_decoder import CacheGenDeserializer
    from lmcache.storage_backend.serde.cachegen_encoder import CacheGenSerializer

    n_layers = len(cache.layers)
    config, meta = SimpleNamespace(chunk_size=chunk), SimpleNamespace(model_name=f"kvtool/unlisted-{n_layers}")
    stub = SimpleNamespace(from_pretrained=lambda *a, **k: SimpleNamespace(num_hidden_layers=n_layers))
    with mock.patch.object(cg_basics, "AutoConfig", stub):
        ser = CacheGenSerializer(config, meta)
        de = CacheGenDeserializer(config, meta, torch.bfloat16)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # (L, H, T, D)
    values = torch.stack([layer.values[0] for layer in cache.layers])
    kv = torch.stack([keys, values], 1).permute(0, 1, 3, 2, 4).contiguous()  # LMCache's [L, 2, T, H, D]
    t = kv.shape[2]
    chunks = [kv[:, :, a : a + chunk].contiguous() for a in range(0, t, chunk)]
    enc_s, blobs = timed(lambda chunks=chunks: [ser.to_bytes(c) for c in chunks], repeats)
    dec_s, outs = timed(lambda: [de.from_bytes(b) for b in blobs], repeats)
    # the codec alone (no pickling, tensors stay on the GPU): what LMCache's CUDA kernels and their torch glue cost
    from lmcache.storage_backend.serde.cachegen_decoder import decode_function_gpu, do_dequantize
    from lmcache.storage_backend.serde.cachegen_encoder import encode_function

    def codec_encode(chunks: list[torch.Tensor] = chunks) -> list[Any]:
        return [encode_function(c, ser.cachegen_config, ser.key_bins, ser.value_bins, c.shape[2]) for c in chunks]

    def codec_decode(coded: list[Any]) -> list[torch.Tensor]:
        got = []
        for o in coded:
            n = o.max_tensors_key.shape[1]
            key, value = decode_function_gpu(o.cdf, o.data_chunks, o.max_tensors_key.shape[0], n,
                                             de.get_output_buffer(o.cdf.shape[0] // 2, o.cdf.shape[1], n))  # fmt: skip
            got.append(torch.stack([do_dequantize(key, de.key_bins, o.max_tensors_key),
                                    do_dequantize(value, de.value_bins, o.max_tensors_value)]))  # fmt: skip
        return got

    codec_enc_s, coded = timed(codec_encode, repeats)
    codec_dec_s, _ = timed(lambda: codec_decode(coded), repeats)
    dec = torch.cat(outs, dim=2)  # [L, 2, T, H, D]
    size = sum(len(b) for b in blobs)
    fp16_bytes = 2 * kv.numel()
    del kv, chunks, outs
    return {"bytes": size, "bits_per_element": 8 * size / (fp16_bytes / 2), "encode_s": enc_s, "decode_s": dec_s,
            "encode_gb_s": fp16_bytes / enc_s / 1e9, "decode_gb_s": fp16_bytes / dec_s / 1e9,
            "codec_encode_gb_s": fp16_bytes / codec_enc_s / 1e9, "codec_decode_gb_s": fp16_bytes / codec_dec_s / 1e9,
            "rel_err_k": rel(dec[:, 0].permute(0, 2, 1, 3), keys),
            "rel_err_v": rel(dec[:, 1].permute(0, 2, 1, 3), values)}  # fmt: skip


def run(
    shape: str, tokens: list[int], settings: Any, repeats: int, profile: bool, lmcache: bool
) -> list[dict[str, Any]]:
    import kvtool
    from kvtool.codecs.device_decode import decode_file
    from kvtool.codecs.kvz import KvzFile, encode_cache, make_coder, on_backend, prefill_cache

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
            # encode through the product: the .kvz file (write and content digest included), and the connector API
            # (K/V already on the GPU -> .kvz bytes in host memory); prefill excluded from both
            encode_s, info = timed(lambda c=cache, i=ids, p=path: encode_cache(lm, i, c, settings, p), 1)
            encode_kv_s, blob = timed(lambda c=cache, i=ids: kvtool.encode_kv(lm, c, i, settings=settings), repeats)
            same_bytes = blob == path.read_bytes()
            # into a reused pinned buffer, as an engine keeps its staging memory (allocated once, outside the timing)
            staging = torch.empty(len(blob), dtype=torch.uint8).pin_memory()
            into_s, n_into = timed(
                lambda c=cache, i=ids, o=staging: kvtool.encode_kv_into(o, lm, c, i, settings=settings), repeats
            )
            same_bytes = same_bytes and n_into == len(blob) and bytes(staging.numpy()) == blob
            del staging
            load_s, (restored, _) = timed(lambda path=path, model=model: kvtool.load_cache(path, model), repeats)
            err_k = max(rel(a.keys, b.keys) for a, b in zip(restored.layers, cache.layers, strict=True))
            err_v = max(rel(a.values, b.values) for a, b in zip(restored.layers, cache.layers, strict=True))
            del restored
            # the connector's decode from bytes already in (pinned) host memory: no file read
            pinned = torch.frombuffer(bytearray(blob), dtype=torch.uint8).pin_memory()
            decode_kv_s, _ = timed(lambda p=pinned, m=model: kvtool.decode_kv(p, m), repeats)
            open_s, kvz = timed(lambda path=path: KvzFile(path), repeats)
            stages: dict[str, float] = {"open": open_s}
            coder = on_backend(make_coder(kvz.settings, None, kvz.arch), "auto", torch.device("cuda"))
            decode_file(kvz, model, coder, torch.device("cuda"), torch.bfloat16, "triton", timings=stages)
            if profile and t == max(tokens):  # where the host time of one decode goes (sync waits included)
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(decode_file, kvz, model, coder, torch.device("cuda"), torch.bfloat16, "triton")
                pstats.Stats(prof).sort_stats("tottime").print_stats(14)
                prof = cProfile.Profile()  # and of one encode of the cached KV (the connector's encode_kv)
                prof.runcall(kvtool.encode_kv, lm, cache, ids, settings=settings)
                pstats.Stats(prof).sort_stats("tottime").print_stats(20)
            fp16_bytes = 2 * sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
            row = {"shape": shape, "tokens": t, "mode": settings.mode, "bytes": info["bytes"],
                   "bits_per_element": info["bits_per_element"], "prefill_s": prefill_s, "encode_s": encode_s,
                   "encode_kv_s": encode_kv_s, "encode_kv_same_bytes": same_bytes, "encode_kv_into_s": into_s,
                   "load_cache_s": load_s, "decode_kv_pinned_s": decode_kv_s, "load_gb_s": fp16_bytes / load_s / 1e9,
                   "decode_kv_gb_s": fp16_bytes / decode_kv_s / 1e9,
                   "encode_gb_s": fp16_bytes / encode_s / 1e9, "encode_kv_gb_s": fp16_bytes / encode_kv_s / 1e9,
                   "encode_kv_into_gb_s": fp16_bytes / into_s / 1e9,
                   "speedup_vs_prefill": prefill_s / load_s, "decode_kv_speedup_vs_prefill": prefill_s / decode_kv_s,
                   "rel_err_k": err_k, "rel_err_v": err_v, "stages_s": stages}  # fmt: skip
            del pinned, blob
            if lmcache:
                try:
                    row["lmcache_cachegen"] = lmcache_row(cache, repeats)
                except Exception as e:  # noqa: BLE001 - the peer is optional; its failure is reported in the row
                    row["lmcache_cachegen"] = {"error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del cache
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
    ap.add_argument("--profile", action="store_true", help="cProfile one decode and one encode at the longest prefix")
    ap.add_argument("--lmcache", action="store_true", help="LMCache's CacheGen CUDA codec on the same KV (lmcache)")
    args = ap.parse_args()
    from kvtool.codecs.kvz import CodecSettings

    settings = CodecSettings(mode=args.mode, quality=args.quality)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gb_s": copy_bandwidth(),
           "rows": []}  # fmt: skip
    print(f"copy bandwidth {out['copy_gb_s']:.0f} GB/s (read + write)", flush=True)
    for shape in args.shapes.split(","):
        out["rows"] += run(shape, [int(x) for x in args.tokens.split(",")], settings, args.repeats, args.profile,
                           args.lmcache)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    print(f"{'shape':13} {'T':>6} {'bits':>5} {'prefill':>8} {'load':>7} {'x':>5} {'kv/pin':>7} {'x':>5} "
          f"{'GB/s':>5} {'enc s':>6} {'GB/s':>5} {'into s':>6} {'GB/s':>5} "
          "| LMCache bits enc/dec GB/s | stages ms")  # fmt: skip
    for r in out["rows"]:
        st = " ".join(f"{k}={v * 1e3:.1f}" for k, v in r["stages_s"].items())
        lm = r.get("lmcache_cachegen", {})
        peer = (f"{lm['bits_per_element']:.2f} {lm['encode_gb_s']:.1f}/{lm['decode_gb_s']:.1f} codec "
                f"{lm['codec_encode_gb_s']:.1f}/{lm['codec_decode_gb_s']:.1f}" if "bytes" in lm
                else lm.get("error", "-")[:40])  # fmt: skip
        print(f"{r['shape']:13} {r['tokens']:>6} {r['bits_per_element']:5.2f} {r['prefill_s'] * 1e3:7.1f}m "
              f"{r['load_cache_s'] * 1e3:6.1f}m {r['speedup_vs_prefill']:5.1f} {r['decode_kv_pinned_s'] * 1e3:6.1f}m "
              f"{r['decode_kv_speedup_vs_prefill']:5.1f} {r['decode_kv_gb_s']:5.1f} {r['encode_kv_s']:6.2f} "
              f"{r['encode_kv_gb_s']:5.1f} {r['encode_kv_into_s']:6.2f} {r['encode_kv_into_gb_s']:5.1f} "
              f"| {peer} | {st}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
