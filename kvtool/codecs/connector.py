"""The API an engine connector calls: code KV tensors already in memory into ``.kvz`` bytes, and decode ``.kvz``
bytes (or a file) into per-layer K/V on a given device, optionally into the caller's own buffers.

No prefill happens here: the engine has the cache (it just ran the prefill) and the token ids. What the codec
needs of the model is its architecture (layer types, sliding windows), its rotary embedding (keys are coded
pre-RoPE and rotated back at decode) and a fingerprint that binds a file to the model.

    from kvtool import encode_kv, decode_kv

    blob = encode_kv(model, cache, input_ids)                      # bytes of a .kvz
    layers = decode_kv(blob, model, device="cuda")                 # [(keys, values)] per layer, post-RoPE
    decode_kv("ctx.kvz", model, out=[(k_buf, v_buf), ...])         # into preallocated tensors

Layout of every K/V tensor: ``(1, kv_heads, n_l, head_dim)``, post-RoPE keys as the model caches them, ``n_l``
the positions layer ``l`` holds (``T`` for full attention, the last ``window - 1`` for a sliding-window layer).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from kvtool.artifacts import Artifact, read_artifact, serialized_parts
from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA
from kvtool.codecs.decode import model_param, prefetching
from kvtool.codecs.kvz import (
    CodecSettings,
    KvzFile,
    bind_model,
    decode_kvz,
    kvz_artifact,
)
from kvtool.errors import UsageError
from kvtool.models import is_loaded_model

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | torch.Tensor


@dataclass
class _CodecModel:
    """What the codec needs of a model (the shape of a kvtool ``LoadedModel``)."""

    model: Any
    arch: Any
    fingerprint: dict[str, str]
    tokenizer: Any


@dataclass
class _Layer:
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class _Cache:
    layers: list[_Layer]


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_digest(model: Any) -> str:
    """sha256 over a model's parameters (names, dtypes, shapes and bytes, in name order), computed once per model
    object. Pass ``fingerprint=`` to :func:`encode_kv` to skip it (e.g. ``kvtool.models.model_fingerprint(spec)``,
    which digests the weight files instead)."""
    if model not in _WEIGHTS:
        h = hashlib.sha256()
        for name, p in sorted(model.state_dict().items()):
            h.update(f"{name}\0{p.dtype}\0{tuple(p.shape)}\0".encode())
            h.update(p.detach().contiguous().view(torch.uint8).reshape(-1).cpu().numpy().data)
        _WEIGHTS[model] = "sha256:" + h.hexdigest()
    return _WEIGHTS[model]


class _NoTokenizer:
    """Stands for a tokenizer the caller did not give: its vocabulary is empty, so the recorded tokenizer digest
    is that of no tokenizer, and a decoder given a real tokenizer refuses the file rather than trusting it."""

    def get_vocab(self) -> dict[str, int]:
        return {}


def codec_model(model: Any, fingerprint: dict[str, str] | None = None, tokenizer: Any = None) -> Any:
    """``model`` as the codec sees it: a kvtool ``LoadedModel`` as it is; a transformers model with its
    architecture, a fingerprint (given, or its config digest and :func:`weights_digest`) and a tokenizer."""
    if is_loaded_model(model):
        return model
    from kvtool.arch import arch_info

    arch = arch_info(model.config)
    fp = dict(fingerprint) if fingerprint is not None else {
        "id": str(getattr(model.config, "_name_or_path", "") or arch.model_type),
        "config_digest": arch.digest(),
        "weights_digest": weights_digest(model),
    }  # fmt: skip
    if fp.get("config_digest") != arch.digest():
        raise UsageError("fingerprint: its config_digest is not the model's")
    return _CodecModel(model, arch, fp, tokenizer if tokenizer is not None else _NoTokenizer())


def _as_cache(kv: Any, arch: Any) -> Any:
    """A cache with ``.layers[i].keys/.values`` ``(1, heads, n_i, head_dim)`` from a transformers cache or a list
    of ``(keys, values)`` (3-d tensors get the batch axis)."""
    if hasattr(kv, "layers"):
        return kv
    layers = []
    for i, pair in enumerate(kv):
        k, v = pair
        k, v = (k[None] if k.dim() == 3 else k), (v[None] if v.dim() == 3 else v)
        if k.dim() != 4 or k.shape[0] != 1 or k.shape != v.shape:
            raise UsageError(f"layer {i}: keys and values must both be (1, kv_heads, tokens, head_dim)")
        if (k.shape[1], k.shape[3]) != (arch.num_kv_heads, arch.head_dim):
            raise UsageError(f"layer {i}: {tuple(k.shape)} is not (1, {arch.num_kv_heads}, n, {arch.head_dim})")
        layers.append(_Layer(k, v))
    if len(layers) != arch.num_layers:
        raise UsageError(f"{len(layers)} layers of K/V for a model with {arch.num_layers}")
    return _Cache(layers)


def encode_kv(
    model: Any,
    kv: Any,
    input_ids: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    settings: CodecSettings | None = None,
    calibration: str | os.PathLike[str] | Artifact | None = None,
    fingerprint: dict[str, str] | None = None,
    tokenizer: Any = None,
    backend: str = "auto",
) -> bytes:
    """The ``.kvz`` bytes of a prefix cache already in memory (no prefill).

    ``model``: a kvtool ``LoadedModel`` or a transformers model (its rotary embedding and architecture are used;
    see :func:`codec_model` for ``fingerprint`` and ``tokenizer``). ``kv``: a transformers cache or a list of
    per-layer ``(keys, values)``, post-RoPE as cached, ``(1, kv_heads, n_l, head_dim)`` on any device.
    ``input_ids``: the ``T`` prefix token ids. ``positions``: the prefix positions, if given they must be
    ``0 .. T-1`` (a ``.kvz`` holds a prefix from its first token). ``settings``: the codec's
    (default: adaptive, quality 0.5); ``calibration``: the artifact for calibrated coding."""
    return b"".join(_encoded_parts(model, kv, input_ids, positions, settings, calibration, fingerprint, tokenizer,
                                   backend))  # fmt: skip


def encode_kv_into(
    out: torch.Tensor | bytearray | memoryview,
    model: Any,
    kv: Any,
    input_ids: torch.Tensor,
    *,
    positions: torch.Tensor | None = None,
    settings: CodecSettings | None = None,
    calibration: str | os.PathLike[str] | Artifact | None = None,
    fingerprint: dict[str, str] | None = None,
    tokenizer: Any = None,
    backend: str = "auto",
) -> int:
    """:func:`encode_kv` into the caller's buffer: the ``.kvz`` bytes are written to the start of ``out`` (a CPU
    uint8 tensor, e.g. an engine's pinned staging buffer, or a writable bytes-like object) and their count is
    returned. A buffer kept and reused is already mapped, so the host copy of a large file runs at memory speed on
    all cores instead of faulting in fresh pages (what most of ``encode_kv``'s final copy costs). ``UsageError``
    (nothing written) when ``out`` is too small."""
    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu" or out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous():
            raise UsageError("out must be a contiguous 1-d CPU uint8 tensor or a writable bytes-like object")
        dst = out
    else:
        try:
            view = memoryview(out)
            flat = view.cast("B") if view.nbytes else None
        except TypeError as e:  # not a buffer, or one that is not C-contiguous
            raise UsageError(f"out must be a CPU uint8 tensor or a writable contiguous buffer ({e})") from None
        if view.readonly:
            raise UsageError("out must be writable")
        dst = torch.frombuffer(flat, dtype=torch.uint8) if flat is not None else torch.empty(0, dtype=torch.uint8)
    parts = _encoded_parts(model, kv, input_ids, positions, settings, calibration, fingerprint, tokenizer, backend)
    size = sum(memoryview(p).nbytes for p in parts)
    if size > dst.numel():
        raise UsageError(f"out holds {dst.numel()} bytes; this .kvz needs {size}")
    at = 0
    for p in parts:  # torch copies large pieces on all its threads
        n = memoryview(p).nbytes
        if n:  # the header is bytes (read-only: torch.frombuffer wants a writable buffer, so a small copy)
            src = torch.frombuffer(bytearray(p) if isinstance(p, bytes) else p, dtype=torch.uint8)
            dst[at : at + n].copy_(src)
        at += n
    return size


def _encoded_parts(model: Any, kv: Any, input_ids: torch.Tensor, positions: torch.Tensor | None,
                   settings: CodecSettings | None, calibration: Any, fingerprint: dict[str, str] | None,
                   tokenizer: Any, backend: str) -> list[bytes | memoryview]:  # fmt: skip
    """The ``.kvz`` of :func:`encode_kv` as consecutive pieces (:func:`kvtool.artifacts.serialized_parts`)."""
    lm = codec_model(model, fingerprint, tokenizer)
    ids = input_ids.reshape(-1).to(torch.int64).cpu()
    if positions is not None and not torch.equal(positions.reshape(-1).cpu(), torch.arange(ids.numel())):
        raise UsageError("positions must be 0 .. T-1: a .kvz holds a prefix from its first token")
    if ids.numel() < 1:
        raise UsageError("the prefix has no tokens")
    cal = _calibration(calibration)
    art = kvz_artifact(lm, ids, _as_cache(kv, lm.arch), settings or CodecSettings(), cal, None, backend)
    return serialized_parts(art)[0]


def _calibration(calibration: Any) -> Artifact | None:
    if calibration is None or isinstance(calibration, Artifact):
        return calibration
    return read_artifact(calibration, expect_schema=CALIBRATION_SCHEMA)


def decode_kv(
    source: Source,
    model: Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    calibration: str | os.PathLike[str] | Artifact | None = None,
    out: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    backend: str = "auto",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` (post-RoPE, ``(1, kv_heads, n_l, head_dim)``) of a ``.kvz`` given as a path
    (``str`` or ``Path``), as bytes in memory (``bytes``, ``memoryview``, a CPU uint8 tensor: a pinned one goes
    to the GPU without a staging copy) on ``device`` (default: the model's) in ``dtype`` (default: the model's).

    ``out``: the caller's buffers, one ``(keys, values)`` per layer of exactly those shapes (any dtype and device);
    they are filled and returned. The file must be for ``model`` (config digest; with a ``LoadedModel`` also the
    weights and tokenizer digests): anything else is refused (``ArtifactError``, exit 3 in the CLI), as is a file
    whose checks fail; nothing is written to ``out`` then."""
    param = model_param(model)
    target = torch.device(device) if device is not None else param.device
    with prefetching(source, target, backend) as prefetch:  # the bytes move while the header is parsed
        kvz = KvzFile(source)
        model = bind_model(kvz, model)
        if out is not None:
            _check_out(out, kvz)
        layers = decode_kvz(kvz, model, _calibration(calibration), backend=backend, device=target,
                            dtype=dtype or param.dtype, prefetch=prefetch)  # fmt: skip
    pairs = [(d.keys, d.values) for d in layers]
    if out is None:
        return pairs
    for (k, v), (bk, bv) in zip(pairs, out, strict=True):
        bk.copy_(k)
        bv.copy_(v)
    return out


def _check_out(out: list[tuple[torch.Tensor, torch.Tensor]], kvz: KvzFile) -> None:
    arch = kvz.arch
    if len(out) != arch.num_layers:
        raise UsageError(f"out: {len(out)} layers of buffers for a file of {arch.num_layers}")
    for i, (k, v) in enumerate(out):
        lo, hi = kvz.geometry.layer_range(i)
        want = (1, arch.num_kv_heads, hi - lo, arch.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise UsageError(f"out: layer {i} buffers must be {want}, not {tuple(k.shape)} / {tuple(v.shape)}")
