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

import torch

from kvtool.codecs.coding import AdaptiveCoder, CodedChunk, on_backend
from kvtool.codecs.ecsq import MAX_K
from kvtool.codecs.rans import PROB_SCALE

MAGIC = b"KVZR"
VERSION = 1
#: magic, version, dtype code, kv, layers, tokens, hidden, quality (f32), lane symbols, lanes, words, binding, CRC-32
HEADER = struct.Struct("<4sHHIIIIfIII16sI")
DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.float32}
_DTYPE_CODE = {d: c for c, d in DTYPES.items()}
ALPHABET = 2 * MAX_K + 1
MAX_RATE_STEPS = 16  #: encodes tried before a chunk that will not fit is refused
MAX_REFINE = 2  #: finer steps tried once a chunk fits with room to spare


@dataclass(frozen=True)
class RecordSettings:
    """``bits``: all-in bits per element of every record (its fixed size); ``quality``: the adaptive step in
    standard deviations tried first (coarsened only where the chunk would not fit); ``lane_symbols``: rANS lane
    length."""

    bits: float = 2.0
    quality: float = 0.5
    lane_symbols: int = 4096

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int | float) and 0 < self.bits <= 64):
            raise ValueError(f"bits must be in (0, 64] (got {self.bits!r})")
        if not (isinstance(self.quality, int | float) and 0 < self.quality <= 64):
            raise ValueError(f"quality must be in (0, 64] (got {self.quality!r})")
        if not (isinstance(self.lane_symbols, int) and 64 <= self.lane_symbols <= 65533):
            raise ValueError(f"lane_symbols must be an int in 64..65533 (got {self.lane_symbols!r})")


def binding(*parts: object) -> bytes:
    """The 16-byte digest a record is bound to (e.g. the storage key's fields and the model): a record read back
    under another binding is refused."""
    return hashlib.sha256(repr(parts).encode()).digest()[:16]


def _lanes(layers: int, tokens: int, hidden: int, lane: int) -> int:
    return layers * math.ceil(2 * tokens * hidden / lane)  # every channel coded: 2·T·D symbols per layer


def _fixed_bytes(layers: int, hidden: int, n_lanes: int) -> int:
    slots = 2 * layers
    return HEADER.size + 2 * (slots * hidden * 2) + slots * ALPHABET * 2 + 4 * layers + 2 * n_lanes


def record_size(shape: torch.Size | tuple[int, ...], settings: RecordSettings) -> int:
    """The size in bytes of every record of a ``(2, L, T, D)`` chunk (``ValueError`` when ``settings.bits`` cannot
    hold even its side information)."""
    kv, layers, tokens, hidden = _shape(shape)
    elements = kv * layers * tokens * hidden
    n_lanes = _lanes(layers, tokens, hidden, settings.lane_symbols)
    size = math.ceil(settings.bits * elements / 8)
    size += -size % 8
    need = _fixed_bytes(layers, hidden, n_lanes) + 4 * n_lanes  # side information + two state words per lane
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
    return on_backend(coder, backend, device)


def encode_record(kv: torch.Tensor, settings: RecordSettings, out: torch.Tensor, bound_to: bytes = b"\0" * 16,
                  backend: str = "auto") -> int:  # fmt: skip
    """Write the record of chunk ``kv`` ``(2, L, T, D)`` (fp16, bf16 or fp32, any device) into ``out`` (a uint8
    tensor of at least :func:`record_size` bytes, on the CPU) and return its size. The step starts at
    ``settings.quality`` standard deviations, is coarsened until the coded words fit (``ValueError`` if they do
    not after :data:`MAX_RATE_STEPS` tries), then refined up to :data:`MAX_REFINE` times while they still fit."""
    kv_n, layers, tokens, hidden = _shape(kv.shape)
    if kv.dtype not in _DTYPE_CODE:
        raise ValueError(f"unsupported KV dtype {kv.dtype}")
    size = record_size(kv.shape, settings)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < size:
        raise ValueError(f"the output buffer holds {out.numel()} bytes; a record of this chunk needs {size}")
    if len(bound_to) != 16:
        raise ValueError("a record binding is 16 bytes")
    n_lanes = _lanes(layers, tokens, hidden, settings.lane_symbols)
    budget = (size - _fixed_bytes(layers, hidden, n_lanes)) // 2  # words
    elements = kv.numel()
    layers_in = [(kv[0, i].float()[None], kv[1, i].float()[None]) for i in range(layers)]  # (1, T, D): one "head"
    # rate ~ log2(σ / step): each try moves the step by the bits per element it missed the budget by. The first
    # step that fits is refined (finer) while the budget has room: the record's size is paid for either way.
    quality, best, finer = float(settings.quality), None, 0
    for _ in range(MAX_RATE_STEPS):
        coded = _coder(layers, hidden, quality, settings, backend, kv.device).encode(layers_in)
        miss = 16 * (coded.words.numel() - budget) / elements  # bits per element over (> 0) or under the budget
        if miss <= 0:
            best = (quality, coded)
            if -miss < 0.05 or finer == MAX_REFINE:
                break
            finer += 1
            quality *= 2.0 ** (0.9 * miss)
        elif best is not None:  # a finer try overshot: keep the last that fit
            break
        else:
            quality *= 2.0 ** miss * 1.05
    if best is None:
        raise ValueError(f"the chunk does not fit {settings.bits:g} bits per element at any step tried")
    quality, coded = best
    quality = float(struct.unpack("<f", struct.pack("<f", quality))[0])  # as stored
    body = [coded.side["mean"], coded.side["step"], coded.side["freq"].to(torch.int16),
            coded.layer_lanes.to(torch.int32), coded.lanes.to(torch.int32).to(torch.uint16), coded.words]  # fmt: skip
    raw = b"".join(_le_bytes(t) for t in body)
    head = HEADER.pack(MAGIC, VERSION, _DTYPE_CODE[kv.dtype], kv_n, layers, tokens, hidden, quality,
                       settings.lane_symbols, n_lanes, coded.words.numel(), bound_to, 0)  # fmt: skip
    crc = zlib.crc32(raw, zlib.crc32(head))
    head = head[:-4] + struct.pack("<I", crc)
    used = len(head) + len(raw)
    out[:used].copy_(torch.frombuffer(bytearray(head + raw), dtype=torch.uint8))
    out[used:size].zero_()
    return size


def _le_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_header(buf: torch.Tensor) -> tuple[tuple, int]:
    """The header fields of the record in ``buf`` (uint8, CPU) and the record's used length (``ValueError`` on a
    malformed header)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < HEADER.size:
        raise ValueError("not a kvtool chunk record: too short")
    fields = HEADER.unpack(bytes(buf[: HEADER.size].tolist()))
    magic, version, dtype_code, kv_n, layers, tokens, hidden, quality, lane, n_lanes, n_words, _, _ = fields
    if magic != MAGIC:
        raise ValueError("not a kvtool chunk record (bad magic)")
    if version != VERSION:
        raise ValueError(f"kvtool chunk record version {version}; this kvtool reads version {VERSION}")
    if dtype_code not in DTYPES or kv_n != 2 or min(layers, tokens, hidden) < 1 or not 64 <= lane <= 65533:
        raise ValueError("kvtool chunk record: malformed header")
    if not (quality > 0 and math.isfinite(quality)) or n_lanes != _lanes(layers, tokens, hidden, lane):
        raise ValueError("kvtool chunk record: malformed header")
    used = _fixed_bytes(layers, hidden, n_lanes) + 2 * n_words
    if used > buf.numel() or n_words < 2 * n_lanes:
        raise ValueError(f"kvtool chunk record: {used} bytes claimed, {buf.numel()} present")
    return fields, used


def decode_record(buf: torch.Tensor, out: torch.Tensor, bound_to: bytes = b"\0" * 16,
                  backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """Decode the record in ``buf`` (uint8, CPU; may be longer than the record) into ``out`` ``(2, L, T, D)`` (its
    shape and dtype must be the record's; any device) and return ``out``. ``ValueError`` for anything that is not a
    valid record of this shape, dtype and binding."""
    fields, used = read_header(buf)
    _, _, dtype_code, kv_n, layers, tokens, hidden, quality, lane, n_lanes, n_words, bound, crc = fields
    if tuple(out.shape) != (kv_n, layers, tokens, hidden) or out.dtype != DTYPES[dtype_code]:
        raise ValueError(f"the record holds a {(kv_n, layers, tokens, hidden)} {DTYPES[dtype_code]} chunk; the "
                         f"destination is {tuple(out.shape)} {out.dtype}")  # fmt: skip
    if bound != bound_to:
        raise ValueError("the record belongs to another key or model")
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
    words = take(n_words, torch.uint16).to(torch.int32)
    if int(lanes.sum()) != n_words or bool((lanes < 2).any()):
        raise ValueError("kvtool chunk record: lane lengths do not match the words")
    if not bool(torch.isfinite(step.float()).all()) or bool((step.float() <= 0).any()):
        raise ValueError("kvtool chunk record: invalid steps")
    if bool((freq.to(torch.int64).sum(1) != PROB_SCALE).any()) or bool((freq < 1).any()):
        raise ValueError("kvtool chunk record: invalid frequency tables")
    coder = _coder(layers, hidden, quality, RecordSettings(lane_symbols=lane), backend, out.device)
    chunk = CodedChunk(words, lanes, layer_lanes, {"mean": mean, "step": step, "freq": freq})
    decoded = coder.decode(chunk, [tokens] * layers, 1, hidden)
    for i, (k, v) in enumerate(decoded):
        out[0, i].copy_(k[0])
        out[1, i].copy_(v[0])
    return out
