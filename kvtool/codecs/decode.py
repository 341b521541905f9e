"""Decoding a ``.kvz`` back into per-layer K/V and a transformers cache: one straight pipeline.

The file (:class:`kvtool.codecs.container.KvzFile`, checked before anything is sized) → on a CUDA target, the
device-resident pipeline (:mod:`kvtool.codecs.device_decode`); otherwise chunk batches read, CRC-checked and decoded
by the coder on the CPU, written straight into the output tensors → RoPE re-applied with the model's rotation →
:func:`kvtool.cache_restore.restore_cache` (``load_cache``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvtool.arch import apply_rope, invert_rope
from kvtool.artifacts import (
    Artifact,
)
from kvtool.cache_restore import restore_cache
from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA
from kvtool.capture import rope_for_positions
from kvtool.codecs.chunk_coders import ChunkCoder, ChunkLayers, TransformChunks, make_chunk_coder
from kvtool.codecs.container import (
    BATCH_CHUNKS,
    Geometry,
    KvzFile,
    check_calibration,
    check_same_model,
    check_tokenizer,
)
from kvtool.errors import ArtifactError, UsageError
from kvtool.kernels import pick_backend
from kvtool.models import is_loaded_model


@dataclass
class DecodedLayer:
    """One layer of a decoded prefix: ``keys`` (post-RoPE), ``keys_pre_rope`` (when asked for), ``values``
    ``(1, heads, n, head_dim)`` (float32; lossless: the cache dtype) and ``positions`` ``(n,)``."""

    keys: torch.Tensor
    keys_pre_rope: torch.Tensor | None
    values: torch.Tensor
    positions: torch.Tensor


def decode_kvz(
    kvz: KvzFile,
    model: Any,
    calibration: Artifact | None = None,
    progress: Callable[[int], None] | None = None,
    keep_pre_rope: bool = False,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    prefetch: Any = None,
) -> list[DecodedLayer]:
    """Decode every chunk of ``kvz`` (RoPE re-applied with ``model``'s own rotation) into per-layer tensors, in
    position order, on ``device`` (default: the CPU) in ``dtype`` (default: float32; lossless: the cache dtype).
    ``keep_pre_rope`` also returns the pre-RoPE keys (otherwise ``keys_pre_rope`` is ``None``).

    Two pipelines, the same values: with the Triton backend (``auto`` on a CUDA ``device``) the whole file is
    decoded on the device (:mod:`kvtool.codecs.device_decode`: one read, one transfer, one kernel launch for every
    lane); otherwise chunks are read, checked and decoded ``BATCH_CHUNKS`` at a time on the CPU and written
    straight into the output tensors (memory beyond the output is a few chunks). ``prefetch``: a
    :class:`kvtool.codecs.device_decode.Prefetch` of ``kvz`` (see :func:`prefetching`)."""
    s, arch = kvz.settings, kvz.arch
    check_calibration(kvz, calibration)
    target = torch.device(device) if device is not None else torch.device("cpu")
    pick_backend(backend, target)  # a bad --backend is the caller's usage error, not the file's
    try:
        chunker = make_chunk_coder(s, calibration, arch, backend, target)
    except UsageError as e:  # the settings come from the file here, not from a flag
        raise ArtifactError(f"{kvz.path}: {e}") from None
    if isinstance(chunker, TransformChunks) and chunker.coder.backend == "triton":
        from kvtool.codecs.device_decode import decode_file

        chunker.check_layout(kvz)  # before anything is allocated from the header's numbers
        layers = decode_file(kvz, model, chunker.coder, target, dtype or torch.float32, "triton", keep_pre_rope,
                             prefetch=prefetch)  # fmt: skip
        if progress:
            progress(kvz.tokens)
        return layers
    out = _decode_streaming(kvz, model, chunker, progress, keep_pre_rope)
    if device is None and dtype is None:
        return out
    cast = dtype or out[0].values.dtype
    return [DecodedLayer(d.keys.to(target, cast), None if d.keys_pre_rope is None else d.keys_pre_rope.to(target, cast),
                         d.values.to(target, cast), d.positions) for d in out]  # fmt: skip


def _decode_streaming(
    kvz: KvzFile, model: Any, chunker: ChunkCoder, progress: Callable[[int], None] | None, keep_pre_rope: bool
) -> list[DecodedLayer]:
    """The CPU pipeline of :func:`decode_kvz` (the reference the device pipeline is tested against)."""
    geo, arch = kvz.geometry, kvz.arch
    heads, dim = arch.num_kv_heads, arch.head_dim
    dtype = kvz.cache_dtype
    out_dtype = dtype if chunker.exact else torch.float32
    chunker.check_layout(kvz)  # before anything is allocated from the header's numbers
    ranges = [geo.layer_range(i) for i in range(arch.num_layers)]
    # zeros, not empty: every slot is written below (the geometry is validated), and none may ever hold garbage
    keys = [torch.zeros(1, heads, hi - lo, dim, dtype=out_dtype) for lo, hi in ranges]
    values = [torch.zeros(1, heads, hi - lo, dim, dtype=out_dtype) for lo, hi in ranges]
    pre = [torch.zeros(1, heads, hi - lo, dim, dtype=out_dtype) for lo, hi in ranges] if keep_pre_rope else None
    post = chunker.keys_post_rope
    for first in range(0, len(kvz.chunks), BATCH_CHUNKS):
        batch = list(range(first, min(first + BATCH_CHUNKS, len(kvz.chunks))))
        span = torch.arange(geo.chunk_span(batch[0])[0], geo.chunk_span(batch[-1])[1])
        # Chunks holding the cached (post-RoPE) keys need RoPE only to give pre-RoPE keys back.
        rope = rope_for_positions(model, arch.num_layers, span) if not post or pre is not None else None
        for chunk, layers in zip(batch, _decode_batch(kvz, geo, batch, chunker, dtype), strict=True):
            for i, (k, v, positions) in enumerate(layers):
                if not positions:
                    continue
                pos = torch.tensor(positions, dtype=torch.int64)
                slot = pos - ranges[i][0]
                values[i][0][:, slot] = v.to(out_dtype)
                if rope is not None:
                    cos, sin = (t[:, pos - int(span[0])].cpu() for t in rope[i])
                if post:
                    keys[i][0][:, slot] = k
                    if pre is not None:
                        pre[i][0][:, slot] = invert_rope(k[None], cos, sin)[0]
                    continue
                keys[i][0][:, slot] = apply_rope(k[None], cos, sin)[0]
                if pre is not None:
                    pre[i][0][:, slot] = k
            if progress:
                a, b = geo.chunk_span(chunk)
                progress(b - a)
    kvz.check_content_digest()
    return [
        DecodedLayer(
            keys[i],
            pre[i] if pre is not None else None,
            values[i],
            torch.arange(*ranges[i]),
        )  # fmt: skip
        for i in range(arch.num_layers)
    ]


def _decode_batch(
    kvz: KvzFile, geo: Geometry, batch: list[int], chunker: ChunkCoder, dtype: torch.dtype
) -> list[ChunkLayers]:
    """Decode the chunks ``batch`` (CRC-checked each) in one pass of the chunk coder; a failure is reported for
    the chunk that causes it."""
    tensors = [kvz.read_chunk(c) for c in batch]
    try:
        return chunker.decode_chunks(geo, batch, tensors, dtype)
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        if len(batch) == 1:
            raise ArtifactError(f"{kvz.path}: chunk {batch[0]} cannot be decoded ({e})") from e
        return [_decode_batch(kvz, geo, [c], chunker, dtype)[0] for c in batch]  # names the chunk


def bind_model(kvz: KvzFile, model: Any) -> Any:
    """Check that ``kvz`` was made for ``model`` and return the transformers model: with a kvtool
    ``LoadedModel`` its config, weights and tokenizer digests are compared; with a bare transformers model its
    config is all there is to check."""
    from kvtool.arch import arch_info

    if is_loaded_model(model):
        check_tokenizer(kvz, model.tokenizer)
        fingerprint, model = model.fingerprint, model.model
    else:
        fingerprint = {
            "id": getattr(model.config, "_name_or_path", ""),
            "config_digest": arch_info(model.config).digest(),
        }
    check_same_model(kvz.model, fingerprint, ".kvz file")
    return model


@contextlib.contextmanager
def prefetching(source: Any, device: torch.device, backend: str) -> Iterator[Any]:
    """A :class:`kvtool.codecs.device_decode.Prefetch` of ``source`` (a path or a pinned uint8 tensor) when it
    will be decoded on the CUDA ``device`` by the device pipeline, else ``None``: the data section moves to the
    device while the header is parsed; closed when the block ends, whether decoding succeeded or failed."""
    try:
        use = device.type == "cuda" and pick_backend(backend, device) == "triton"
    except UsageError:  # reported by the decode itself, after the file's own problems
        use = False
    if not use:
        yield None
        return
    from kvtool.codecs.device_decode import Prefetch

    prefetch = Prefetch(source, device)
    try:
        yield prefetch
    finally:
        prefetch.close()


def model_param(model: Any) -> torch.Tensor:
    """A parameter of ``model`` (a transformers model or a ``LoadedModel``): its device and dtype are the cache's."""
    return next((model.model if is_loaded_model(model) else model).parameters())


def load_cache(
    path: str | os.PathLike[str],
    model: Any,
    calibration: str | os.PathLike[str] | Artifact | None = None,
    backend: str = "auto",
) -> tuple[Any, torch.Tensor]:
    """Decode a ``.kvz`` into a transformers ``DynamicCache`` that ``model.generate`` continues from.

    ``model``: a transformers model or a :class:`~kvtool.models.LoadedModel` (then its weights digest is checked
    too).
    Returns ``(cache, prefix_ids)``: pass ``prefix_ids`` followed by the new tokens as ``input_ids`` with
    ``past_key_values=cache``. The file must be for ``model`` (its config and weights digests are compared) and,
    when it was coded with a calibration artifact, that artifact must be given (exit 3 otherwise)."""
    from kvtool.artifacts import read_artifact

    param = model_param(model)
    with prefetching(path, param.device, backend) as prefetch:
        kvz = KvzFile(path)
        model = bind_model(kvz, model)
        cal = (calibration if isinstance(calibration, Artifact) or calibration is None
               else read_artifact(calibration, expect_schema=CALIBRATION_SCHEMA))  # fmt: skip
        layers = decode_kvz(kvz, model, cal, backend=backend, device=param.device, dtype=param.dtype,
                            prefetch=prefetch)  # fmt: skip
    ids = kvz.input_ids()
    return restore_cache(model, [(d.keys, d.values) for d in layers], kvz.tokens), ids
