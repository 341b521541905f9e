"""Fixed-size records of one KV chunk as an engine's cache holds it: post-RoPE keys and values, no positions.

What a storage layer such as LMCache hands a codec is one object per chunk of tokens, ``(2, L, T, D)`` (K/V,
layers, tokens, ``kv_heads · head_dim``) in the model dtype, keys already rotated, and a key that says nothing of
the chunk's positions; some of its stores also need every object's size before they see its data (LMCache 0.5.6's
``estimate_serialized_size``, and its file store rejects a read whose size differs). So a record here:

* codes the chunk with the adaptive coder of :mod:`kvtool.codecs.coding` (per layer, K/V and channel a mean and a
  step of ``quality`` standard deviations, per slot a table of the chunk's own symbols, interleaved rANS lanes),
  applied to the **post-RoPE** keys as they are: no positions needed, at a rate cost the bench measures
  (``benchmarks/lmcache_serde.py``);
* has one size per shape, :func:`record_size` (``bits`` per element, all-in): the encoder coarsens the step
  (rate control) until the chunk fits and pads the rest with zeros;
* is self-describing and checked: magic, version, shape and dtype, a 16-byte *binding* digest of what the record
  belongs to (the storage key and model), and a CRC-32 over header and body. A record that fails any check is
  refused with ``ValueError`` (never decoded into garbage).

With the model's RoPE tables (``rope=``), keys are rotated back by their position *within the chunk* first
(:data:`FLAG_RELATIVE_ROPE`): exact, and it needs no absolute position.

Layout (little-endian): the header :data:`HEADER`, then ``mean`` and ``step`` ``(2L, D)`` fp16, ``freq``
``(2L, 2·MAX_K+1)`` int16, ``layer_lanes`` ``(L,)`` int32, ``lanes`` ``(n_lanes,)`` uint16, ``words`` uint16, then
zero padding up to :func:`record_size`.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvtool.arch import apply_rope, invert_rope
from kvtool.codecs.coding import AdaptiveCoder, CodedChunk, on_backend
from kvtool.codecs.ecsq import MAX_K
from kvtool.codecs.rans import PROB_SCALE

MAGIC = b"KVZR"
VERSION = 1
#: magic, version, dtype code, flags, kv, layers, tokens, hidden, outlier tokens kept, quality (f32), lane symbols,
#: lanes, words, binding, CRC-32
HEADER = struct.Struct("<4sHHIIIIIIfIII16sI")
FLAG_RELATIVE_ROPE = 1  #: keys were rotated back by their position within the chunk before coding
DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.float32}
_DTYPE_CODE = {d: c for c, d in DTYPES.items()}
ALPHABET = 2 * MAX_K + 1
RopeTables = list[tuple[torch.Tensor, torch.Tensor]]  #: per layer ``(cos, sin)`` ``(1, positions, head_dim)``
MAX_RATE_STEPS = 16  #: encodes tried before a chunk that will not fit is refused
MAX_REFINE = 2  #: finer steps tried once a chunk fits with room to spare


@dataclass(frozen=True)
class RecordSettings:
    """``bits``: all-in bits per element of every record (its fixed size); ``quality``: the adaptive step in
    standard deviations tried first (coarsened where the chunk would not fit, refined where it has room);
    ``lane_symbols``: rANS lane length; ``outlier_tokens``: at most this many tokens per chunk kept in fp16 when
    some channel of theirs lies more than ``outlier_z`` standard deviations from the chunk's mean (the attention
    sink: its values are near zero where every other token's are not, so a step sized for the rest would erase it,
    and the attention it draws carries that error into every later token; space for them is reserved in every
    record)."""

    bits: float = 2.0
    quality: float = 0.5
    lane_symbols: int = 4096
    outlier_tokens: int = 2
    outlier_z: float = 9.0

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


def binding(*parts: object) -> bytes:
    """The 16-byte digest a record is bound to (e.g. the storage key's fields and the model): a record read back
    under another binding is refused."""
    return hashlib.sha256(repr(parts).encode()).digest()[:16]


def _lanes(layers: int, tokens: int, hidden: int, lane: int) -> int:
    return layers * math.ceil(2 * tokens * hidden / lane)  # every channel coded: 2·T·D symbols per layer


def _fixed_bytes(layers: int, hidden: int, n_lanes: int, outliers: int) -> int:
    """Header, side tensors, lane index and ``outliers`` fp16 tokens with their positions."""
    slots = 2 * layers
    side = 2 * (slots * hidden * 2) + slots * ALPHABET * 2 + 4 * layers + 2 * n_lanes
    return HEADER.size + side + outliers * (2 + 2 * layers * hidden * 2)


def record_size(shape: torch.Size | tuple[int, ...], settings: RecordSettings) -> int:
    """The size in bytes of every record of a ``(2, L, T, D)`` chunk (``ValueError`` when ``settings.bits`` cannot
    hold even its side information)."""
    kv, layers, tokens, hidden = _shape(shape)
    elements = kv * layers * tokens * hidden
    n_lanes = _lanes(layers, tokens, hidden, settings.lane_symbols)
    size = math.ceil(settings.bits * elements / 8)
    size += -size % 8
    reserve = min(settings.outlier_tokens, tokens - 1)
    need = _fixed_bytes(layers, hidden, n_lanes, reserve) + 4 * n_lanes  # side information + 2 state words per lane
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
                  backend: str = "auto", rope: RopeTables | None = None) -> int:  # fmt: skip
    """Write the record of chunk ``kv`` ``(2, L, T, D)`` (fp16, bf16 or fp32, any device) into ``out`` (a uint8
    tensor of at least :func:`record_size` bytes, on the CPU) and return its size. The step starts at
    ``settings.quality`` standard deviations, is coarsened until the coded words fit (``ValueError`` if they do
    not after :data:`MAX_RATE_STEPS` tries), then refined up to :data:`MAX_REFINE` times while they still fit.

    ``rope``: per layer the model's ``(cos, sin)`` for positions ``0 .. T-1`` (``(1, ≥T, head_dim)``). The chunk's
    tokens are consecutive positions ``p0 .. p0+T-1`` with ``p0`` unknown, so rotating each key back by its
    position *within the chunk* leaves every token rotated by the same ``p0``: per channel the keys are as steady
    as before RoPE (their large per-channel means return), which the adaptive coder codes far more cheaply. The
    decoder rotates forward with the same tables (bind their digest into ``bound_to``)."""
    kv_n, layers, tokens, hidden = _shape(kv.shape)
    if kv.dtype not in _DTYPE_CODE:
        raise ValueError(f"unsupported KV dtype {kv.dtype}")
    size = record_size(kv.shape, settings)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < size:
        raise ValueError(f"the output buffer holds {out.numel()} bytes; a record of this chunk needs {size}")
    if len(bound_to) != 16:
        raise ValueError("a record binding is 16 bytes")
    reserve = min(settings.outlier_tokens, tokens - 1)
    # the words' budget is what the fullest record leaves: all reserved outliers, the lanes of every token
    budget = (size - _fixed_bytes(layers, hidden, _lanes(layers, tokens, hidden, settings.lane_symbols), reserve)) // 2
    keys = kv[0].float()
    if rope is not None:
        keys = _rotate(keys, rope, invert=True)
    values = kv[1].float()
    outliers = _outlier_tokens(keys, values, reserve, settings.outlier_z)
    kept = torch.ones(tokens, dtype=torch.bool)
    kept[outliers] = False
    idx = torch.nonzero(kept).reshape(-1).to(kv.device)
    coded_tokens = tokens - len(outliers)
    n_lanes = _lanes(layers, coded_tokens, hidden, settings.lane_symbols)
    elements = 2 * layers * coded_tokens * hidden
    ck, cv = keys.index_select(1, idx), values.index_select(1, idx)
    layers_in = [(ck[i][None], cv[i][None]) for i in range(layers)]  # (1, T', D): one "head"
    # Rate control on the analysis alone (statistics, symbols, histograms: no rANS, nothing copied back): the ideal
    # code length of a step's symbols predicts its words (the lanes add their final states and a flush). Each try
    # moves the step by the bits per element it missed the budget by (rate ~ log2(σ / step)); the first step that
    # fits is refined (finer) while there is room, since the record's size is paid for either way. Only the chosen
    # analysis is entropy-coded; should the real words overshoot the prediction, the step is coarsened 2 % and
    # the search goes on.
    quality, best, finer = float(settings.quality), None, 0
    coded = None
    for _ in range(MAX_RATE_STEPS):
        coder = _coder(layers, hidden, quality, settings, backend, kv.device)
        batch = coder.analyse([layers_in])
        predicted = batch.code_length_bits() / 16 + 3 * n_lanes  # words: payload, 2 state words, ~1 flush word
        miss = 16 * (predicted - budget) / elements  # bits per element over (> 0) or under the budget
        if miss <= 0:
            best = (quality, coder, batch)
            if -miss < 0.05 or finer == MAX_REFINE:
                quality, coder, batch = best
                coded = coder.encode_analysed(batch)[0]
                if coded.words.numel() <= budget:
                    break
                quality, best, finer, coded = quality * 1.02, None, MAX_REFINE, None
                continue
            finer += 1
            quality *= 2.0 ** (0.9 * miss)
        elif best is not None:  # a finer try overshot: code the last that fit
            quality, coder, batch = best
            coded = coder.encode_analysed(batch)[0]
            if coded.words.numel() <= budget:
                break
            quality, best, finer, coded = quality * 1.02, None, MAX_REFINE, None
        else:
            quality *= 2.0 ** miss * 1.02
    if coded is None:
        raise ValueError(f"the chunk does not fit {settings.bits:g} bits per element at any step tried")
    quality = float(struct.unpack("<f", struct.pack("<f", quality))[0])  # as stored
    pos = torch.tensor(outliers, dtype=torch.int32).to(torch.uint16)
    out_kv = torch.stack([keys[:, outliers], values[:, outliers]]).half() if outliers else torch.zeros(0).half()
    body = [coded.side["mean"], coded.side["step"], coded.side["freq"].to(torch.int16),
            coded.layer_lanes.to(torch.int32), coded.lanes.to(torch.int32).to(torch.uint16), pos, out_kv,
            coded.words]  # fmt: skip
    raw = b"".join(_le_bytes(t) for t in body)
    flags = FLAG_RELATIVE_ROPE if rope is not None else 0
    head = HEADER.pack(MAGIC, VERSION, _DTYPE_CODE[kv.dtype], flags, kv_n, layers, tokens, hidden, len(outliers),
                       quality, settings.lane_symbols, n_lanes, coded.words.numel(), bound_to, 0)  # fmt: skip
    crc = zlib.crc32(raw, zlib.crc32(head))
    head = head[:-4] + struct.pack("<I", crc)
    used = len(head) + len(raw)
    out[:used].copy_(torch.frombuffer(bytearray(head + raw), dtype=torch.uint8))
    out[used:size].zero_()
    return size


def _outlier_tokens(keys: torch.Tensor, values: torch.Tensor, most: int, z: float) -> list[int]:
    """Up to ``most`` tokens (ascending) of ``keys``/``values`` ``(L, T, D)`` with a channel more than ``z``
    standard deviations (over the chunk's tokens) from its mean, the farthest first."""
    if most < 1:
        return []
    score = torch.zeros(keys.shape[1], dtype=torch.float32, device=keys.device)
    for x in (keys, values):
        mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp_min(1e-12)
        score = torch.maximum(score, ((x - mu).abs() / sd).amax((0, 2)))
    top = torch.topk(score, min(most, score.numel())).indices.cpu()
    return sorted(int(t) for t in top if float(score[t]) > z)


def _le_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


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
    fields = RecordHeader(*HEADER.unpack(bytes(buf[: HEADER.size].tolist())))
    magic, version, dtype_code, flags, kv_n, layers, tokens, hidden, n_out, quality, lane, n_lanes = fields[:12]
    n_words = fields.words
    if magic != MAGIC:
        raise ValueError("not a kvtool chunk record (bad magic)")
    if version != VERSION:
        raise ValueError(f"kvtool chunk record version {version}; this kvtool reads version {VERSION}")
    if dtype_code not in DTYPES or flags & ~FLAG_RELATIVE_ROPE or kv_n != 2 or min(layers, tokens, hidden) < 1 \
            or not 64 <= lane <= 65533:
        raise ValueError("kvtool chunk record: malformed header")
    if n_out >= tokens or n_out > 64:
        raise ValueError("kvtool chunk record: malformed header")
    if not (quality > 0 and math.isfinite(quality)) or n_lanes != _lanes(layers, tokens - n_out, hidden, lane):
        raise ValueError("kvtool chunk record: malformed header")
    used = _fixed_bytes(layers, hidden, n_lanes, n_out) + 2 * n_words
    if used > buf.numel() or n_words < 2 * n_lanes:
        raise ValueError(f"kvtool chunk record: {used} bytes claimed, {buf.numel()} present")
    return fields, used


def decode_record(buf: torch.Tensor, out: torch.Tensor, bound_to: bytes = b"\0" * 16, backend: str = "auto",
                  device: torch.device | None = None, rope: RopeTables | None = None) -> torch.Tensor:  # fmt: skip
    """Decode the record in ``buf`` (uint8, CPU; may be longer than the record) into ``out`` ``(2, L, T, D)`` (its
    shape and dtype must be the record's; any device) and return ``out``; the decoding runs on ``device``
    (default: ``out``'s). ``rope``: the tables the record was coded with (:func:`encode_record`), required when it
    was. ``ValueError`` for anything that is not a valid record of this shape, dtype and binding."""
    fields, used = read_header(buf)
    _, _, dtype_code, flags, kv_n, layers, tokens, hidden, n_out, quality, lane, n_lanes, n_words, bound, crc = fields
    if tuple(out.shape) != (kv_n, layers, tokens, hidden) or out.dtype != DTYPES[dtype_code]:
        raise ValueError(f"the record holds a {(kv_n, layers, tokens, hidden)} {DTYPES[dtype_code]} chunk; the "
                         f"destination is {tuple(out.shape)} {out.dtype}")  # fmt: skip
    if bound != bound_to:
        raise ValueError("the record belongs to another key or model")
    if bool(flags & FLAG_RELATIVE_ROPE) != (rope is not None):
        coded_with = "with" if flags & FLAG_RELATIVE_ROPE else "without"
        raise ValueError(f"the record was coded {coded_with} the model's RoPE tables; read it the same way")
    data = bytes(buf[:used].numpy().tobytes())
    zeroed = data[: HEADER.size - 4] + b"\0\0\0\0"
    if zlib.crc32(data[HEADER.size :], zlib.crc32(zeroed)) != crc:
        raise ValueError("kvtool chunk record: CRC mismatch (damaged)")
    slots, at = 2 * layers, HEADER.size

    def take(n: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal at
        size = n * torch.empty(0, dtype=dtype).element_size()
        t = torch.frombuffer(bytearray(data[at : at + size]), dtype=dtype) if size else torch.zeros(0, dtype=dtype)
        at += size
        return t

    mean = take(slots * hidden, torch.float16).reshape(slots, hidden)
    step = take(slots * hidden, torch.float16).reshape(slots, hidden)
    freq = take(slots * ALPHABET, torch.int16).reshape(slots, ALPHABET)
    layer_lanes = take(layers, torch.int32)
    lanes = take(n_lanes, torch.uint16).to(torch.int64)
    pos = take(n_out, torch.uint16).to(torch.int64)
    out_kv = take(n_out * 2 * layers * hidden, torch.float16).reshape(2, layers, n_out, hidden)
    words = take(n_words, torch.uint16).to(torch.int32)
    if n_out and (int(pos[-1]) >= tokens or bool((pos[1:] <= pos[:-1]).any())):
        raise ValueError("kvtool chunk record: outlier positions out of order or range")
    if int(lanes.sum()) != n_words or bool((lanes < 2).any()):
        raise ValueError("kvtool chunk record: lane lengths do not match the words")
    if not bool(torch.isfinite(step.float()).all()) or bool((step.float() <= 0).any()):
        raise ValueError("kvtool chunk record: invalid steps")
    if bool((freq.to(torch.int64).sum(1) != PROB_SCALE).any()) or bool((freq < 1).any()):
        raise ValueError("kvtool chunk record: invalid frequency tables")
    coder = _coder(layers, hidden, quality, RecordSettings(lane_symbols=lane), backend, device or out.device)
    chunk = CodedChunk(words, lanes, layer_lanes, {"mean": mean, "step": step, "freq": freq})
    decoded = coder.decode(chunk, [tokens - n_out] * layers, 1, hidden)
    work = decoded[0][0].device
    kept = torch.ones(tokens, dtype=torch.bool)
    kept[pos] = False
    kv = torch.empty(2, layers, tokens, hidden, dtype=torch.float32, device=work)
    kv[0][:, kept.to(work)] = torch.stack([k[0] for k, _ in decoded])
    kv[1][:, kept.to(work)] = torch.stack([v[0] for _, v in decoded])
    if n_out:
        kv[:, :, pos.to(work)] = out_kv.to(work).float()
    if rope is not None:
        kv[0] = _rotate(kv[0], rope, invert=False)
    out.copy_(kv)
    return out


def _rotate(keys: torch.Tensor, rope: RopeTables, invert: bool) -> torch.Tensor:
    """Keys ``(L, T, D)`` float32 rotated per layer by ``rope``'s positions ``0 .. T-1`` (``invert``: backwards)."""
    layers, tokens, hidden = keys.shape
    if len(rope) != layers:
        raise ValueError(f"RoPE tables for {len(rope)} layers, the chunk has {layers}")
    out = torch.empty_like(keys)
    for i, (cos, sin) in enumerate(rope):
        dim = cos.shape[-1]
        if hidden % dim or cos.shape[-2] < tokens:
            raise ValueError(f"layer {i}: RoPE tables of head_dim {dim} for {cos.shape[-2]} positions do not fit a "
                             f"{tokens}-token chunk of width {hidden}")  # fmt: skip
        x = keys[i].reshape(tokens, hidden // dim, dim).permute(1, 0, 2)[None]  # (1, heads, T, head_dim)
        c, s = cos[:, :tokens].to(keys.device), sin[:, :tokens].to(keys.device)
        y = invert_rope(x, c, s) if invert else apply_rope(x, c, s)
        out[i] = y[0].permute(1, 0, 2).reshape(tokens, hidden)
    return out
