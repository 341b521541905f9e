"""Fixed-size records of one KV chunk as an engine's cache holds it: post-RoPE keys and values, no positions.

What a storage layer such as LMCache hands a codec is one object per chunk of tokens, ``(2, L, T, D)`` (K/V,
layers, tokens, ``kv_heads · head_dim``) in the model dtype, keys already rotated, and a key that says nothing of
the chunk's positions; some of its stores also need every object's size before they see its data (LMCache 0.5.6's
``estimate_serialized_size``, and its file store rejects a read whose size differs). So a record here:

* codes the chunk with the adaptive coder of :mod:`kvtool.codecs.coding` (per layer, K/V and channel a mean and a
  step of ``quality`` standard deviations, per slot a table of the chunk's own symbols, interleaved rANS lanes),
  applied to the **post-RoPE** keys: no positions needed, at a rate cost ``kvtool bench``'s ``lmcache-kvtool`` rows
  measure (docs/benchmarks.md, "Issue 15");
* keeps up to ``outlier_tokens`` tokens in fp16 (the attention sink, whose near-zero values a step sized for the
  other tokens would erase);
* has one size per shape, :func:`record_size` (``bits`` per element, all-in): the encoder coarsens or refines the
  step (rate control) until the chunk just fits and pads the rest with zeros;
* is self-describing and checked: magic, version, shape and dtype, a 16-byte *binding* digest of what the record
  belongs to (the storage key and model), and a CRC-32 over header and body. A record that fails any check is
  refused with ``ValueError`` (never decoded into garbage).

With the model's RoPE (``rope_at``), keys are rotated back by their position *within the chunk* first
(:data:`FLAG_RELATIVE_ROPE`): exact, and it needs no absolute position. With a projection artifact as well
(``calibration``, ``kvtool calibrate --method pca``), the chunk is coded by the calibrated coder (static tables, a
codec level chosen to fit) on pre-RoPE keys: the chunk's first position is *estimated* (the one whose rotation best
maps the calibration's pre-RoPE key means onto the chunk's), stored, and undone exactly; a wrong estimate costs
rate, never correctness (:data:`FLAG_CALIBRATED`).

Layout (little-endian): the header :data:`HEADER`; adaptive: ``mean`` and ``step`` ``(2L, D)`` fp16, ``freq``
``(2L, 2·MAX_K+1)`` int16; then ``layer_lanes`` ``(L,)`` int32, ``lanes`` ``(n_lanes,)`` uint16, the outlier
tokens' positions uint16 and K/V ``(2, L, n_out, D)`` fp16, ``words`` uint16, then zero padding up to
:func:`record_size`.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from kvtool.arch import apply_rope, invert_rope
from kvtool.artifacts import tensor_bytes
from kvtool.codecs.coding import AdaptiveCoder, CalibratedCoder, CodedChunk, on_backend
from kvtool.codecs.ecsq import MAX_K, Level, codec_levels
from kvtool.codecs.rans import PROB_SCALE

MAGIC = b"KVZR"
VERSION = 1
#: magic, version, dtype code, flags, kv, layers, tokens, hidden, outlier tokens kept, quality (f32; adaptive), codec
#: level (calibrated), first position (calibrated), lane symbols, lanes, words, binding, CRC-32
HEADER = struct.Struct("<4sHHIIIIIIfIIIII16sI")
FLAG_RELATIVE_ROPE = 1  #: keys were rotated back by their position within the chunk before coding
FLAG_CALIBRATED = 2  #: calibrated coder on pre-RoPE keys (the chunk's first position in the header)
DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.float32}
_DTYPE_CODE = {d: c for c, d in DTYPES.items()}
ALPHABET = 2 * MAX_K + 1
RopeTables = list[tuple[torch.Tensor, torch.Tensor]]  #: per layer ``(cos, sin)`` ``(1, positions, head_dim)``
RopeAt = Callable[[torch.Tensor], RopeTables]  #: positions ``(n,)`` → the model's tables at them
MAX_RATE_STEPS = 16  #: encodes tried before a chunk that will not fit is refused
MAX_REFINE = 2  #: finer steps tried once a chunk fits with room to spare
MAX_START = 1 << 20  #: the largest first position a record stores


@dataclass(frozen=True)
class RecordSettings:
    """``bits``: all-in bits per element of every record (its fixed size); ``quality``: the adaptive step in
    standard deviations tried first (coarsened where the chunk would not fit, refined where it has room);
    ``lane_symbols``: rANS lane length; ``outlier_tokens``: at most this many tokens per chunk kept in fp16 when
    some channel of theirs lies more than ``outlier_z`` standard deviations from the chunk's mean (the attention
    sink: its values are near zero where every other token's are not, so a step sized for the rest would erase it,
    and the attention it draws carries that error into every later token; space for them is reserved in every
    record); ``max_start``: calibrated records search the chunk's first position among the multiples of its
    length below this."""

    bits: float = 2.0
    quality: float = 0.5
    lane_symbols: int = 4096
    outlier_tokens: int = 2
    outlier_z: float = 9.0
    max_start: int = 131072

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int | float) and 0 < self.bits <= 64):
            raise ValueError(f"bits must be in (0, 64] (got {self.bits!r})")
        if not (isinstance(self.quality, int | float) and 0 < self.quality <= 64):
            raise ValueError(f"quality must be in (0, 64] (got {self.quality!r})")
        if not (isinstance(self.lane_symbols, int) and 64 <= self.lane_symbols <= 65533):
            raise ValueError(f"lane_symbols must be an int in 64..65533 (got {self.lane_symbols!r})")
        if not (isinstance(self.outlier_tokens, int) and 0 <= self.outlier_tokens <= 64):
            raise ValueError(f"outlier_tokens must be an int in 0..64 (got {self.outlier_tokens!r})")
        if not (isinstance(self.outlier_z, int | float) and self.outlier_z > 0):
            raise ValueError(f"outlier_z must be positive (got {self.outlier_z!r})")
        if not (isinstance(self.max_start, int) and 0 <= self.max_start <= MAX_START):
            raise ValueError(f"max_start must be an int in 0..{MAX_START} (got {self.max_start!r})")


@dataclass(frozen=True)
class RecordCalibration:
    """A projection artifact (``kvtool calibrate --method pca|svd``) as calibrated records use it: its codec levels
    (cheapest first) and what they are bound to."""

    artifact: Any
    levels: list[Level]
    digest: str
    _coders: dict[tuple[Any, ...], CalibratedCoder] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, artifact: Any) -> RecordCalibration:
        from kvtool.codecs.coding import make_coder
        from kvtool.codecs.container import CodecSettings

        make_coder(CodecSettings(mode="calibrated"), artifact, None)  # refuses an artifact without codec levels
        return cls(artifact, codec_levels(artifact.tensors), artifact.content_digest)

    def coder(self, level: int, lane: int, backend: str, device: torch.device) -> CalibratedCoder:
        """The calibrated coder of ``level`` (built once per level, lane length, backend and device: the artifact's
        transform is parsed once, not per chunk)."""
        from kvtool.codecs.coding import make_coder
        from kvtool.codecs.container import CodecSettings

        key = (level, lane, backend, str(device))
        if key not in self._coders:
            coder = make_coder(CodecSettings(mode="calibrated", level=level, lane_symbols=lane), self.artifact, None)
            self._coders[key] = on_backend(coder, backend, device)
        return self._coders[key]


    def heads(self, layers: int, hidden: int) -> int:
        """The KV heads per layer the calibration's projections take, checked against a chunk of ``layers`` layers
        of width ``hidden`` (``ValueError`` when it is for another shape)."""
        keys = self.coder(0, 4096, "torch", torch.device("cpu")).proj["k"]
        if len(keys) != layers or keys[0].heads * keys[0].head_dim != hidden:
            raise ValueError(f"the calibration is for {len(keys)} layers of {keys[0].heads} × {keys[0].head_dim} "
                             f"channels, the chunk has {layers} layers of width {hidden}")  # fmt: skip
        return keys[0].heads


def engine_layout(cache: Any) -> torch.Tensor:
    """A transformers cache's K/V ``(1, kv_heads, T, head_dim)`` per layer as LMCache's MP server lays a chunk out:
    ``(2, L, T, kv_heads · head_dim)`` (every layer must hold the same ``T`` positions)."""
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers], 1)  # (2, L, H, T, d)
    _, layers, heads, tokens, dim = kv.shape
    return kv.permute(0, 1, 3, 2, 4).reshape(2, layers, tokens, heads * dim)


def cache_layout(kv: torch.Tensor, heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of :func:`engine_layout`: per layer ``(keys, values)`` ``(1, heads, T, head_dim)`` (views)."""
    _, layers, tokens, hidden = kv.shape
    kv = kv.reshape(2, layers, tokens, heads, hidden // heads).permute(0, 1, 3, 2, 4)
    return [(kv[0, i][None], kv[1, i][None]) for i in range(layers)]


def binding(*parts: object) -> bytes:
    """The 16-byte digest a record is bound to (e.g. the storage key's fields and the model): a record read back
    under another binding is refused."""
    return hashlib.sha256(repr(parts).encode()).digest()[:16]


def _lanes(layers: int, tokens: int, hidden: int, lane: int) -> int:
    return layers * math.ceil(2 * tokens * hidden / lane)  # adaptive: every channel coded, 2·T·D symbols per layer


def _fixed_bytes(layers: int, hidden: int, outliers: int, adaptive: bool) -> int:
    """Header, side tensors (adaptive), lane index per layer and ``outliers`` fp16 tokens with their positions."""
    slots = 2 * layers
    side = 2 * (slots * hidden * 2) + slots * ALPHABET * 2 if adaptive else 0
    return HEADER.size + side + 4 * layers + outliers * (2 + 2 * layers * hidden * 2)


def record_size(shape: torch.Size | tuple[int, ...], settings: RecordSettings, calibrated: bool = False) -> int:
    """The size in bytes of every record of a ``(2, L, T, D)`` chunk (``ValueError`` when ``settings.bits`` cannot
    hold even its side information)."""
    kv, layers, tokens, hidden = _shape(shape)
    elements = kv * layers * tokens * hidden
    size = math.ceil(settings.bits * elements / 8)
    size += -size % 8
    reserve = min(settings.outlier_tokens, tokens - 1)
    lanes = layers if calibrated else _lanes(layers, tokens, hidden, settings.lane_symbols)
    need = _fixed_bytes(layers, hidden, reserve, not calibrated) + 6 * lanes  # + per lane its length, 2 state words
    if size < need:
        raise ValueError(f"{settings.bits:g} bits per element cannot hold a {tuple(shape)} chunk: it needs at least "
                         f"{8 * need / elements:.3f}")  # fmt: skip
    return size


def _shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int, int]:
    if len(shape) != 4 or shape[0] != 2 or min(shape) < 1:
        raise ValueError(f"a KV chunk must be (2, layers, tokens, hidden) with no empty axis, not {tuple(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3])


def _coder(layers: int, hidden: int, quality: float, settings: RecordSettings, backend: str,
           device: torch.device) -> AdaptiveCoder:  # fmt: skip
    coder = AdaptiveCoder(layers, hidden, quality)
    coder.lane_len = settings.lane_symbols
    coder.values_on_device = True  # decoded values stay where the coder runs (a GPU: no float32 copy via the host)
    return on_backend(coder, backend, device)


def encode_record(kv: torch.Tensor, settings: RecordSettings, out: torch.Tensor, bound_to: bytes = b"\0" * 16,
                  backend: str = "auto", rope_at: RopeAt | None = None,
                  calibration: RecordCalibration | None = None) -> int:  # fmt: skip
    """Write the record of chunk ``kv`` ``(2, L, T, D)`` (fp16, bf16 or fp32, any device) into ``out`` (a uint8
    tensor of at least :func:`record_size` bytes, on the CPU) and return its size.

    Adaptive (no ``calibration``): the step starts at ``settings.quality`` standard deviations, is coarsened until
    the coded words fit (``ValueError`` if they do not after :data:`MAX_RATE_STEPS` tries), then refined up to
    :data:`MAX_REFINE` times while they still fit. Calibrated: the richest codec level whose words fit.

    ``rope_at``: the model's RoPE tables at given positions. The chunk's tokens are consecutive positions
    ``p0 .. p0+T-1`` with ``p0`` unknown, so rotating each key back by its position *within the chunk* leaves every
    token rotated by the same ``p0``: per channel the keys are as steady as before RoPE (their large per-channel
    means return), which the adaptive coder codes far more cheaply. The calibrated coder needs pre-RoPE keys:
    ``p0`` is estimated (:func:`_chunk_start`) and stored. Bind the tables' and artifact's digests into
    ``bound_to``: the decoder needs the same."""
    kv_n, layers, tokens, hidden = _shape(kv.shape)
    if kv.dtype not in _DTYPE_CODE:
        raise ValueError(f"unsupported KV dtype {kv.dtype}")
    if calibration is not None and rope_at is None:
        raise ValueError("calibrated records need the model's RoPE tables")
    size = record_size(kv.shape, settings, calibrated=calibration is not None)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < size:
        raise ValueError(f"the output buffer holds {out.numel()} bytes; a record of this chunk needs {size}")
    if len(bound_to) != 16:
        raise ValueError("a record binding is 16 bytes")
    reserve = min(settings.outlier_tokens, tokens - 1)
    room = (size - _fixed_bytes(layers, hidden, reserve, calibration is None)) // 2  # words for lanes + payload
    keys, values = kv[0].float(), kv[1].float()
    if rope_at is not None:
        keys = _rotate(keys, rope_at(torch.arange(tokens)), invert=True)
    scores = _z_scores(keys, values)
    outliers = _outlier_tokens(scores, reserve, settings.outlier_z)
    idx = _kept_index(tokens, outliers, kv.device)
    start, level, quality = 0, 0, 0.0
    if calibration is None:
        ck, cv = keys.index_select(1, idx), values.index_select(1, idx)
        coded, quality = _code_adaptive(ck, cv, settings, room, backend)
        side = [coded.side["mean"], coded.side["step"], coded.side["freq"].to(torch.int16)]
    else:
        start = _chunk_start(keys.index_select(1, idx), calibration, rope_at, tokens, settings.max_start)  # type: ignore[arg-type]
        if start == 0 and reserve and 0 not in outliers:  # the sequence's first token: the sink, always kept
            outliers = sorted([0, *sorted(outliers, key=lambda t: -float(scores[t]))[: reserve - 1]])
            idx = _kept_index(tokens, outliers, kv.device)
        keys = _rotate(kv[0].float(), rope_at(torch.arange(start, start + tokens)), invert=True)  # type: ignore[misc]
        coded, level = _code_calibrated(keys.index_select(1, idx), values.index_select(1, idx), calibration,
                                        settings, room, backend)  # fmt: skip
        side = []
    pos = torch.tensor(outliers, dtype=torch.int32).to(torch.uint16)
    out_kv = torch.stack([keys[:, outliers], values[:, outliers]]).half() if outliers else torch.zeros(0).half()
    body = [*side, coded.layer_lanes.to(torch.int32), coded.lanes.to(torch.int32).to(torch.uint16), pos, out_kv,
            coded.words]  # fmt: skip
    raw = b"".join(tensor_bytes(t) for t in body)
    flags = (FLAG_RELATIVE_ROPE if rope_at is not None else 0) | (FLAG_CALIBRATED if calibration is not None else 0)
    head = HEADER.pack(MAGIC, VERSION, _DTYPE_CODE[kv.dtype], flags, kv_n, layers, tokens, hidden, len(outliers),
                       quality, level, start, settings.lane_symbols, coded.lanes.numel(), coded.words.numel(),
                       bound_to, 0)  # fmt: skip
    crc = zlib.crc32(raw, zlib.crc32(head))
    head = head[:-4] + struct.pack("<I", crc)
    used = len(head) + len(raw)
    if used > size:  # the coders' budgets keep this from happening; never write past the fixed size
        raise RuntimeError(f"internal error: a {used}-byte record for a {size}-byte slot")
    out[:used].copy_(torch.frombuffer(bytearray(head + raw), dtype=torch.uint8))
    out[used:size].zero_()
    return size


def _code_adaptive(keys: torch.Tensor, values: torch.Tensor, settings: RecordSettings, room: int,
                   backend: str) -> tuple[CodedChunk, float]:  # fmt: skip
    """Adaptive coding of ``(L, T', D)`` keys and values in at most ``room`` words (lane lengths + payload)."""
    layers, tokens, hidden = keys.shape
    n_lanes = _lanes(layers, tokens, hidden, settings.lane_symbols)
    budget = room - n_lanes
    elements = 2 * keys.numel()
    layers_in = [(keys[i][None], values[i][None]) for i in range(layers)]  # (1, T', D): one "head"
    # Rate control on the analysis alone (statistics, symbols, histograms: no rANS, nothing copied back): the ideal
    # code length of a step's symbols predicts its words (the lanes add their final states and a flush). Each try
    # moves the step by the bits per element it missed the budget by (rate ~ log2(σ / step)); the first step that
    # fits is refined (finer) while there is room, since the record's size is paid for either way. Only the chosen
    # analysis is entropy-coded; should the real words overshoot the prediction, the step is coarsened 2 % and
    # the search goes on.
    quality, best, finer = float(settings.quality), None, 0
    for _ in range(MAX_RATE_STEPS):
        coder = _coder(layers, hidden, quality, settings, backend, keys.device)
        batch = coder.analyse([layers_in])
        predicted = batch.code_length_bits() / 16 + 3 * n_lanes  # words: payload, 2 state words, ~1 flush word
        miss = 16 * (predicted - budget) / elements  # bits per element over (> 0) or under the budget
        if miss <= 0 and -miss >= 0.05 and finer < MAX_REFINE:
            best, finer = (quality, coder, batch), finer + 1
            quality *= 2.0 ** (0.9 * miss)
            continue
        if miss <= 0:
            best = (quality, coder, batch)
        elif best is None:
            quality *= 2.0 ** miss * 1.02
            continue
        quality, coder, batch = best  # fits by the prediction (or a finer try overshot: the last that fit)
        coded = coder.encode_analysed(batch)[0]
        if coded.words.numel() <= budget:
            return coded, float(struct.unpack("<f", struct.pack("<f", quality))[0])  # quality as stored
        quality, best, finer = quality * 1.02, None, MAX_REFINE
    raise ValueError(f"the chunk does not fit {settings.bits:g} bits per element at any step tried")


def _code_calibrated(keys: torch.Tensor, values: torch.Tensor, calibration: RecordCalibration,
                     settings: RecordSettings, room: int, backend: str) -> tuple[CodedChunk, int]:  # fmt: skip
    """Calibrated coding of pre-RoPE ``(L, T', D)`` keys and values with the richest codec level whose lanes and
    words fit in ``room`` words."""
    layers, tokens, hidden = keys.shape
    heads = calibration.heads(layers, hidden)

    def per_head(x: torch.Tensor) -> torch.Tensor:  # (T', D) -> (heads, T', head_dim), on the CPU (projections)
        return x.reshape(tokens, heads, hidden // heads).permute(1, 0, 2).cpu()

    layers_in = [(per_head(keys[i]), per_head(values[i])) for i in range(layers)]
    elements = 2 * keys.numel()
    order = sorted(range(len(calibration.levels)), key=lambda i: calibration.levels[i].expected_bits, reverse=True)
    for level in order:
        if calibration.levels[level].expected_bits * elements / 16 > room:  # a level whose rate cannot fit
            continue
        coded = calibration.coder(level, settings.lane_symbols, backend, keys.device).encode(layers_in)
        if coded.lanes.numel() + coded.words.numel() <= room:
            return coded, level
    raise ValueError(f"no codec level of the calibration fits {settings.bits:g} bits per element")


def _chunk_start(keys: torch.Tensor, calibration: RecordCalibration, rope_at: RopeAt, tokens: int,
                 max_start: int) -> int:  # fmt: skip
    """The chunk's most likely first position: keys rotated back within the chunk ``(L, T', D)`` are the pre-RoPE
    keys rotated by the (unknown) first position ``p0``; their per-channel means are the calibration's pre-RoPE
    means rotated by ``p0``. Of the multiples of ``tokens`` below ``max_start`` (where an engine's chunks start),
    the one whose rotation maps the calibration's means closest onto the chunk's (largest inner product)."""
    layers, _, hidden = keys.shape
    candidates = torch.arange(0, max(max_start, 1), tokens)
    tables = rope_at(candidates)
    coder = calibration.coder(0, 4096, "torch", torch.device("cpu"))  # its projections' means (any level's)
    score = torch.zeros(candidates.numel(), dtype=torch.float64)
    m = keys.mean(1).cpu().double()  # (L, D)
    for i, (cos, sin) in enumerate(tables):
        dim = cos.shape[-1]
        mu = coder.proj["k"][i].mean.reshape(-1).double()  # (D,): heads concatenated, as the chunk's channels
        x = mu.reshape(1, hidden // dim, 1, dim).expand(1, hidden // dim, candidates.numel(), dim)
        rotated = apply_rope(x, cos.double(), sin.double())[0]  # (heads, candidates, head_dim)
        score += (rotated * m[i].reshape(hidden // dim, 1, dim)).sum((0, 2))
    return int(candidates[int(torch.argmax(score))])


def _outlier_tokens(scores: torch.Tensor, most: int, z: float) -> list[int]:
    """Up to ``most`` tokens (ascending) whose :func:`_z_scores` exceed ``z``, the farthest first."""
    if most < 1:
        return []
    top = torch.topk(scores, min(most, scores.numel())).indices.cpu()
    return sorted(int(t) for t in top if float(scores[t]) > z)


def _z_scores(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per token of ``(L, T, D)`` keys and values: its largest distance from a channel's mean, in that channel's
    standard deviations (over the chunk's tokens)."""
    score = torch.zeros(keys.shape[1], dtype=torch.float32, device=keys.device)
    for x in (keys, values):
        mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp_min(1e-12)
        score = torch.maximum(score, ((x - mu).abs() / sd).amax((0, 2)))
    return score


def _kept_index(tokens: int, outliers: list[int], device: torch.device) -> torch.Tensor:
    """The positions ``0 .. tokens-1`` that are coded (not kept as fp16 outliers), ascending, on ``device``."""
    kept = torch.ones(tokens, dtype=torch.bool)
    kept[outliers] = False
    return torch.nonzero(kept).reshape(-1).to(device)


class RecordHeader(NamedTuple):
    magic: bytes
    version: int
    dtype_code: int
    flags: int
    kv: int
    layers: int
    tokens: int
    hidden: int
    outliers: int
    quality: float
    level: int
    start: int
    lane_symbols: int
    lanes: int
    words: int
    binding: bytes
    crc32: int


def read_header(buf: torch.Tensor) -> tuple[RecordHeader, int]:
    """The header fields of the record in ``buf`` (uint8, CPU) and the record's used length (``ValueError`` on a
    malformed header)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < HEADER.size:
        raise ValueError("not a kvtool chunk record: too short")
    h = RecordHeader(*HEADER.unpack(bytes(buf[: HEADER.size].tolist())))
    if h.magic != MAGIC:
        raise ValueError("not a kvtool chunk record (bad magic)")
    if h.version != VERSION:
        raise ValueError(f"kvtool chunk record version {h.version}; this kvtool reads version {VERSION}")
    calibrated = bool(h.flags & FLAG_CALIBRATED)
    malformed = (
        h.dtype_code not in DTYPES or h.flags & ~(FLAG_RELATIVE_ROPE | FLAG_CALIBRATED) or h.kv != 2
        or min(h.layers, h.tokens, h.hidden) < 1 or not 64 <= h.lane_symbols <= 65533 or h.outliers >= h.tokens
        or h.outliers > 64 or h.start > MAX_START or (calibrated and not h.flags & FLAG_RELATIVE_ROPE)
        or (not calibrated and not (h.quality > 0 and math.isfinite(h.quality)))
        or (not calibrated and h.lanes != _lanes(h.layers, h.tokens - h.outliers, h.hidden, h.lane_symbols))
    )  # fmt: skip
    if malformed:
        raise ValueError("kvtool chunk record: malformed header")
    used = _fixed_bytes(h.layers, h.hidden, h.outliers, not calibrated) + 2 * (h.lanes + h.words)
    if used > buf.numel() or h.words < 2 * h.lanes:
        raise ValueError(f"kvtool chunk record: {used} bytes claimed, {buf.numel()} present")
    return h, used


def decode_record(buf: torch.Tensor, out: torch.Tensor, bound_to: bytes = b"\0" * 16, backend: str = "auto",
                  device: torch.device | None = None, rope_at: RopeAt | None = None,
                  calibration: RecordCalibration | None = None) -> torch.Tensor:  # fmt: skip
    """Decode the record in ``buf`` (uint8, CPU; may be longer than the record) into ``out`` ``(2, L, T, D)`` (its
    shape and dtype must be the record's; any device) and return ``out``; the decoding runs on ``device``
    (default: ``out``'s). ``rope_at`` and ``calibration``: those the record was coded with (:func:`encode_record`),
    required when it was. ``ValueError`` for anything that is not a valid record of this shape, dtype and
    binding."""
    h, used = read_header(buf)
    layers, tokens, hidden, n_out = h.layers, h.tokens, h.hidden, h.outliers
    if tuple(out.shape) != (h.kv, layers, tokens, hidden) or out.dtype != DTYPES[h.dtype_code]:
        raise ValueError(f"the record holds a {(h.kv, layers, tokens, hidden)} {DTYPES[h.dtype_code]} chunk; the "
                         f"destination is {tuple(out.shape)} {out.dtype}")  # fmt: skip
    if h.binding != bound_to:
        raise ValueError("the record belongs to another key or model")
    if bool(h.flags & FLAG_RELATIVE_ROPE) != (rope_at is not None):
        coded_with = "with" if h.flags & FLAG_RELATIVE_ROPE else "without"
        raise ValueError(f"the record was coded {coded_with} the model's RoPE tables; read it the same way")
    calibrated = bool(h.flags & FLAG_CALIBRATED)
    if calibrated != (calibration is not None):
        raise ValueError("the record was coded " + ("with" if calibrated else "without") + " a calibration artifact")
    data = bytes(buf[:used].numpy().tobytes())
    zeroed = data[: HEADER.size - 4] + b"\0\0\0\0"
    if zlib.crc32(data[HEADER.size :], zlib.crc32(zeroed)) != h.crc32:
        raise ValueError("kvtool chunk record: CRC mismatch (damaged)")
    slots, at = 2 * layers, HEADER.size

    def take(n: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal at
        size = n * torch.empty(0, dtype=dtype).element_size()
        t = torch.frombuffer(bytearray(data[at : at + size]), dtype=dtype) if size else torch.zeros(0, dtype=dtype)
        at += size
        return t

    side: dict[str, torch.Tensor] = {}
    if not calibrated:
        side["mean"] = take(slots * hidden, torch.float16).reshape(slots, hidden)
        side["step"] = take(slots * hidden, torch.float16).reshape(slots, hidden)
        side["freq"] = take(slots * ALPHABET, torch.int16).reshape(slots, ALPHABET)
        step = side["step"].float()
        if not bool(torch.isfinite(step).all()) or bool((step <= 0).any()):
            raise ValueError("kvtool chunk record: invalid steps")
        freq = side["freq"]
        if bool((freq.to(torch.int64).sum(1) != PROB_SCALE).any()) or bool((freq < 1).any()):
            raise ValueError("kvtool chunk record: invalid frequency tables")
    layer_lanes = take(layers, torch.int32)
    lanes = take(h.lanes, torch.uint16).to(torch.int64)
    pos = take(n_out, torch.uint16).to(torch.int64)
    out_kv = take(n_out * 2 * layers * hidden, torch.float16).reshape(2, layers, n_out, hidden)
    words = take(h.words, torch.uint16).to(torch.int32)
    if n_out and (int(pos[-1]) >= tokens or bool((pos[1:] <= pos[:-1]).any())):
        raise ValueError("kvtool chunk record: outlier positions out of order or range")
    if int(lanes.sum()) != h.words or bool((lanes < 2).any()):
        raise ValueError("kvtool chunk record: lane lengths do not match the words")
    chunk = CodedChunk(words, lanes, layer_lanes, side)
    work = device or out.device
    n = tokens - n_out
    if calibrated:
        if h.level >= len(calibration.levels):  # type: ignore[union-attr]
            raise ValueError(f"kvtool chunk record: codec level {h.level} of a calibration with "
                             f"{len(calibration.levels)}")  # type: ignore[union-attr]  # fmt: skip
        coder = calibration.coder(h.level, h.lane_symbols, backend, work)  # type: ignore[union-attr]
        heads = calibration.heads(layers, hidden)  # type: ignore[union-attr]
        decoded = [tuple(x.permute(1, 0, 2).reshape(n, hidden) for x in pair)
                   for pair in coder.decode(chunk, [n] * layers, heads, hidden // heads)]  # fmt: skip
    else:
        coder = _coder(layers, hidden, h.quality, RecordSettings(lane_symbols=h.lane_symbols), backend, work)
        decoded = [(k[0], v[0]) for k, v in coder.decode(chunk, [n] * layers, 1, hidden)]
    kv = torch.empty(2, layers, tokens, hidden, dtype=torch.float32, device=work)
    kept = torch.ones(tokens, dtype=torch.bool)
    kept[pos] = False
    kept = kept.to(work)
    kv[0][:, kept] = torch.stack([k for k, _ in decoded]).to(work)
    kv[1][:, kept] = torch.stack([v for _, v in decoded]).to(work)
    if n_out:
        kv[:, :, pos.to(work)] = out_kv.to(work).float()
    if rope_at is not None:
        kv[0] = _rotate(kv[0], rope_at(torch.arange(h.start, h.start + tokens)), invert=False)
    out.copy_(kv.to(out.dtype))  # narrowed where it was decoded: a GPU → host copy moves half the bytes, no host cast
    return out


def _rotate(keys: torch.Tensor, rope: RopeTables, invert: bool) -> torch.Tensor:
    """Keys ``(L, T, D)`` float32 rotated per layer by ``rope``'s ``T`` positions (``invert``: backwards). Layers
    that share one table (most models: all of them) are rotated together, elementwise, so the values are the same
    as layer by layer."""
    layers, tokens, hidden = keys.shape
    if len(rope) != layers:
        raise ValueError(f"RoPE tables for {len(rope)} layers, the chunk has {layers}")
    out = torch.empty_like(keys)
    groups: dict[int, list[int]] = {}
    for i, (cos, _) in enumerate(rope):
        groups.setdefault(id(cos), []).append(i)
    for members in groups.values():
        cos, sin = rope[members[0]]
        dim = cos.shape[-1]
        if hidden % dim or cos.shape[-2] != tokens:
            raise ValueError(f"layer {members[0]}: RoPE tables of head_dim {dim} for {cos.shape[-2]} positions do not "
                             f"fit a {tokens}-token chunk of width {hidden}")  # fmt: skip
        idx = torch.tensor(members, device=keys.device)
        x = keys.index_select(0, idx).reshape(len(members), tokens, hidden // dim, dim).permute(0, 2, 1, 3)
        c, s = cos.to(keys.device), sin.to(keys.device)  # (1, T, head_dim): broadcast over layers and heads
        y = invert_rope(x, c, s) if invert else apply_rope(x, c, s)  # (layers, heads, T, head_dim)
        out.index_copy_(0, idx, y.permute(0, 2, 1, 3).reshape(len(members), tokens, hidden))
    return out
