"""What turns a batch of chunks into the tensors a ``.kvz`` stores, and back: one protocol, two implementations.

The encode and decode pipelines (:mod:`kvtool.codecs.encode`, :mod:`kvtool.codecs.decode`) know nothing of modes:
they hand a :class:`ChunkCoder` the cache (or a chunk's tensors, read and CRC-checked) and get tensors (or per-layer
K/V) back.

* :class:`TransformChunks` (``calibrated``, ``adaptive``): keys pre-RoPE, coded positions through a symbol coder of
  :mod:`kvtool.codecs.coding` (transform, quantize, rANS lanes), sinks and recent positions as fp16 ``raw``;
  tensors ``words``, ``lanes``, ``layer_lanes``, ``raw`` and the coder's side tensors.
* :class:`LosslessChunks` (``lossless``): every position exactly as cached (post-RoPE keys, the cache dtype), byte
  planes compressed with zstandard; tensors ``zstd``, ``layer_bytes``.

Chunk ``i``'s tensor ``part`` is stored as ``chunk.{i:06d}.{part}`` (:func:`kvtool.codecs.container.chunk_name`).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Protocol

import torch

from kvtool.arch import invert_rope
from kvtool.codecs.coding import KINDS, AdaptiveCoder, CalibratedCoder, CodedChunk, make_coder, on_backend
from kvtool.codecs.container import CodecSettings, Geometry, KvzFile
from kvtool.errors import ArtifactError

#: per layer ``(keys, values, positions)`` of one chunk
ChunkLayers = list[tuple[torch.Tensor, torch.Tensor, list[int]]]


class ChunkCoder(Protocol):
    keys_post_rope: bool  #: whether decoded keys are post-RoPE (as cached) or pre-RoPE (RoPE to be applied)
    exact: bool  #: decodes to the cache's own values (in its dtype)
    transform_device: torch.device | None  #: where pre-RoPE keys are computed to encode (None: not needed)

    def encode_chunks(self, geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]],
                      batch: list[int]) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """The tensors of each chunk of ``batch`` (consecutive), names without the chunk prefix, on the CPU."""
        ...

    def decode_chunks(self, geo: Geometry, batch: list[int], tensors: list[dict[str, torch.Tensor]],
                      dtype: torch.dtype) -> list[ChunkLayers]:  # fmt: skip
        """Per chunk of ``batch``, per layer ``(keys, values, positions)``; ``ValueError`` (and the like) when the
        tensors do not decode."""
        ...

    def check_layout(self, kvz: KvzFile) -> None:
        """Refuse (``ArtifactError``) a file whose index cannot hold what its geometry implies, before any output
        is sized from it."""
        ...


def make_chunk_coder(settings: CodecSettings, calibration: Any, arch: Any, backend: str = "auto",
                     device: torch.device = torch.device("cpu")) -> ChunkCoder:  # fmt: skip
    """The chunk coder of ``settings`` (its symbol coder's entropy coding on ``backend`` for ``device``)."""
    if settings.mode == "lossless":
        return LosslessChunks(settings.zstd_level)
    return TransformChunks(on_backend(make_coder(settings, calibration, arch), backend, device))


def lossless_settings(settings: CodecSettings) -> CodecSettings:
    """What a lossless file records: no fp16 sinks or recent tokens (every position is exact anyway), so its chunks
    hold their positions in order and no setting of the file can reorder them (schema version 2)."""
    return dataclasses.replace(settings, sink_tokens=0, recent_tokens=0)


# -- transform coders ---------------------------------------------------------------------------------------------


class TransformChunks:
    """Calibrated and adaptive chunks: pre-RoPE keys through ``coder`` (a :mod:`kvtool.codecs.coding` coder)."""

    keys_post_rope = False
    exact = False

    def __init__(self, coder: Any):
        self.coder = coder

    @property
    def transform_device(self) -> torch.device:
        """Where a chunk's transform runs: the adaptive coder's device (a GPU when its rANS runs there); the
        calibrated coder's projections are CPU matrices (a matmul's rounding depends on the device, so it stays on
        the CPU: the same bytes everywhere)."""
        return self.coder.device if isinstance(self.coder, AdaptiveCoder) else torch.device("cpu")

    def encode_chunks(self, geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]],
                      batch: list[int]) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        inputs = batch_layers(geo, cache, rope, batch, self.transform_device)
        coded = self.coder.encode_batch([layers for layers, _ in inputs])
        return [_pack(cc, raw) for cc, (_, raw) in zip(coded, inputs, strict=True)]

    def decode_chunks(self, geo: Geometry, batch: list[int], tensors: list[dict[str, torch.Tensor]],
                      dtype: torch.dtype) -> list[ChunkLayers]:  # fmt: skip
        heads, dim, n_layers = geo.arch.num_kv_heads, geo.arch.head_dim, geo.arch.num_layers
        splits = [[geo.split(i, c) for i in range(n_layers)] for c in batch]
        parts = [_coded_part(t, n_layers, sp, heads, dim) for t, sp in zip(tensors, splits, strict=True)]
        layers = self.coder.decode_batch([p[0] for p in parts], [[len(x) for x, _ in sp] for sp in splits], heads,
                                         dim)  # fmt: skip
        return [_with_raw(ly, p[1], sp, heads, dim) for ly, p, sp in zip(layers, parts, splits, strict=True)]

    def check_layout(self, kvz: KvzFile) -> None:
        """Every chunk's lane index must have the length its layout implies (coded tokens × components per layer,
        cut into lanes of ``lane_symbols``): so the output is sized only for files whose streams can fill it."""
        geo, n_layers = kvz.geometry, kvz.arch.num_layers
        channels = kvz.arch.num_kv_heads * kvz.arch.head_dim
        coded = geo.segments().coded.reshape(-1, n_layers)  # (C, L)
        coder = self.coder
        if isinstance(coder, CalibratedCoder):
            per_token = torch.tensor([sum(int(coder._coded(i, k, {}).numel()) for k in KINDS)
                                      for i in range(n_layers)])  # fmt: skip
        else:  # adaptive: every channel of a layer with coded tokens has a positive step
            per_token = torch.full((n_layers,), 2 * channels)
        symbols = coded * per_token[None, :]
        lane = kvz.settings.lane_symbols
        expected = ((symbols + lane - 1) // lane).sum(1).tolist()
        for c, want in enumerate(expected):
            got = kvz._header[f"chunk.{c:06d}.lanes"]["shape"][0]
            if got != want:
                raise ArtifactError(f"{kvz.path}: chunk {c} cannot be decoded ({got} lanes, its layout has {want})")


def batch_layers(
    geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]], batch: list[int],
    device: torch.device = torch.device("cpu"),
) -> list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]]:  # fmt: skip
    """Per chunk of ``batch`` (consecutive chunks): its coded positions per layer as pre-RoPE ``(keys, values)``
    ``(heads, n, head_dim)`` float32 on ``device`` (where the coder runs; ``rope`` must be there), and its raw
    (fp16) positions per layer, flattened ``[K, V] × heads × n × head_dim``, on the CPU. RoPE is inverted once per
    layer over the batch's positions, by separate elementwise operations, each correctly rounded, so the pre-RoPE
    keys are the same bits on every device (and whatever the batch)."""
    a0, b0 = geo.chunk_span(batch[0])[0], geo.chunk_span(batch[-1])[1]
    n_layers = len(cache.layers)
    coded_of: list[list[Any]] = [[None] * n_layers for _ in batch]  # per chunk, per layer (keys, values)
    raw_of: list[list[Any]] = [[None] * n_layers for _ in batch]  # per chunk its raw parts, on the cache's device
    no_raw = torch.zeros(0, dtype=torch.float16, device=cache.layers[0].keys.device) if cache.layers else None
    # layers with the same positions in the batch and the same rotary table (all of a full-attention model's) are
    # inverted together, one set of elementwise operations over their stack (not one per layer), and share the
    # chunks' position split
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i in range(n_layers):
        lo, hi = geo.layer_range(i)
        s = max(a0, lo)
        groups.setdefault((lo, max(min(b0, hi), s), id(rope[i][0])), []).append(i)
    for (lo, e, _), members in groups.items():
        s = max(a0, lo)
        cos, sin = rope[members[0]]
        k = torch.stack([cache.layers[i].keys[0, :, s - lo : e - lo] for i in members])
        kp = invert_rope(k.float().to(cos.device), cos[:, s:e], sin[:, s:e])  # (layers, heads, e - s, head_dim)
        v = torch.stack([cache.layers[i].values[0, :, s - lo : e - lo] for i in members]).float().to(kp.device)
        kd, vd = (kp, v) if kp.device == device else (kp.to(device), v.to(device))
        for c, chunk in enumerate(batch):
            coded, raw = geo.split(members[0], chunk)
            c0 = coded[0] - s if coded else 0  # the coded positions are one run
            idx = torch.tensor([p - s for p in raw], dtype=torch.int64).to(kp.device) if raw else None
            for j, i in enumerate(members):
                coded_of[c][i] = (kd[j, :, c0 : c0 + len(coded)], vd[j, :, c0 : c0 + len(coded)])
                if idx is not None:  # most chunks have none (sinks open the prefix, recent tokens close it)
                    pair = torch.stack([kp[j].index_select(1, idx), v[j].index_select(1, idx)])
                    raw_of[c][i] = pair.half().reshape(-1)
                else:  # one shared empty tensor (an allocation per chunk and layer cost ~40 µs each on a GPU)
                    raw_of[c][i] = no_raw
    out: list[tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]] = [(cl, []) for cl in coded_of]
    for (_, raw_parts), raws in zip(out, raw_of, strict=True):  # one copy to the host per chunk with raw positions
        flat = torch.cat(raws).cpu() if any(r.numel() for r in raws) else torch.zeros(0, dtype=torch.float16)
        raw_parts.extend(flat.split([r.numel() for r in raws]))
    return out


def _pack(c: CodedChunk, raw_parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {
        "words": c.words,
        "lanes": c.lanes.to(torch.int32).to(torch.uint16),  # at most lane_symbols + 2 words
        "layer_lanes": c.layer_lanes.to(torch.int32),
        "raw": torch.cat(raw_parts) if raw_parts else torch.zeros(0, dtype=torch.float16),
    }
    return out | dict(c.side)


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
) -> ChunkLayers:  # fmt: skip
    out, at = [], 0
    for (k, v), (c, r) in zip(layers, splits, strict=True):
        n = 2 * heads * len(r) * dim
        kv = raw[at : at + n].reshape(2, heads, len(r), dim)
        at += n
        out.append((torch.cat([k, kv[0]], dim=1), torch.cat([v, kv[1]], dim=1), c + r))
    return out


# -- lossless -----------------------------------------------------------------------------------------------------


class LosslessChunks:
    """Every position exactly as cached: per layer the chunk's K and V (post-RoPE, cache dtype, position order),
    split into byte planes (most significant byte of every element first, so exponents sit together) and
    compressed with zstandard; ``layer_bytes`` gives each layer's compressed size."""

    keys_post_rope = True
    exact = True
    transform_device = None  #: no transform: no RoPE tables needed to encode

    def __init__(self, level: int):
        self.level = level

    def encode_chunks(self, geo: Geometry, cache: Any, rope: list[tuple[torch.Tensor, torch.Tensor]],
                      batch: list[int]) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        out = []
        for chunk in batch:
            blobs = []
            for i, layer in enumerate(cache.layers):
                coded, raw = geo.split(i, chunk)
                idx = torch.tensor([p - geo.layer_range(i)[0] for p in coded + raw], dtype=torch.int64,
                                   device=layer.keys.device)  # fmt: skip
                k, v = layer.keys[0].index_select(1, idx), layer.values[0].index_select(1, idx)
                blobs.append(self._blob(torch.stack([k, v]).cpu()))
            out.append({"zstd": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if any(blobs)
                                else torch.zeros(0, dtype=torch.uint8),
                        "layer_bytes": torch.tensor([len(b) for b in blobs], dtype=torch.int64)})  # fmt: skip
        return out

    def _blob(self, t: torch.Tensor) -> bytes:
        if t.numel() == 0:
            return b""
        import zstandard  # only the lossless mode needs it

        raw = t.contiguous().view(torch.uint8).reshape(-1, t.element_size())
        planes = raw.T.contiguous().numpy().tobytes()
        return zstandard.ZstdCompressor(level=self.level).compress(planes)

    def decode_chunks(self, geo: Geometry, batch: list[int], tensors: list[dict[str, torch.Tensor]],
                      dtype: torch.dtype) -> list[ChunkLayers]:  # fmt: skip
        return [self._decode(geo, c, t, dtype) for c, t in zip(batch, tensors, strict=True)]

    def _decode(self, geo: Geometry, chunk: int, t: dict[str, torch.Tensor], dtype: torch.dtype) -> ChunkLayers:
        import zstandard

        heads, dim = geo.arch.num_kv_heads, geo.arch.head_dim
        sizes = t["layer_bytes"].tolist()
        blob, at, out = t["zstd"].numpy().tobytes(), 0, []
        if min(sizes) < 0 or sum(sizes) != len(blob):
            raise ValueError(f"layer sizes {sizes} do not add up to the {len(blob)} compressed bytes")
        for i in range(geo.arch.num_layers):
            coded, raw = geo.split(i, chunk)
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

    def check_layout(self, kvz: KvzFile) -> None:
        return None  # the reader already bounds every chunk's decompressed size (MAX_LOSSLESS_RATIO)
