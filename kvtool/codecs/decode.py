"""Decoding a ``.kvz`` back into per-layer K/V and a transformers cache: one straight pipeline.

The file (:class:`kvtool.codecs.container.KvzFile`, checked before anything is sized) → on a CUDA target, the
device-resident pipeline (:mod:`kvtool.codecs.device_decode`); otherwise chunk batches read, CRC-checked and decoded
by the coder on the CPU, written straight into the output tensors → RoPE re-applied with the model's rotation →
:func:`kvtool.cache_restore.restore_cache` (``load_cache``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable
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
from kvtool.codecs.coding import KINDS, CalibratedCoder, CodedChunk, make_coder, on_backend
from kvtool.codecs.container import (
    BATCH_CHUNKS,
    Geometry,
    KvzFile,
    check_calibration,
    check_same_model,
    check_tokenizer,
)
from kvtool.errors import ArtifactError, UsageError


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
) -> list[DecodedLayer]:
    """Decode every chunk of ``kvz`` (RoPE re-applied with ``model``'s own rotation) into per-layer tensors, in
    position order, on ``device`` (default: the CPU) in ``dtype`` (default: float32; lossless: the cache dtype).
    ``keep_pre_rope`` also returns the pre-RoPE keys (otherwise ``keys_pre_rope`` is ``None``).

    Two pipelines, the same values: with the Triton backend (``auto`` on a CUDA ``device``) the whole file is
    decoded on the device (:mod:`kvtool.codecs.device_decode`: one read, one transfer, one kernel launch for every
    lane); otherwise chunks are read, checked and decoded ``BATCH_CHUNKS`` at a time on the CPU and written
    straight into the output tensors (memory beyond the output is a few chunks)."""
    s, arch = kvz.settings, kvz.arch
    check_calibration(kvz, calibration)
    target = torch.device(device) if device is not None else torch.device("cpu")
    try:
        coder = make_coder(s, calibration, arch) if s.mode != "lossless" else None
    except UsageError as e:  # the settings come from the file here, not from a flag
        raise ArtifactError(f"{kvz.path}: {e}") from None
    coder = on_backend(coder, backend, target)
    if coder is not None and coder.backend == "triton":
        from kvtool.codecs.device_decode import decode_file

        _check_lane_counts(kvz, coder)
        layers = decode_file(kvz, model, coder, target, dtype or torch.float32, "triton", keep_pre_rope)
        if progress:
            progress(kvz.tokens)
        return layers
    out = _decode_streaming(kvz, model, coder, progress, keep_pre_rope)
    if device is None and dtype is None:
        return out
    cast = dtype or out[0].values.dtype
    return [DecodedLayer(d.keys.to(target, cast), None if d.keys_pre_rope is None else d.keys_pre_rope.to(target, cast),
                         d.values.to(target, cast), d.positions) for d in out]  # fmt: skip


def _decode_streaming(
    kvz: KvzFile, model: Any, coder: Any, progress: Callable[[int], None] | None, keep_pre_rope: bool
) -> list[DecodedLayer]:
    """The CPU pipeline of :func:`decode_kvz` (the reference the device pipeline is tested against)."""
    s, geo, arch = kvz.settings, kvz.geometry, kvz.arch
    heads, dim = arch.num_kv_heads, arch.head_dim
    dtype = kvz.cache_dtype
    out_dtype = dtype if s.mode == "lossless" else torch.float32
    if coder is not None:
        _check_lane_counts(kvz, coder)  # before anything is allocated from the header's numbers
    ranges = [geo.layer_range(i) for i in range(arch.num_layers)]
    # zeros, not empty: every slot is written below (the geometry is validated), and none may ever hold garbage
    keys = [torch.zeros(1, heads, hi - lo, dim, dtype=out_dtype) for lo, hi in ranges]
    values = [torch.zeros(1, heads, hi - lo, dim, dtype=out_dtype) for lo, hi in ranges]
    pre = [torch.zeros(1, heads, hi - lo, dim, dtype=out_dtype) for lo, hi in ranges] if keep_pre_rope else None
    lossless = s.mode == "lossless"
    for first in range(0, len(kvz.chunks), BATCH_CHUNKS):
        batch = list(range(first, min(first + BATCH_CHUNKS, len(kvz.chunks))))
        span = torch.arange(geo.chunk_span(batch[0])[0], geo.chunk_span(batch[-1])[1])
        # Lossless chunks hold the cached (post-RoPE) keys: RoPE is only needed to give pre-RoPE keys back.
        rope = rope_for_positions(model, arch.num_layers, span) if not lossless or pre is not None else None
        for chunk, layers in zip(batch, _decode_batch(kvz, geo, batch, coder, heads, dim, dtype), strict=True):
            for i, (k, v, positions) in enumerate(layers):
                if not positions:
                    continue
                pos = torch.tensor(positions, dtype=torch.int64)
                slot = pos - ranges[i][0]
                values[i][0][:, slot] = v.to(out_dtype)
                if rope is not None:
                    cos, sin = (t[:, pos - int(span[0])].cpu() for t in rope[i])
                if lossless:
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


def _check_lane_counts(kvz: KvzFile, coder: Any) -> None:
    """Every chunk's lane index must have the length its layout implies (coded tokens × components per layer,
    cut into lanes of ``lane_symbols``): so the output is sized only for files whose streams can fill it."""
    geo, n_layers = kvz.geometry, kvz.arch.num_layers
    channels = kvz.arch.num_kv_heads * kvz.arch.head_dim
    coded = geo.segments().coded.reshape(-1, n_layers)  # (C, L)
    if isinstance(coder, CalibratedCoder):
        per_token = torch.tensor([sum(int(coder._coded(i, k, {}).numel()) for k in KINDS) for i in range(n_layers)])
    else:  # adaptive: every channel of a layer with coded tokens has a positive step
        per_token = torch.full((n_layers,), 2 * channels)
    symbols = coded * per_token[None, :]
    lane = kvz.settings.lane_symbols
    expected = ((symbols + lane - 1) // lane).sum(1).tolist()
    for c, want in enumerate(expected):
        got = kvz._header[f"chunk.{c:06d}.lanes"]["shape"][0]
        if got != want:
            raise ArtifactError(f"{kvz.path}: chunk {c} cannot be decoded ({got} lanes, its layout has {want})")


def _decode_chunk(
    kvz: KvzFile, geo: Geometry, chunk: int, t: dict[str, torch.Tensor], coder: Any, heads: int, dim: int,
    dtype: torch.dtype,
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:  # fmt: skip
    """Per layer ``(keys, values, positions)`` of one chunk; keys pre-RoPE (post-RoPE for lossless)."""
    n_layers = geo.arch.num_layers
    splits = [geo.split(i, chunk) for i in range(n_layers)]
    if geo.settings.mode == "lossless":
        import zstandard

        sizes = t["layer_bytes"].tolist()
        blob, at, out = t["zstd"].numpy().tobytes(), 0, []
        if min(sizes) < 0 or sum(sizes) != len(blob):
            raise ValueError(f"layer sizes {sizes} do not add up to the {len(blob)} compressed bytes")
        for i, (coded, raw) in enumerate(splits):
            positions = coded + raw
            shape = (2, heads, len(positions), dim)
            n = 2 * heads * len(positions) * dim
            if not positions:
                out.append((torch.zeros(heads, 0, dim, dtype=dtype), torch.zeros(heads, 0, dim, dtype=dtype), []))
                continue
            size = torch.empty(0, dtype=dtype).element_size()
            # A streaming reader stops one byte past the size the geometry allows, whatever the frame declares
            # (one-shot decompress trusts a frame's content size: a 32 KiB frame could claim 1 GiB).
            try:
                with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob[at : at + sizes[i]])) as r:
                    planes = r.read(n * size + 1)
            except zstandard.ZstdError as e:
                raise ValueError(f"layer {i}: {e}") from e
            at += sizes[i]
            if len(planes) != n * size:
                raise ValueError(f"layer {i}: {len(planes)} bytes, expected {n * size}")
            raw_t = torch.frombuffer(bytearray(planes), dtype=torch.uint8).reshape(size, n).T.contiguous()
            kv = raw_t.view(dtype).reshape(shape)
            out.append((kv[0], kv[1], positions))
        return out
    coded, raw = _coded_part(t, n_layers, splits, heads, dim)
    layers = coder.decode(coded, [len(c) for c, _ in splits], heads, dim)
    return _with_raw(layers, raw, splits, heads, dim)


def _coded_part(
    t: dict[str, torch.Tensor], n_layers: int, splits: list[tuple[list[int], list[int]]], heads: int, dim: int
) -> tuple[CodedChunk, torch.Tensor]:
    """The coded stream of a chunk's tensors and its raw fp16 values (checked against the layout)."""
    side = {k: v for k, v in t.items() if k not in ("words", "lanes", "layer_lanes", "raw")}
    coded = CodedChunk(t["words"].to(torch.int32), t["lanes"].to(torch.int32).to(torch.int64), t["layer_lanes"], side)
    if coded.layer_lanes.numel() != n_layers:
        raise ValueError("lane index of the wrong length")
    if int(coded.lanes.sum()) != coded.words.numel() or bool((coded.lanes < 2).any()):
        raise ValueError("the lane lengths do not match the words")  # every lane holds at least its 2-word state
    raw = t["raw"].float()
    need = sum(2 * heads * len(r) * dim for _, r in splits)
    if raw.numel() != need:
        raise ValueError(f"{raw.numel()} fp16 values for {need} kept elements")
    return coded, raw


def _with_raw(
    layers: list[tuple[torch.Tensor, ...]], raw: torch.Tensor, splits: list[tuple[list[int], list[int]]], heads: int,
    dim: int,
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:  # fmt: skip
    out, at = [], 0
    for (k, v), (c, r) in zip(layers, splits, strict=True):
        n = 2 * heads * len(r) * dim
        kv = raw[at : at + n].reshape(2, heads, len(r), dim)
        at += n
        out.append((torch.cat([k, kv[0]], dim=1), torch.cat([v, kv[1]], dim=1), c + r))
    return out


def _decode_batch(
    kvz: KvzFile, geo: Geometry, batch: list[int], coder: Any, heads: int, dim: int, dtype: torch.dtype
) -> list[list[tuple[torch.Tensor, torch.Tensor, list[int]]]]:
    """Decode the chunks ``batch`` (CRC-checked each) in one pass of the entropy decoder; a failure is reported
    for the chunk that causes it."""
    tensors = [kvz.read_chunk(c) for c in batch]
    n_layers = geo.arch.num_layers
    if coder is None or len(batch) == 1:
        out = []
        for c, t in zip(batch, tensors, strict=True):
            try:
                out.append(_decode_chunk(kvz, geo, c, t, coder, heads, dim, dtype))
            except (ValueError, RuntimeError, KeyError, IndexError) as e:
                raise ArtifactError(f"{kvz.path}: chunk {c} cannot be decoded ({e})") from e
        return out
    try:
        splits = [[geo.split(i, c) for i in range(n_layers)] for c in batch]
        parts = [_coded_part(t, n_layers, sp, heads, dim) for t, sp in zip(tensors, splits, strict=True)]
        layers = coder.decode_batch([p[0] for p in parts], [[len(x) for x, _ in sp] for sp in splits], heads, dim)
        return [_with_raw(ly, p[1], sp, heads, dim) for ly, p, sp in zip(layers, parts, splits, strict=True)]
    except (ValueError, RuntimeError, KeyError, IndexError):
        return [_decode_batch(kvz, geo, [c], coder, heads, dim, dtype)[0] for c in batch]  # names the chunk


def sorted_layers(layers: list[DecodedLayer]) -> list[DecodedLayer]:
    """Tokens of each layer in position order (:func:`decode_kvz` already returns them so; kept for callers that
    assemble layers themselves)."""
    out = []
    for d in layers:
        if bool((d.positions[1:] > d.positions[:-1]).all()):
            out.append(d)
            continue
        order = torch.argsort(d.positions)
        pre = None if d.keys_pre_rope is None else d.keys_pre_rope[:, :, order]
        out.append(dataclasses.replace(d, keys=d.keys[:, :, order], keys_pre_rope=pre,
                                       values=d.values[:, :, order], positions=d.positions[order]))  # fmt: skip
    return out


def bind_model(kvz: KvzFile, model: Any) -> Any:
    """Check that ``kvz`` was made for ``model`` and return the transformers model: with a kvtool
    ``LoadedModel`` its config, weights and tokenizer digests are compared; with a bare transformers model its
    config is all there is to check."""
    from kvtool.arch import arch_info

    if hasattr(model, "fingerprint") and hasattr(model, "model"):  # a kvtool LoadedModel
        check_tokenizer(kvz, model.tokenizer)
        fingerprint, model = model.fingerprint, model.model
    else:
        fingerprint = {
            "id": getattr(model.config, "_name_or_path", ""),
            "config_digest": arch_info(model.config).digest(),
        }
    check_same_model(kvz.model, fingerprint, ".kvz file")
    return model


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

    kvz = KvzFile(path)
    model = bind_model(kvz, model)
    cal = (calibration if isinstance(calibration, Artifact) or calibration is None
           else read_artifact(calibration, expect_schema=CALIBRATION_SCHEMA))  # fmt: skip
    param = next(model.parameters())
    layers = sorted_layers(decode_kvz(kvz, model, cal, backend=backend, device=param.device, dtype=param.dtype))
    ids = kvz.input_ids()
    return restore_cache(model, [(d.keys, d.values) for d in layers], kvz.tokens), ids

