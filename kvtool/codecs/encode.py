"""Encoding a prefix cache into a ``.kvz``: one straight pipeline, chunk batch after chunk batch.

cache (post-RoPE, on the model's device) → per batch of chunks: the chunk coder (:mod:`kvtool.codecs.chunk_coders`:
RoPE inverted, coded positions through the adaptive or calibrated transform, symbols and rANS lanes, sinks and
recent tokens as fp16; lossless: byte planes + zstd) → chunk tensors, CRC-32 seeded by the metadata →
the artifact (:mod:`kvtool.codecs.container` names and checks; :func:`kvtool.artifacts.write_artifact` writes).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import (
    Artifact,
    write_artifact,
)
from kvtool.capture import prefix_rope
from kvtool.codecs.chunk_coders import lossless_settings, make_chunk_coder
from kvtool.codecs.container import (
    BATCH_CHUNKS,
    DEVICE_BATCH_ELEMENTS,
    LAYOUT,
    MAX_CHUNKS,
    MAX_TOKENS,
    SCHEMA,
    SCHEMA_VERSION,
    CodecSettings,
    Geometry,
    check_same_model,
    chunk_name,
    crc_seed,
    host_threads,
    meta_digest,
    tensors_crc,
    tokenizer_digest,
)
from kvtool.digests import token_digest
from kvtool.errors import KvtoolError, UsageError
from kvtool.models import cache_kwargs, model_record, output_cache

PREFILL_PIECE = 2048  #: tokens per prefill forward (bounds attention memory on long prompts)


# -- encoding -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill_cache(model: Any, ids: torch.Tensor, piece: int = PREFILL_PIECE) -> Any:
    """The model's cache after ``ids`` ``(T,)``, prefilled in pieces of ``piece`` tokens (bounded attention memory)."""
    device = next(model.parameters()).device
    cache = None
    for start in range(0, ids.numel(), piece):
        out = model(input_ids=ids[start : start + piece][None].to(device), **cache_kwargs(model, cache),
                    use_cache=True, logits_to_keep=1)  # fmt: skip
        cache = output_cache(out)
    return cache


def encode_prefix(
    lm: Any,
    ids: torch.Tensor,
    settings: CodecSettings,
    path: Path,
    calibration: Artifact | None = None,
    progress: Callable[[int], None] | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Prefill ``lm`` on ``ids`` ``(T,)`` (in pieces) and write the ``.kvz`` file atomically; return a summary."""
    if ids.numel() < 1:
        raise UsageError("the prompt has no tokens")
    return encode_cache(lm, ids, prefill_cache(lm.model, ids), settings, path, calibration, progress, backend)


def encode_cache(
    lm: Any,
    ids: torch.Tensor,
    cache: Any,
    settings: CodecSettings,
    path: Path,
    calibration: Artifact | None = None,
    progress: Callable[[int], None] | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Write the ``.kvz`` of ``cache``, the model's cache after prefilling ``ids`` from position 0. ``backend``:
    the entropy coder's (``auto``: Triton when the model is on CUDA)."""
    art = kvz_artifact(lm, ids, cache, settings, calibration, progress, backend)
    digest = write_artifact(path, art)
    return {"path": str(path)} | encode_summary(art, path.stat().st_size, digest, lm.arch)


def encode_batch_chunks(geo: Geometry, device: torch.device | None) -> int:
    """Chunks coded per batch: ``BATCH_CHUNKS`` on the CPU (memory), up to ``DEVICE_BATCH_ELEMENTS`` K/V elements
    on a GPU (fewer launches)."""
    if device is None or device.type != "cuda":
        return BATCH_CHUNKS
    arch = geo.arch
    per_chunk = geo.settings.chunk_tokens * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim
    return max(BATCH_CHUNKS, DEVICE_BATCH_ELEMENTS // per_chunk)


def encode_summary(art: Artifact, size: int, digest: str, arch: ArchInfo) -> dict[str, Any]:
    """What an encode reports: sizes, bits per element, overhead (``size``: the file's bytes)."""
    tokens = art.inputs["tokens"]
    payload = sum(t.numel() * t.element_size() for n, t in art.tensors.items() if n.endswith((".words", ".zstd")))
    elements = (
        sum(arch.cached_tokens(i, tokens) for i in range(arch.num_layers)) * 2 * arch.num_kv_heads * arch.head_dim
    )
    return {
        "tokens": tokens,
        "chunks": len(art.extra["chunks"]),
        "bytes": size,
        "payload_bytes": payload,
        "overhead_pct": 100.0 * (size - payload) / size,
        "bits_per_element": 8.0 * size / elements,
        "compression_vs_fp16": 16.0 * elements / (8.0 * size),
        "bytes_per_token": size / tokens,
        "mode": art.method["_data"]["mode"],
        "content_digest": digest,
    }


def kvz_artifact(
    lm: Any,
    ids: torch.Tensor,
    cache: Any,
    settings: CodecSettings,
    calibration: Artifact | None = None,
    progress: Callable[[int], None] | None = None,
    backend: str = "auto",
) -> Artifact:
    """The ``.kvz`` artifact of ``cache`` (see :func:`encode_cache`), not yet serialized: chunk tensors on the
    host, CRCs and metadata digest filled in."""
    arch: ArchInfo = lm.arch
    tokens = int(ids.numel())
    if settings.mode == "lossless" and SCHEMA_VERSION >= 2:
        settings = lossless_settings(settings)
    chunker = make_chunk_coder(settings, calibration, arch, backend, next(lm.model.parameters()).device)
    if calibration is not None and settings.mode == "calibrated":
        check_same_model(calibration.model, lm.fingerprint, "calibration artifact")
        if not calibration.content_digest:
            raise UsageError("the calibration artifact has no content digest: write it (write_artifact) first")
    geo = Geometry(arch, tokens, settings)
    if geo.num_chunks > MAX_CHUNKS or tokens > MAX_TOKENS:
        raise UsageError(f"{tokens} tokens in chunks of {settings.chunk_tokens} exceed the format's limits "
                         f"({MAX_TOKENS} tokens, {MAX_CHUNKS} chunks)")  # fmt: skip
    for i, layer in enumerate(cache.layers):  # what the file will claim each layer holds, checked on the cache
        lo, hi = geo.layer_range(i)
        if layer.keys.shape[-2] != hi - lo:
            raise KvtoolError(f"layer {i} of the model's cache holds {layer.keys.shape[-2]} tokens, not the "
                              f"{hi - lo} its attention type implies: unsupported cache layout")  # fmt: skip
    # evaluated on the CPU (same values everywhere), then where the coder runs: on a GPU model the adaptive coder's
    # whole transform (RoPE inverted, statistics, symbols) stays on the device, and only the words come back
    where = chunker.transform_device
    rope = prefix_rope(lm.model, arch.num_layers, tokens, where) if where is not None else []
    tensors: dict[str, torch.Tensor] = {"input_ids": ids.to(torch.int32).cpu()}
    spans = [geo.chunk_span(c) for c in range(geo.num_chunks)]
    chunks: list[dict[str, int]] = [{"index": c, "start": a, "stop": b} for c, (a, b) in enumerate(spans)]
    dtype = str(cache.layers[0].keys.dtype).removeprefix("torch.")
    art = Artifact(
        schema=SCHEMA,
        schema_version=SCHEMA_VERSION,
        model=model_record(lm),
        inputs={
            "tokens": tokens,
            "token_ids_digest": token_digest(ids),
            "tokenizer_digest": tokenizer_digest(lm.tokenizer),
            "calibration": None
            if calibration is None or settings.mode != "calibrated"
            else {"content_digest": calibration.content_digest},
        },  # fmt: skip
        method=kvconfig.to_dict(settings),
        extra={
            "cache_dtype": dtype,
            "chunks": chunks,
            "layers": [list(geo.layer_range(i)) for i in range(arch.num_layers)],
            "layout": LAYOUT,
        },
        tensors=tensors,
    )
    seed = crc_seed({"schema": art.schema, "schema_version": art.schema_version, "model": art.model,
                     "inputs": art.inputs, "method": art.method, "extra": art.extra})  # fmt: skip
    # CRCs on host threads while the next batch is coded (on a GPU model the coder waits on the device meanwhile).
    # Two threads keep up (zlib: ~3.7 GB/s a core, the words of a 32K Llama-3.1-8B prefix are 0.48 GB); more only
    # compete for the cores with the coder's own host work and torch's intra-op threads
    with ThreadPoolExecutor(min(2, host_threads())) as pool:
        crcs = []
        step = encode_batch_chunks(geo, where)
        for first in range(0, geo.num_chunks, step):
            batch = list(range(first, min(first + step, geo.num_chunks)))
            for chunk, coded in zip(batch, chunker.encode_chunks(geo, cache, rope, batch), strict=True):
                part = {chunk_name(chunk, name): t for name, t in coded.items()}
                crcs.append(pool.submit(tensors_crc, part, seed))
                tensors |= part
                if progress:
                    progress(spans[chunk][1] - spans[chunk][0])
        for chunk, crc in zip(chunks, crcs, strict=True):
            chunk["crc32"] = crc.result()
    art.extra["meta_digest"] = meta_digest(
        art.schema, art.schema_version, art.model, art.inputs, art.method, art.extra
    )
    return art


