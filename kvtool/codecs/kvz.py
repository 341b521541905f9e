"""The ``.kvz`` prefix-cache container: encode a model's prefix KV cache into chunks, decode them back.

A ``.kvz`` file is a kvtool artifact (``docs/artifacts.md``; schema ``kvtool.kvz``, ``docs/kvz.md``): one
safetensors file whose tensors are the per-chunk bitstreams and small indexes, and whose JSON metadata records the
model, the prefix token ids' digest, the tokenizer digest, the calibration artifact's digest, the codec settings and
a CRC-32 per chunk. Chunks of ``chunk_tokens`` positions decode independently and, inside a chunk, layers too.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo, apply_rope, invert_rope
from kvtool.artifacts import (
    DIGEST_RE,
    Artifact,
    content_hasher,
    digest_tensor,
    env_limit,
    is_int,
    kvtool_metadata,
    max_artifact_bytes,
    one_line,
    parse_header,
    read_header_with_offset,
    register_schema,
    torch_dtype,
    write_artifact,
)
from kvtool.cache_restore import restore_cache
from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA
from kvtool.calibration import transform_of
from kvtool.capture import prefix_rope, rope_for_positions
from kvtool.codecs.coding import KINDS, AdaptiveCoder, CalibratedCoder, CodedChunk
from kvtool.codecs.ecsq import MAX_K, codec_levels
from kvtool.digests import sha256_json, token_digest
from kvtool.errors import ArtifactError, KvtoolError, UsageError
from kvtool.kernels import pick_backend
from kvtool.quantizers.projection import ProjectionQuantizer

SCHEMA = "kvtool.kvz"
#: Version 2: every chunk's CRC-32 starts from a digest of the metadata it is decoded with (:func:`crc_seed`),
#: so the chunk CRCs and the metadata digest together bind every byte, and a decoder needs no whole-file digest.
SCHEMA_VERSION = 2
register_schema(SCHEMA, SCHEMA_VERSION)
PREFILL_PIECE = 2048  #: tokens per prefill forward (bounds attention memory on long prompts)
BATCH_CHUNKS = 8  #: chunks entropy-coded together (their lanes advance in one pass; memory stays a few chunks)
MAX_TOKENS = 1 << 24  #: longest prefix a .kvz may hold (16.7M tokens), and the bound on every recorded count
#: Cap on the decoded cache of one file, in bytes (a stated bound; ``KVTOOL_MAX_DECODE_BYTES`` overrides it).
MAX_DECODE_BYTES = 1 << 37
CACHE_DTYPES = ("float16", "bfloat16", "float32")  #: cache dtypes a file may record
#: A lossless chunk may decompress to at most this many times its compressed size (real caches: under 2:1; the cap
#: keeps a forged token count from sizing an output the file cannot fill).
MAX_LOSSLESS_RATIO = 1024
MAX_CHUNKS = 999_999  #: chunk names have six digits, so they sort in chunk order
LAYOUT = "see docs/kvz.md"  #: ``extra.layout``: the chunk layout this kvtool writes and reads


@kvconfig.register
@dataclass(frozen=True)
class CodecSettings:
    """How a prefix is coded (recorded in the file)."""

    version: ClassVar[int] = 1
    mode: Literal["calibrated", "adaptive", "lossless"] = "adaptive"
    level: int = -1  #: calibrated: index into the artifact's codec levels
    quality: float = 0.5  #: adaptive: quantization step in standard deviations of each channel
    chunk_tokens: int = 256
    sink_tokens: int = 1  #: first positions stored as fp16 (attention sinks)
    recent_tokens: int = 0  #: last positions stored as fp16
    lane_symbols: int = 4096
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.mode not in ("calibrated", "adaptive", "lossless"):
            raise UsageError(f"codec mode must be calibrated, adaptive or lossless (got {self.mode!r})")
        for name, lo, hi in (
            ("level", -MAX_TOKENS, MAX_TOKENS),
            ("chunk_tokens", 1, MAX_TOKENS),
            ("sink_tokens", 0, MAX_TOKENS),
            ("recent_tokens", 0, MAX_TOKENS),
            ("lane_symbols", 1, 65533),
            ("zstd_level", -7, 22),
        ):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
                raise UsageError(f"codec setting {name} must be an integer in {lo}..{hi} (got {v!r})")
        q = self.quality
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q <= 64:
            raise UsageError(f"--quality must be in (0, 64] (got {q!r})")


def crc_seed(meta: dict[str, Any]) -> bytes:
    """What a version-2 chunk CRC starts from: the sha256 of the metadata the chunk is decoded with (schema,
    version, model, inputs, settings, and the extra facts with the chunk table's own CRCs and the metadata digest
    left out). Version 1 files: nothing (their metadata is bound by the whole-file content digest instead)."""
    if meta.get("schema_version", 1) < 2:
        return b""
    extra = dict(meta["extra"])
    extra.pop("meta_digest", None)
    extra["chunks"] = [{k: v for k, v in c.items() if k != "crc32"} if isinstance(c, dict) else c
                       for c in extra.get("chunks", [])]  # fmt: skip
    parts = [meta["schema"], meta["schema_version"], meta["model"], meta["inputs"], meta["method"], extra]
    return sha256_json(parts).encode()


def chunk_crc(buffers: dict[str, Any], seed: bytes = b"") -> int:
    """CRC-32 of a chunk's tensors given as byte buffers by full name (name, NUL, bytes, in name order), started
    from ``seed`` (:func:`crc_seed`)."""
    crc = zlib.crc32(seed) if seed else 0
    for name in sorted(buffers):
        crc = zlib.crc32(name.encode() + b"\0", crc)
        crc = zlib.crc32(buffers[name], crc)
    return crc


def _crc(tensors: dict[str, torch.Tensor], seed: bytes = b"") -> int:
    """:func:`chunk_crc` of tensors."""
    return chunk_crc({n: memoryview(t.contiguous().view(torch.uint8).numpy()) for n, t in tensors.items()}, seed)


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of the tokenizer's vocabulary (a cache is only meaningful for the ids it was made from)."""
    return sha256_json(sorted(tokenizer.get_vocab().items()))


@dataclass
class Geometry:
    """Which positions each layer holds and how chunks cut them."""

    arch: ArchInfo
    tokens: int
    settings: CodecSettings
    _segments: Segments | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def layer_range(self, layer: int) -> tuple[int, int]:
        return self.tokens - self.arch.cached_tokens(layer, self.tokens), self.tokens

    @property
    def num_chunks(self) -> int:
        return -(-self.tokens // self.settings.chunk_tokens)

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.settings.chunk_tokens
        return start, min(start + self.settings.chunk_tokens, self.tokens)

    def raw(self, position: int) -> bool:
        s = self.settings
        return position < s.sink_tokens or position >= self.tokens - s.recent_tokens

    def segments(self) -> Segments:
        """Coded and raw token counts of every (chunk, layer), by interval arithmetic (see :class:`Segments`);
        computed once per geometry."""
        if self._segments is None:
            self._segments = _segments(self)
        return self._segments

    def split(self, layer: int, chunk: int) -> tuple[list[int], list[int]]:
        """Positions of ``layer`` in ``chunk``: (coded, raw fp16)."""
        lo, hi = self.layer_range(layer)
        a, b = self.chunk_span(chunk)
        start, stop = max(a, lo), min(b, hi)
        if stop <= start:
            return [], []
        # raw positions are the sinks [0, s) and the recent ones [T - r, T): the coded ones are one run between
        s = self.settings
        sink_end = min(s.sink_tokens, self.tokens)
        recent_start = max(self.tokens - s.recent_tokens, sink_end)
        c0, c1 = min(max(start, sink_end), stop), max(min(stop, recent_start), min(max(start, sink_end), stop))
        return list(range(c0, c1)), [*range(start, c0), *range(c1, stop)]


@dataclass
class Segments:
    """Per chunk ``c`` and layer ``l`` (row-major ``c · L + l``): coded and raw token counts."""

    coded: torch.Tensor  #: (C·L,) int64
    raw: torch.Tensor  #: (C·L,) int64


def _segments(geo: Geometry) -> Segments:
    """:class:`Segments` of ``geo``, computed from interval arithmetic (the same
    positions as ``Geometry.split``: coded = not sink and not recent)."""
    n_layers, n_chunks, t = geo.arch.num_layers, geo.num_chunks, geo.tokens
    s = geo.settings
    lo = torch.tensor([geo.layer_range(i)[0] for i in range(n_layers)], dtype=torch.int64)
    a = torch.arange(n_chunks, dtype=torch.int64) * s.chunk_tokens
    b = (a + s.chunk_tokens).clamp_max(t)
    start = torch.maximum(a[:, None], lo[None, :])  # (C, L)
    stop = b[:, None].expand(-1, n_layers)
    total = (stop - start).clamp_min(0)
    sink_end = min(s.sink_tokens, t)
    recent_start = max(t - s.recent_tokens, sink_end)

    def overlap(x0: int, x1: int) -> torch.Tensor:
        return (torch.minimum(stop, torch.tensor(x1)) - torch.maximum(start, torch.tensor(x0))).clamp_min(0)

    raw = overlap(0, sink_end) + overlap(recent_start, t)
    return Segments((total - raw).reshape(-1), raw.reshape(-1))


def _on_backend(coder: Any, backend: str, device: torch.device) -> Any:
    """Run ``coder``'s entropy coding with ``backend`` (``auto``: Triton on CUDA models); same bytes either way."""
    if coder is not None:
        use = pick_backend(backend, device)
        coder.backend = use
        coder.device = device if use == "triton" else torch.device("cpu")
    return coder


def _coder(settings: CodecSettings, calibration: Artifact | None, arch: ArchInfo) -> Any:
    if settings.mode == "adaptive":
        adaptive = AdaptiveCoder(arch.num_layers, arch.num_kv_heads * arch.head_dim, settings.quality)
        adaptive.lane_len = settings.lane_symbols
        return adaptive
    if settings.mode != "calibrated":
        return None
    if calibration is None:
        raise UsageError("calibrated coding needs a calibration artifact (--calibration)")
    t = transform_of(calibration)
    levels = codec_levels(calibration.tensors)
    if not levels or not all(isinstance(q, ProjectionQuantizer) for q in t.keys + t.values):
        raise ArtifactError("the calibration artifact has no codec levels: make it with --method pca or svd")
    if not -len(levels) <= settings.level < len(levels):
        raise UsageError(f"level {settings.level} out of range: the artifact has {len(levels)} codec levels")
    coder = CalibratedCoder(t.keys, t.values, levels[settings.level])  # type: ignore[arg-type]
    coder.lane_len = settings.lane_symbols
    return coder


def pick_level(calibration: Artifact, bits: float) -> int:
    """The richest codec level whose calibrated rate is at most ``bits`` all-in bits per element."""
    levels = codec_levels(calibration.tensors)
    fits = [i for i, lv in enumerate(levels) if lv.expected_bits <= bits + 1e-9]
    if not fits:
        cheapest = min((lv.expected_bits for lv in levels), default=float("nan"))
        raise UsageError(f"--bits {bits:g} is below the artifact's cheapest codec level ({cheapest:.2f} bits)")
    return max(fits, key=lambda i: levels[i].expected_bits)


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
    coder = _on_backend(_coder(settings, calibration, arch), backend, next(lm.model.parameters()).device)
    if calibration is not None and settings.mode == "calibrated":
        _check_same_model(calibration.model, lm.fingerprint, "calibration artifact")
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
            chunks[chunk]["crc32"] = _crc(part, seed)
            tensors |= part
            if progress:
                progress(spans[chunk][1] - spans[chunk][0])
    art.extra["meta_digest"] = _meta_digest(
        art.schema, art.schema_version, art.model, art.inputs, art.method, art.extra
    )
    return art


def _meta_digest(*parts: Any) -> str:
    """Digest of the metadata a decoder relies on (schema, model, inputs, settings, chunk table), so a damaged
    header is caught without reading the chunks (``extra.meta_digest`` itself left out)."""
    *head, extra = parts
    return sha256_json([*head, {k: v for k, v in extra.items() if k != "meta_digest"}])


def _check_same_model(recorded: dict[str, Any], fingerprint: dict[str, Any], what: str) -> None:
    for key in ("config_digest", "weights_digest"):
        if key in recorded and key in fingerprint and recorded[key] != fingerprint[key]:
            raise ArtifactError(
                f"the {what} is for model '{recorded.get('id')}', not '{fingerprint.get('id')}' ({key} differs)"
            )


# -- reading ------------------------------------------------------------------------------------------------------


class _BufferReader:
    """``read``/``seek`` over a memoryview without copying it (``io.BytesIO`` would copy the whole buffer)."""

    def __init__(self, view: memoryview):
        self.view, self.at = view, 0

    def read(self, n: int = -1) -> bytes:
        end = self.view.nbytes if n < 0 else min(self.at + n, self.view.nbytes)
        out = bytes(self.view[self.at : end])
        self.at = end
        return out

    def seek(self, at: int) -> None:
        self.at = at

    def __enter__(self) -> _BufferReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class KvzFile:
    """An opened ``.kvz``: the validated metadata, and chunk tensors read lazily with their CRC checked.

    Opening checks everything the header states before any tensor data is read or any output is sized from it:
    the safetensors structure, the kvtool JSON (strict: no duplicate keys, no non-finite numbers, bounded depth),
    every recorded number against the geometry it implies and against explicit caps (:data:`MAX_TOKENS`,
    :data:`MAX_DECODE_BYTES`), the recorded architecture against its own config digest, and the exact dtype and
    shape of every tensor the schema requires (and that there are no others). Reading the chunks in order also
    feeds the file's content digest, which :meth:`check_content_digest` compares once every byte has been seen.
    """

    def __init__(self, path: str | os.PathLike[str] | bytes | bytearray | memoryview | torch.Tensor,
                 name: str = "<memory>"):  # fmt: skip
        #: bytes already in host memory (an engine's buffer): a ``bytes``-like object or a CPU uint8 tensor (a
        #: pinned one is transferred to the GPU without a staging copy); otherwise ``path`` is a file
        self.buffer: memoryview | torch.Tensor | None = None
        if isinstance(path, torch.Tensor):
            if path.dtype != torch.uint8 or path.dim() != 1 or path.device.type != "cpu":
                raise UsageError("a .kvz buffer must be a one-dimensional uint8 CPU tensor")
            self.buffer, self.path = path.contiguous(), Path(name)
        elif isinstance(path, bytes | bytearray | memoryview):
            self.buffer, self.path = memoryview(path).cast("B"), Path(name)
        else:
            self.path = Path(path)
        source = str(self.path)
        if self.buffer is None:
            header, self._data_start = read_header_with_offset(self.path)
        else:
            size = self.size
            if size > max_artifact_bytes():
                raise ArtifactError(f"{source}: {size} bytes, more than the {max_artifact_bytes()}-byte cap")
            reader = self.open()
            header, self._data_start = parse_header(reader.read, size, source)
        meta = kvtool_metadata(header, source, expect_schema=SCHEMA)
        try:
            self._read_meta(meta)
            per_chunk = {"lossless": 2, "calibrated": 4, "adaptive": 7}[self.settings.mode]
            want = 1 + per_chunk * self.geometry.num_chunks  # counted before any per-tensor table is built
            if len(header) - ("__metadata__" in header) != want:
                raise ValueError(f"{len(header) - ('__metadata__' in header)} tensors, the format has {want}")
            self._expected = self._expected_tensors()
            self._check_tensors(header)
        except (KeyError, TypeError, ValueError, KvtoolError) as e:
            raise ArtifactError(f"{source}: malformed .kvz metadata ({one_line(e)})") from None
        recorded = self.extra.get("meta_digest")
        if recorded != _meta_digest(meta["schema"], meta["schema_version"], self.model, self.inputs, meta["method"],
                                    self.extra):  # fmt: skip
            raise ArtifactError(f"{source}: the .kvz header is corrupted (metadata digest mismatch)")
        self.content_digest: str = meta["content_digest"]
        self._meta = meta
        self._crc_seed = crc_seed(meta)
        self._header = header
        self._hasher = content_hasher(meta)
        self._hashed_chunks = 0  #: chunks fed to the content digest so far (in order)
        self._digest_ok = False

    # -- metadata ----------------------------------------------------------------------------------------------

    def _read_meta(self, meta: dict[str, Any]) -> None:
        settings = kvconfig.from_dict(meta["method"])
        if not isinstance(settings, CodecSettings):
            raise ValueError(f"method is a {type(settings).__name__}, not CodecSettings")
        _exact_keys(meta["method"], "method", {"_type", "_version", "_data"})
        _exact_keys(meta["method"]["_data"], "method._data", {f.name for f in dataclasses.fields(CodecSettings)})
        self.settings: CodecSettings = settings
        self.model: dict[str, Any] = meta["model"]
        _exact_keys(self.model, "model", {"id", "config_digest", "weights_digest", "arch"})
        if not self.model["id"]:
            raise ValueError("model.id is empty")
        self.arch = ArchInfo.from_dict(self.model.get("arch"))
        if self.arch.digest() != self.model["config_digest"]:
            raise ValueError("model.arch does not match the recorded config_digest")
        self.inputs: dict[str, Any] = meta["inputs"]
        _exact_keys(self.inputs, "inputs", {"tokens", "token_ids_digest", "tokenizer_digest", "calibration"})
        self.tokens = _int_in(self.inputs["tokens"], "inputs.tokens", 1, MAX_TOKENS)
        for key in ("token_ids_digest", "tokenizer_digest"):
            _digest_string(self.inputs[key], f"inputs.{key}")
        cal = self.inputs["calibration"]
        if cal is not None:
            _exact_keys(cal, "inputs.calibration", {"content_digest"})
            _digest_string(cal["content_digest"], "inputs.calibration.content_digest")
        lossless_v2 = settings.mode == "lossless" and meta["schema_version"] >= 2
        if lossless_v2 and (settings.sink_tokens or settings.recent_tokens):
            raise ValueError("a version-2 lossless file records no sink or recent tokens")
        if (cal is not None) != (settings.mode == "calibrated"):
            raise ValueError(f"a {settings.mode} file {'without' if cal is None else 'with'} a calibration digest")
        self.extra: dict[str, Any] = meta["extra"]
        _exact_keys(self.extra, "extra", {"cache_dtype", "chunks", "layers", "layout", "meta_digest"})
        if self.extra["layout"] != LAYOUT:
            raise ValueError(f"extra.layout is {self.extra['layout']!r}, not {LAYOUT!r}")
        if self.extra["cache_dtype"] not in CACHE_DTYPES:
            raise ValueError(f"extra.cache_dtype {self.extra['cache_dtype']!r} is not one of {CACHE_DTYPES}")
        self.cache_dtype: torch.dtype = getattr(torch, self.extra["cache_dtype"])
        self.geometry = Geometry(self.arch, self.tokens, settings)
        geo = self.geometry
        if geo.num_chunks > MAX_CHUNKS:
            raise ValueError(f"{geo.num_chunks} chunks, more than {MAX_CHUNKS}")
        self.chunks: list[dict[str, Any]] = self.extra["chunks"]
        if not isinstance(self.chunks, list) or len(self.chunks) != geo.num_chunks:
            raise ValueError(f"the chunk table does not list the {geo.num_chunks} chunks of {self.tokens} tokens")
        for i, c in enumerate(self.chunks):
            _exact_keys(c, f"extra.chunks[{i}]", {"index", "start", "stop", "crc32"})
            start, stop = geo.chunk_span(i)
            if [c["index"], c["start"], c["stop"]] != [i, start, stop] or not all(
                is_int(c[k]) for k in ("index", "start", "stop")
            ):
                raise ValueError(f"extra.chunks[{i}] does not cover positions [{start}, {stop})")
            _int_in(c["crc32"], f"extra.chunks[{i}].crc32", 0, 0xFFFFFFFF)
        ranges = [list(geo.layer_range(i)) for i in range(self.arch.num_layers)]
        if self.extra["layers"] != ranges or not all(is_int(x) for r in self.extra["layers"] for x in r):
            raise ValueError("extra.layers does not match the positions the model's layers hold")
        if self.decoded_bytes() > max_decode_bytes():
            raise ValueError(f"the decoded cache would take {self.decoded_bytes()} bytes, over the cap of "
                             f"{max_decode_bytes()} (KVTOOL_MAX_DECODE_BYTES)")  # fmt: skip

    def decoded_bytes(self) -> int:
        """Bytes of the decoded cache (keys, pre-RoPE keys and values, float32): what decoding allocates."""
        held = sum(hi - lo for lo, hi in (self.geometry.layer_range(i) for i in range(self.arch.num_layers)))
        return 3 * held * self.arch.num_kv_heads * self.arch.head_dim * 4

    def _expected_tensors(self) -> dict[str, tuple[str, list[int] | None]]:
        """Every tensor the file must hold: name → (dtype code, shape; ``None``: any 1-D length)."""
        geo, arch, mode = self.geometry, self.arch, self.settings.mode
        n_layers, slots, channels = arch.num_layers, 2 * arch.num_layers, arch.num_kv_heads * arch.head_dim
        out: dict[str, tuple[str, list[int] | None]] = {"input_ids": ("I32", [self.tokens])}
        raw_per_chunk = (geo.segments().raw.reshape(-1, n_layers).sum(1) * 2 * channels).tolist()
        for c in range(geo.num_chunks):
            name = f"chunk.{c:06d}"
            if mode == "lossless":
                out |= {f"{name}.zstd": ("U8", None), f"{name}.layer_bytes": ("I64", [n_layers])}
                continue
            raw = raw_per_chunk[c]
            out |= {f"{name}.words": ("U16", None), f"{name}.lanes": ("U16", None),
                    f"{name}.layer_lanes": ("I32", [n_layers]), f"{name}.raw": ("F16", [raw])}  # fmt: skip
            if mode == "adaptive":
                out |= {f"{name}.mean": ("F16", [slots, channels]), f"{name}.step": ("F16", [slots, channels]),
                        f"{name}.freq": ("I16", [slots, 2 * MAX_K + 1])}  # fmt: skip
        return out

    def _check_tensors(self, header: dict[str, Any]) -> None:
        names = set(header) - {"__metadata__"}
        if names != set(self._expected):
            missing, unexpected = sorted(set(self._expected) - names), sorted(names - set(self._expected))
            raise ValueError(f"tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
        for name, (dtype, shape) in self._expected.items():
            info = header[name]
            if info["dtype"] != dtype or (info["shape"] != shape if shape is not None else len(info["shape"]) != 1):
                raise ValueError(f"tensor {name} is {info['dtype']} {info['shape']}, the format needs {dtype} "
                                 f"{shape if shape is not None else '(n,)'}")  # fmt: skip
        # what the output is sized from must be backed by bytes in the file, within stated ratios
        geo, arch = self.geometry, self.arch
        per_token = 2 * arch.num_kv_heads * arch.head_dim * torch.empty(0, dtype=self.cache_dtype).element_size()
        seg = geo.segments()
        held = seg.coded + seg.raw
        for c, tokens in enumerate(held.reshape(-1, arch.num_layers).sum(1).tolist()):
            name = f"chunk.{c:06d}"
            if self.settings.mode == "lossless":
                if header[f"{name}.zstd"]["shape"][0] * MAX_LOSSLESS_RATIO < tokens * per_token:
                    raise ValueError(f"chunk {c}: {header[f'{name}.zstd']['shape'][0]} compressed bytes cannot hold "
                                     f"{tokens * per_token} (more than {MAX_LOSSLESS_RATIO}:1)")  # fmt: skip
            elif header[f"{name}.words"]["shape"][0] < 2 * header[f"{name}.lanes"]["shape"][0]:
                raise ValueError(f"chunk {c}: fewer words than its lanes' states")

    # -- data --------------------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes of the whole file."""
        if self.buffer is None:
            return self.path.stat().st_size
        return self.buffer.numel() if isinstance(self.buffer, torch.Tensor) else self.buffer.nbytes

    def open(self) -> Any:
        """A binary reader over the file (or the buffer)."""
        if self.buffer is None:
            return self.path.open("rb")
        view = self.buffer.numpy().data if isinstance(self.buffer, torch.Tensor) else self.buffer
        return _BufferReader(view)

    def _tensor(self, f: Any, name: str) -> torch.Tensor:
        info = self._header[name]
        begin, end = info["data_offsets"]
        f.seek(self._data_start + begin)
        data = f.read(end - begin)
        if len(data) != end - begin:
            raise ArtifactError(f"{self.path}: truncated at tensor {name}")
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        return t.view(torch_dtype(info["dtype"])).reshape(info["shape"])

    def _feed_digest(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in sorted(tensors):
            digest_tensor(self._hasher, name, self._header[name], tensors[name].contiguous().view(torch.uint8).numpy())

    def input_ids(self) -> torch.Tensor:
        with self.open() as f:
            ids = self._tensor(f, "input_ids").to(torch.int64)
        if token_digest(ids) != self.inputs["token_ids_digest"]:
            raise ArtifactError(f"{self.path}: the prefix token ids do not match their digest")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.arch.vocab_size):
            raise ArtifactError(f"{self.path}: a prefix token id is outside the model's vocabulary")
        return ids

    def read_chunk(self, chunk: int) -> dict[str, torch.Tensor]:
        """The tensors of ``chunk`` (keys without the ``chunk.NNNNNN.`` prefix), CRC-checked."""
        prefix = f"chunk.{chunk:06d}."
        names = sorted(n for n in self._expected if n.startswith(prefix))
        with self.open() as f:
            tensors = {n: self._tensor(f, n) for n in names}
        if _crc(tensors, self._crc_seed) != self.chunks[chunk]["crc32"]:
            raise ArtifactError(f"{self.path}: chunk {chunk} is corrupted (CRC-32 mismatch)")
        if not self._crc_seed and chunk == self._hashed_chunks:  # v1: names sort in chunk order, as the digest
            self._feed_digest(tensors)
            self._hashed_chunks += 1
        return {n[len(prefix) :]: t for n, t in tensors.items()}

    def check_content_digest(self) -> None:
        """Compare the content digest with every byte of the file (chunks not yet read in order are read now).
        A decoder calls this before it hands anything out: a file edited anywhere, even consistently with its
        CRCs and metadata digest, is refused."""
        if self._digest_ok:
            return
        if self._crc_seed:  # version 2: the seeded chunk CRCs and the metadata digest already bind every byte
            self._digest_ok = True
            return
        while self._hashed_chunks < len(self.chunks):
            self.read_chunk(self._hashed_chunks)
        with self.open() as f:
            self._feed_digest({"input_ids": self._tensor(f, "input_ids")})
        if "sha256:" + self._hasher.hexdigest() != self.content_digest:
            raise ArtifactError(f"{self.path}: content digest mismatch: the file is corrupted or was modified")
        self._digest_ok = True


def _int_in(x: Any, what: str, lo: int, hi: int) -> int:
    if not (is_int(x) and lo <= x <= hi):
        raise ValueError(f"{what} must be an integer in {lo}..{hi} (got {x!r})")
    return x


def _exact_keys(d: Any, what: str, keys: set[str]) -> None:
    if not isinstance(d, dict) or set(d) != keys:
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{what} must have exactly the fields {sorted(keys)} (got {got})")


def _digest_string(x: Any, what: str) -> None:
    if not (isinstance(x, str) and DIGEST_RE.fullmatch(x)):
        raise ValueError(f"{what} is not a sha256 digest")


def max_decode_bytes() -> int:
    """The cap on one file's decoded cache (``KVTOOL_MAX_DECODE_BYTES``, else :data:`MAX_DECODE_BYTES`)."""
    return env_limit("KVTOOL_MAX_DECODE_BYTES", MAX_DECODE_BYTES)


def check_model_of(kvz: KvzFile, fingerprint: dict[str, Any]) -> None:
    """Refuse to decode ``kvz`` with another model (exit 3)."""
    _check_same_model(kvz.model, fingerprint, ".kvz file")


def check_tokenizer(kvz: KvzFile, tokenizer: Any) -> None:
    """Refuse a tokenizer other than the one the prefix ids came from (exit 3): continuing the cache with it
    would feed ids that mean other words."""
    if tokenizer_digest(tokenizer) != kvz.inputs["tokenizer_digest"]:
        raise ArtifactError(f"{kvz.path}: the prefix was tokenized with another tokenizer (tokenizer digest differs)")


def recorded_model_spec(kvz: KvzFile) -> str:
    """The model id the file records, if it can name a local model (an alias, a hub id, a model folder or a
    regular ``.gguf`` file); anything else is refused before it is opened (exit 3): the id comes from the file."""
    from kvtool.models import ALIASES

    spec = kvz.model["id"]
    bad = not spec or len(spec) > 1024 or any(ch in spec for ch in "\0\n\r")
    if not bad and spec not in ALIASES:
        path = Path(spec).expanduser()
        if os.path.lexists(path):
            try:
                mode = os.stat(path).st_mode
            except OSError:
                mode = 0
            bad = not (stat.S_ISDIR(mode) or (path.suffix == ".gguf" and stat.S_ISREG(mode)))
        else:
            bad = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) is None
    if bad:
        raise ArtifactError(f"{kvz.path}: the recorded model id {spec[:80]!r} names no loadable model; pass --model")
    return spec


def check_calibration(kvz: KvzFile, calibration: Artifact | None) -> None:
    want = kvz.inputs.get("calibration")
    if want is None:
        return
    if calibration is None:
        raise ArtifactError(
            f"{kvz.path.name} was coded with calibration {want['content_digest'][:19]}…; pass it with --calibration"
        )
    if calibration.schema != CALIBRATION_SCHEMA or calibration.content_digest != want["content_digest"]:
        raise ArtifactError(
            f"{kvz.path.name} was coded with calibration {want['content_digest'][:19]}…, "
            f"not {str(calibration.content_digest)[:19]}…"
        )
    if calibration.model.get("config_digest") != kvz.model["config_digest"]:  # the .kvz's model is checked too
        raise ArtifactError(f"{kvz.path.name}: the calibration artifact is for another model (config digest differs)")


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
        coder = _coder(s, calibration, arch) if s.mode != "lossless" else None
    except UsageError as e:  # the settings come from the file here, not from a flag
        raise ArtifactError(f"{kvz.path}: {e}") from None
    coder = _on_backend(coder, backend, target)
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
    _check_same_model(kvz.model, fingerprint, ".kvz file")
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
