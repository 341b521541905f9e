"""Benchmark peer: LMCache 0.5.6's CacheGen codec, run on the CPU (its numba arithmetic coder), on a kvtool KV cache.

Everything codec-related is LMCache's own code; this module only converts layouts, chunks the tokens and times calls.

Layout mapping
--------------
kvtool hands over one tensor per layer, ``keys[l]`` / ``values[l]`` of shape ``(kv_heads, T, head_dim)`` (post-RoPE,
the cached keys). LMCache's (legacy-API) CacheGen serializer expects one blob per chunk of shape
``[num_layers, 2, ntokens, num_heads, head_size]`` (index 1: 0 = K, 1 = V); ``encode_function`` then splits it
(``_split_kv``) into K and V of shape ``[num_layers, ntokens, num_heads * head_size]``: one "channel" per
(head, dim), channel index ``head * head_dim + dim``. So: ``stack(keys), stack(values)`` → ``[L, 2, H, T, D]`` →
permute to ``[L, 2, T, H, D]`` → cut into chunks of ``chunk_tokens`` tokens along T (LMCache's ``chunk_size``, 256 by
default; the last chunk may be shorter), each chunk encoded and stored independently (own CDF tables, own per-token
scales), as LMCache stores one serialized object per KV chunk. (The v1 engine keeps ``[2, L, T, H*D]`` (KV_2LTD)
chunks and its ``naive_serde`` ``CacheGenSerializer.serialize`` permutes them to the same ``[L, 2, T, H, D]`` and
calls the same ``encode_function`` / ``to_bytes``; its deserializer calls the same ``decode_function_gpu`` /
``do_dequantize``, so the bytes and the decoded values are those of the v1 path.)

What CacheGen does per chunk (LMCache code, not re-implemented here): per (layer, token) max-abs scaling over the
``H*D`` channels and uniform rounding to ``bins`` levels (``torch_quant_vectorized``); bins per layer from
``CacheGenConfig.from_model_name`` (for a model it does not list, with >= 10 layers: K 32 bins for layers 0-9 and 16
after, V 32 bins for layers 0-1 and 16 after; < 10 layers: 32 everywhere); a 16-bit CDF per (K/V layer, channel) over
the chunk's tokens (``calculate_cdf``); static arithmetic coding of each (layer, channel) token sequence in pieces of
256 tokens (``encode_fast_new``); the result, a ``CacheGenGPUEncoderOutput`` (bitstreams, per-channel byte lengths,
int16 CDFs ``[2L, H*D, 33]``, float32 per-token maxima ``[L, T, 1]`` for K and for V), pickled by ``to_bytes``.

Exact LMCache entry points used
-------------------------------
* ``lmcache.storage_backend.serde.cachegen_encoder.CacheGenSerializer`` (constructor: ``CacheGenConfig
  .from_model_name`` + ``make_key_bins`` / ``make_value_bins``) and its ``.to_bytes(blob)``, which calls
  ``encode_function`` → ``torch_quant_vectorized``, ``device_ops.calculate_cdf``, ``encode_ntokens`` →
  ``device_ops.encode_fast_new`` + ``collect_bytes``, then ``CacheGenGPUEncoderOutput.to_bytes`` (pickle).
* ``lmcache.storage_backend.serde.cachegen_decoder.CacheGenDeserializer(..., dtype=torch.float32).from_bytes(bs)``:
  ``CacheGenGPUEncoderOutput.from_bytes`` → ``decode_function_gpu`` → ``device_ops.decode_fast_prefsum`` →
  ``do_dequantize``.
* On a host without an accelerator LMCache resolves ``device_ops`` to ``CpuDeviceOps``, whose CacheGen ops are
  ``lmcache.v1.platform.torch_ops.cachegen_kernels`` (``calculate_cdf`` in torch, ``encode_fast_new`` /
  ``decode_fast_prefsum`` as numba ``@njit`` per-(layer, channel) coders driven by a ``ThreadPoolExecutor``; the
  kernels do not release the GIL, so this is effectively single-threaded).

"bytes" is ``len()`` of the serializer's real output (``to_bytes``) summed over chunks: bitstreams + CDF tables +
byte lengths + per-token scales + pickle framing. ``bytes_breakdown`` splits it by tensor (the remainder is pickle
overhead). ``encode_s`` / ``decode_s`` time only the ``to_bytes`` / ``from_bytes`` calls (layout permutes excluded),
after a one-off warm-up per process so that numba's JIT compilation / cache loading is not counted.

Model name: ``CacheGenConfig.from_model_name`` reads ``num_hidden_layers`` through ``transformers.AutoConfig`` for
models it does not list. With ``model_name=None`` (default) we let it run its own rule for an unlisted model of
``len(keys)`` layers by handing it a stub ``AutoConfig`` (no hub access). Pass a listed model name (e.g.
``"meta-llama/Llama-3.1-8B-Instruct"``, 32 layers) to use its table instead.

LMCache picks CUDA (or another accelerator) when one is visible; then these entry points would run its GPU
kernels, so ``cachegen_available`` reports False there: hide the accelerator (``CUDA_VISIBLE_DEVICES=``) to get the
CPU path.

Setup (into the project venv, without LMCache's server/GPU dependencies):
``pip install numba==0.68.1 cachetools==8.0.1`` and ``pip install --no-deps lmcache==0.5.6``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from unittest import mock

import torch

_WARMED: set[tuple[int, int, int]] = set()


def _lmcache_modules():
    from lmcache import torch_device_type  # noqa: I001  (import order matters: platform detection first)
    import lmcache.storage_backend.serde.cachegen_basics as cg_basics
    from lmcache.storage_backend.serde.cachegen_decoder import CacheGenDeserializer
    from lmcache.storage_backend.serde.cachegen_encoder import CacheGenSerializer

    return torch_device_type, cg_basics, CacheGenSerializer, CacheGenDeserializer


def cachegen_available() -> tuple[bool, str]:
    """(True, "") when LMCache's CacheGen can run here on the CPU, else (False, one-line reason). Never raises."""
    try:
        import numba  # noqa: F401
    except Exception as e:
        return False, f"numba not importable ({type(e).__name__}: {e})".splitlines()[0]
    try:
        import lmcache
    except Exception as e:
        return False, f"lmcache not importable ({type(e).__name__}: {e})".splitlines()[0]
    version = getattr(lmcache, "__version__", "unknown")
    try:
        device_type, *_ = _lmcache_modules()
    except Exception as e:
        return False, f"lmcache {version}: CacheGen serde not importable ({type(e).__name__}: {e})".splitlines()[0]
    if device_type != "cpu":
        return False, f"lmcache {version} selected device {device_type!r}, not the CPU/numba path (hide accelerators)"
    return True, ""


def _make_serde(num_layers: int, chunk_tokens: int, model_name: str | None):
    _, cg_basics, serializer_cls, deserializer_cls = _lmcache_modules()
    config = SimpleNamespace(chunk_size=chunk_tokens)  # LMCacheEngineConfig: only .chunk_size is read
    if model_name is None:
        meta = SimpleNamespace(model_name=f"kvtool/unlisted-{num_layers}-layer-model")
        stub = SimpleNamespace(from_pretrained=lambda *a, **k: SimpleNamespace(num_hidden_layers=num_layers))
        with mock.patch.object(cg_basics, "AutoConfig", stub):
            ser = serializer_cls(config, meta)
            de = deserializer_cls(config, meta, torch.float32)
    else:
        meta = SimpleNamespace(model_name=model_name)
        ser = serializer_cls(config, meta)
        de = deserializer_cls(config, meta, torch.float32)
    if ser.cachegen_config.nlayers != num_layers:
        raise ValueError(
            f"CacheGenConfig for {meta.model_name!r} has {ser.cachegen_config.nlayers} layers, the cache {num_layers}"
        )
    return ser, de


def _breakdown(bs: bytes) -> dict:
    from lmcache.storage_backend.serde.cachegen_basics import CacheGenGPUEncoderOutput

    out = CacheGenGPUEncoderOutput.from_bytes(bs)

    def nb(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    parts = {
        "bitstream": sum(nb(c.bytestream) for c in out.data_chunks),
        "lengths": sum(nb(c.bytestream_lengths) for c in out.data_chunks),
        "cdf": nb(out.cdf),
        "scales": nb(out.max_tensors_key) + nb(out.max_tensors_value),
    }
    parts["pickle_overhead"] = len(bs) - sum(parts.values())
    return parts


def cachegen_roundtrip(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    chunk_tokens: int = 256,
    model_name: str | None = None,
) -> dict:
    """Encode + decode a KV cache with LMCache's CacheGen serializer/deserializer on the CPU.

    keys[l], values[l]: (kv_heads, T, head_dim) float tensors of layer l. Returns a dict with "keys" / "values"
    (decoded, same shapes, float32), "bytes" (summed ``len(to_bytes(chunk))``: the real stored size, CDF tables and
    scales included), "encode_s" / "decode_s" (wall seconds of the LMCache calls), plus "bytes_breakdown" (by part),
    "chunks" (tokens per chunk), "key_bins" / "value_bins" (per layer).
    """
    if len(keys) != len(values) or not keys:
        raise ValueError("keys and values must be non-empty lists of equal length")
    num_layers = len(keys)
    heads, n_tokens, head_dim = keys[0].shape
    for k, v in zip(keys, values, strict=True):
        if tuple(k.shape) != (heads, n_tokens, head_dim) or tuple(v.shape) != (heads, n_tokens, head_dim):
            raise ValueError("all layers' keys and values must share one (kv_heads, T, head_dim) shape")
    ok, why = cachegen_available()
    if not ok:
        raise RuntimeError(why)

    ser, de = _make_serde(num_layers, chunk_tokens, model_name)
    # [L, 2, H, T, D] -> [L, 2, T, H, D] (LMCache's blob layout)
    kv = torch.stack([torch.stack([k.float().cpu() for k in keys]), torch.stack([v.float().cpu() for v in values])], 1)
    kv = kv.permute(0, 1, 3, 2, 4).contiguous()

    warm_key = (num_layers, heads, head_dim)
    if warm_key not in _WARMED:  # numba JIT compile / on-disk cache load, kept out of the timings
        de.from_bytes(ser.to_bytes(kv[:, :, : min(8, n_tokens)].contiguous()))
        _WARMED.add(warm_key)

    enc_s = dec_s = 0.0
    total = 0
    parts: dict[str, int] = {}
    decoded, chunks = [], []
    for start in range(0, n_tokens, chunk_tokens):
        chunk = kv[:, :, start : start + chunk_tokens].contiguous()
        t0 = time.perf_counter()
        bs = ser.to_bytes(chunk)
        t1 = time.perf_counter()
        out = de.from_bytes(bs)  # [L, 2, t, H, D]
        t2 = time.perf_counter()
        enc_s += t1 - t0
        dec_s += t2 - t1
        total += len(bs)
        for name, n in _breakdown(bs).items():
            parts[name] = parts.get(name, 0) + n
        decoded.append(out.float())
        chunks.append(chunk.shape[2])
    dec = torch.cat(decoded, dim=2).permute(0, 1, 3, 2, 4)  # [L, 2, H, T, D]
    return {
        "keys": [dec[i, 0].contiguous() for i in range(num_layers)],
        "values": [dec[i, 1].contiguous() for i in range(num_layers)],
        "bytes": total,
        "encode_s": enc_s,
        "decode_s": dec_s,
        "bytes_breakdown": parts,
        "chunks": chunks,
        "key_bins": [int(b) for b in ser.key_bins.tolist()],
        "value_bins": [int(b) for b in ser.value_bins.tolist()],
    }
