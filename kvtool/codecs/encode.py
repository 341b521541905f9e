"""Encoding a prefix cache into a ``.kvz``: one straight pipeline, chunk batch after chunk batch.

cache (post-RoPE, on the model's device) → per batch of chunks: RoPE inverted once per layer, coded positions split
from the raw (fp16) sinks and recent tokens → the coder (:mod:`kvtool.codecs.coding`: adaptive or calibrated
transform, symbols, rANS lanes; lossless: byte planes + zstd) → chunk tensors, CRC-32 seeded by the metadata →
the artifact (:mod:`kvtool.codecs.container` names and checks; :func:`kvtool.artifacts.write_artifact` writes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo, invert_rope
from kvtool.artifacts import (
    Artifact,
    write_artifact,
)
from kvtool.capture import prefix_rope
from kvtool.codecs.coding import AdaptiveCoder, CodedChunk, make_coder, on_backend
from kvtool.codecs.container import (
    BATCH_CHUNKS,
    LAYOUT,
    MAX_CHUNKS,
    MAX_TOKENS,
    SCHEMA,
    SCHEMA_VERSION,
    CodecSettings,
    Geometry,
    check_same_model,
    crc_seed,
    meta_digest,
    tensors_crc,
    tokenizer_digest,
)
from kvtool.digests import token_digest
from kvtool.errors import KvtoolError, UsageError

PREFILL_PIECE = 2048  #: tokens per prefill forward (bounds attention memory on long prompts)


# -- encoding -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill_cache(model: Any, ids: torch.Tensor, piece: int = PREFILL_PIECE) -> Any:
    """The model's cache after ``ids`` ``(T,)``, prefilled in pieces of ``piece`` tokens (bounded attention memory)."""
    device = next(model.parameters()).device
    cache = None
    for start in range(0, ids.numel(), piece):
        out = model(input_ids=ids[start : start + piece][None].to(device), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        cache = out.past_key_values
    return cache


def _layer_slice(layer: Any, lo: int, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.tensor([p - lo for p in positions], dtype=torch.int64, device=layer.keys.device)
    return layer.keys[0].index_select(1, idx), layer.values[0].index_select(1, idx)


def _chunk_layers(
    geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]], chunk: int,
    device: torch.device = torch.device("cpu"),
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:  # fmt: skip
    """:func:`_batch_layers` of one chunk."""
    return _batch_layers(geo, cache, rope, [chunk], device)[0]


def _batch_layers(
    geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]], batch: list[int],
    device: torch.device = torch.device("cpu"),
) -> list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]]:  # fmt: skip
    """Per chunk of ``batch`` (consecutive chunks): its coded positions per layer as pre-RoPE ``(keys, values)``
    ``(heads, n, head_dim)`` float32 on ``device`` (where the coder runs; ``rope`` must be there), and its raw
    (fp16) positions per layer, flattened ``[K, V] × heads × n × head_dim``, on the CPU. RoPE is inverted once per
    layer over the batch's positions, by separate elementwise operations, each correctly rounded, so the pre-RoPE
    keys are the same bits on every device (and whatever the batch)."""
    a0, b0 = geo.chunk_span(batch[0])[0], geo.chunk_span(batch[-1])[1]
    out: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]] = [([], []) for _ in batch]
    for i, layer in enumerate(cache.layers):
        lo, hi = geo.layer_range(i)
        s, e = max(a0, lo), max(min(b0, hi), max(a0, lo))  # this layer's positions in the batch: [s, e)
        cos, sin = rope[i]
        k = layer.keys[0, :, s - lo : e - lo]
        kp = invert_rope(k[None].float().to(cos.device), cos[:, s:e], sin[:, s:e])[0]  # (heads, e - s, head_dim)
        v = layer.values[0, :, s - lo : e - lo]
        for (coded_layers, raw_parts), chunk in zip(out, batch, strict=True):
            coded, raw = geo.split(i, chunk)
            c0 = coded[0] - s if coded else 0  # the coded positions are one run
            coded_layers.append((kp[:, c0 : c0 + len(coded)].to(device), v[:, c0 : c0 + len(coded)].float().to(device)))
            idx = torch.tensor([p - s for p in raw], dtype=torch.int64, device=kp.device)
            kr, vr = kp.index_select(1, idx), v.index_select(1, idx.to(v.device)).float().to(kp.device)
            raw_parts.append(torch.stack([kr, vr]).half().reshape(-1).cpu())
    return out


def _chunk_tensors(
    geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]], chunk: int, coder: Any
) -> dict[str, torch.Tensor]:
    s = geo.settings
    name = f"chunk.{chunk:06d}"
    if s.mode == "lossless":
        blobs = []
        for i, layer in enumerate(cache.layers):
            coded, raw = geo.split(i, chunk)
            k, v = _layer_slice(layer, geo.layer_range(i)[0], coded + raw)
            blobs.append(_lossless_blob(torch.stack([k, v]).cpu(), s.zstd_level))
        return {
            f"{name}.zstd": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
            if any(blobs) else torch.zeros(0, dtype=torch.uint8),
            f"{name}.layer_bytes": torch.tensor([len(b) for b in blobs], dtype=torch.int64),
        }  # fmt: skip
    coded_layers, raw_parts = _chunk_layers(geo, cache, rope, chunk)
    return _pack(name, coder.encode(coded_layers), raw_parts)


def _transform_device(coder: Any) -> torch.device:
    """Where a chunk's transform runs: the adaptive coder's device (a GPU when its rANS runs there); the
    calibrated coder's projections are CPU matrices (a matmul's rounding depends on the device, so it stays on the
    CPU: the same bytes everywhere)."""
    return coder.device if isinstance(coder, AdaptiveCoder) else torch.device("cpu")


def _batch_tensors(
    geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]], batch: list[int], coder: Any
) -> list[dict[str, torch.Tensor]]:
    """:func:`_chunk_tensors` of several chunks, entropy-coded in one pass (same bytes as one by one)."""
    if geo.settings.mode == "lossless":
        return [_chunk_tensors(geo, cache, rope, c, coder) for c in batch]
    inputs = _batch_layers(geo, cache, rope, batch, _transform_device(coder))
    coded = coder.encode_batch([layers for layers, _ in inputs])
    return [_pack(f"chunk.{c:06d}", cc, raw) for c, cc, (_, raw) in zip(batch, coded, inputs, strict=True)]


def _pack(name: str, c: CodedChunk, raw_parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        f"{name}.words": c.words.to(torch.int32).to(torch.uint16),
        f"{name}.lanes": c.lanes.to(torch.int32).to(torch.uint16),  # at most lane_symbols + 2 words
        f"{name}.layer_lanes": c.layer_lanes.to(torch.int32),
        f"{name}.raw": torch.cat(raw_parts) if raw_parts else torch.zeros(0, dtype=torch.float16),
    }
    out |= {f"{name}.{k}": v for k, v in c.side.items()}
    return out


def _lossless_blob(t: torch.Tensor, level: int) -> bytes:
    """Byte planes of ``t`` (most significant first, so exponents sit together) compressed with zstandard."""
    if t.numel() == 0:
        return b""
    import zstandard  # only the lossless mode needs it

    raw = t.contiguous().view(torch.uint8).reshape(-1, t.element_size())
    planes = raw.T.contiguous().numpy().tobytes()
    return zstandard.ZstdCompressor(level=level).compress(planes)


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
        # lossless chunks keep every position exactly: fp16 sinks and recent tokens mean nothing there, and with
        # none the chunks hold their positions in order, so no setting of the file can reorder them
        settings = dataclasses.replace(settings, sink_tokens=0, recent_tokens=0)
    coder = on_backend(make_coder(settings, calibration, arch), backend, next(lm.model.parameters()).device)
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
    rope = prefix_rope(lm.model, arch.num_layers, tokens, _transform_device(coder))
    tensors: dict[str, torch.Tensor] = {"input_ids": ids.to(torch.int32).cpu()}
    spans = [geo.chunk_span(c) for c in range(geo.num_chunks)]
    chunks: list[dict[str, int]] = [{"index": c, "start": a, "stop": b} for c, (a, b) in enumerate(spans)]
    dtype = str(cache.layers[0].keys.dtype).removeprefix("torch.")
    art = Artifact(
        schema=SCHEMA,
        schema_version=SCHEMA_VERSION,
        model={**lm.fingerprint, "arch": arch.to_dict()},
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
    for first in range(0, geo.num_chunks, BATCH_CHUNKS):
        batch = list(range(first, min(first + BATCH_CHUNKS, geo.num_chunks)))
        for chunk, part in zip(batch, _batch_tensors(geo, cache, rope, batch, coder), strict=True):
            chunks[chunk]["crc32"] = tensors_crc(part, seed)
            tensors |= part
            if progress:
                progress(spans[chunk][1] - spans[chunk][0])
    art.extra["meta_digest"] = meta_digest(
        art.schema, art.schema_version, art.model, art.inputs, art.method, art.extra
    )
    return art


