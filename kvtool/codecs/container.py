"""The ``.kvz`` container: the format's constants and settings, chunk naming and checksums, the geometry a file's
numbers imply, and the strict reader (:class:`KvzFile`).

A ``.kvz`` file is a kvtool artifact (``docs/artifacts.md``; schema ``kvtool.kvz``, ``docs/kvz.md``): one
safetensors file whose tensors are the per-chunk bitstreams and small indexes, and whose JSON metadata records the
model, the prefix token ids' digest, the tokenizer digest, the calibration artifact's digest, the codec settings and
a CRC-32 per chunk. Chunks of ``chunk_tokens`` positions decode independently and, inside a chunk, layers too.
The envelope (safetensors structure, strict JSON, digests) is validated by :mod:`kvtool.artifacts`; this module adds
what the ``.kvz`` schema states. Encoding is :mod:`kvtool.codecs.encode`, decoding :mod:`kvtool.codecs.decode`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import (
    DIGEST_RE,
    METADATA_KEY,
    Artifact,
    content_hasher,
    digest_tensor,
    env_limit,
    fingerprint_mismatch,
    is_int,
    kvtool_metadata,
    max_artifact_bytes,
    one_line,
    parse_header,
    read_header_with_offset,
    register_schema,
    register_tensor_hashed_digest,
    tensor_bytes,
    torch_dtype,
)
from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA
from kvtool.codecs.ecsq import MAX_K
from kvtool.digests import sha256_json, token_digest
from kvtool.errors import ArtifactError, KvtoolError, UsageError

SCHEMA = "kvtool.kvz"
#: Version 2: every chunk's CRC-32 starts from a digest of the metadata it is decoded with (:func:`crc_seed`),
#: so the chunk CRCs and the metadata digest together bind every byte, and a decoder needs no whole-file digest.
#: Version 3: the content digest hashes each tensor's SHA-256 instead of its bytes (``docs/artifacts.md``), so an
#: encoder computes it on all cores (one sequential SHA-256 of a 32K-token Llama-3.1-8B file took 0.37 s, more
#: than the GPU's coding); nothing else changed, and a decoder still needs no whole-file digest.
SCHEMA_VERSION = 3
register_schema(SCHEMA, SCHEMA_VERSION)
register_tensor_hashed_digest(SCHEMA, 3)
BATCH_CHUNKS = 8  #: chunks entropy-coded together (their lanes advance in one pass; memory stays a few chunks)
#: on a GPU, chunks are encoded together up to this many K/V elements (~0.5 GiB in float32): a batch's work is a
#: few dozen kernel launches whatever its size, so fewer, larger batches (the bytes do not depend on the batch)
DEVICE_BATCH_ELEMENTS = 1 << 27

MAX_TOKENS = 1 << 24  #: longest prefix a .kvz may hold (16.7M tokens), and the bound on every recorded count
#: Cap on the decoded cache of one file, in bytes (a stated bound; ``KVTOOL_MAX_DECODE_BYTES`` overrides it).
MAX_DECODE_BYTES = 1 << 37
CACHE_DTYPES = ("float16", "bfloat16", "float32")  #: cache dtypes a file may record
#: A lossless chunk may decompress to at most this many times its compressed size (real caches: under 2:1; the cap
#: keeps a forged token count from sizing an output the file cannot fill).
MAX_LOSSLESS_RATIO = 1024
MAX_CHUNKS = 999_999  #: chunk names have six digits, so they sort in chunk order
LAYOUT = "see docs/kvz.md"  #: ``extra.layout``: the chunk layout this kvtool writes and reads


def host_threads() -> int:
    """Threads for a file's host-side work: parallel reads and chunk CRC-32s (``preadv`` and zlib release the GIL
    on large buffers)."""
    return max(1, min(16, (os.cpu_count() or 1)))


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


#: tensors per chunk in each mode (``docs/kvz.md``): lossless zstd + layer_bytes; calibrated words, lanes,
#: layer_lanes, raw; adaptive those and mean, step, freq
CHUNK_TENSORS = {"lossless": 2, "calibrated": 4, "adaptive": 7}


def tensor_count(mode: str, tokens: int, chunk_tokens: int) -> int:
    """The tensors a ``.kvz`` of ``tokens`` positions in chunks of ``chunk_tokens`` holds: ``input_ids`` and each
    chunk's :data:`CHUNK_TENSORS`."""
    return 1 + CHUNK_TENSORS[mode] * -(-tokens // chunk_tokens)


def chunk_name(chunk: int, part: str) -> str:
    """The stored name of chunk ``chunk``'s tensor ``part`` (six digits: names sort in chunk order)."""
    return f"chunk.{chunk:06d}.{part}"


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


def tensors_crc(tensors: dict[str, torch.Tensor], seed: bytes = b"") -> int:
    """:func:`chunk_crc` of tensors."""
    return chunk_crc({n: tensor_bytes(t) for n, t in tensors.items()}, seed)


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

    def coded_run(self, layer: int) -> tuple[int, int]:
        """The positions ``[a, b)`` of ``layer`` that are coded: its range less the raw sinks before and the raw
        recent tokens after (raw positions are only ever those two runs)."""
        lo, hi = self.layer_range(layer)
        a = min(max(lo, self.settings.sink_tokens), hi)
        return a, max(a, min(hi, self.tokens - self.settings.recent_tokens))

    def split(self, layer: int, chunk: int) -> tuple[list[int], list[int]]:
        """Positions of ``layer`` in ``chunk``: (coded, raw fp16)."""
        lo, hi = self.layer_range(layer)
        a, b = self.chunk_span(chunk)
        start, stop = max(a, lo), min(b, hi)
        if stop <= start:
            return [], []
        # the coded positions are the layer's coded run cut to the chunk; the rest are raw (sinks, recent tokens)
        run_a, run_b = self.coded_run(layer)
        c0 = min(max(start, run_a), stop)
        c1 = max(min(stop, run_b), c0)
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


def meta_digest(*parts: Any) -> str:
    """Digest of the metadata a decoder relies on (schema, model, inputs, settings, chunk table), so a damaged
    header is caught without reading the chunks (``extra.meta_digest`` itself left out)."""
    *head, extra = parts
    return sha256_json([*head, {k: v for k, v in extra.items() if k != "meta_digest"}])


def check_same_model(recorded: dict[str, Any], fingerprint: dict[str, Any], what: str) -> None:
    """Refuse (exit 3) a ``what`` recorded for another model (:func:`kvtool.artifacts.fingerprint_mismatch`)."""
    differs = fingerprint_mismatch(recorded, fingerprint)
    if differs:
        raise ArtifactError(
            f"the {what} is for model '{recorded.get('id')}', not '{fingerprint.get('id')}' ({differs[0]} differs)"
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

        def precheck(raw: bytes) -> None:
            most = _most_tensors(raw)
            count = raw.count(b'"data_offsets"')  # at most the entries (a key is written once per entry)
            if most is not None and count > most:
                raise ArtifactError(f"{source}: malformed .kvz metadata ({count} tensors, the format has {most})")

        if self.buffer is None:
            header, self._data_start = read_header_with_offset(self.path, precheck)
        else:
            size = self.size
            if size > max_artifact_bytes():
                raise ArtifactError(f"{source}: {size} bytes, more than the {max_artifact_bytes()}-byte cap")
            reader = self.open()
            header, self._data_start = parse_header(reader.read, size, source, precheck)
        meta = kvtool_metadata(header, source, expect_schema=SCHEMA)
        try:
            self._read_meta(meta)
            # counted before any per-tensor table is built
            want = tensor_count(self.settings.mode, self.tokens, self.settings.chunk_tokens)
            if len(header) - ("__metadata__" in header) != want:
                raise ValueError(f"{len(header) - ('__metadata__' in header)} tensors, the format has {want}")
            self._expected = self._expected_tensors()
            self._check_tensors(header)
        except (KeyError, TypeError, ValueError, KvtoolError) as e:
            raise ArtifactError(f"{source}: malformed .kvz metadata ({one_line(e)})") from None
        recorded = self.extra.get("meta_digest")
        if recorded != meta_digest(meta["schema"], meta["schema_version"], self.model, self.inputs, meta["method"],
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
            digest_tensor(self._hasher, name, self._header[name], tensor_bytes(tensors[name]))

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
        if tensors_crc(tensors, self._crc_seed) != self.chunks[chunk]["crc32"]:
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


def _most_tensors(raw: bytes) -> int | None:
    """How many tensors a ``.kvz`` header may hold, from its kvtool metadata when that comes first (as kvtool
    writes it), without parsing the rest: a header inflated with forged entries is refused before the seconds its
    full parse would take. ``None`` when the metadata cannot be read this way (the full parse decides); nothing
    here is trusted beyond this bound, which a file the full checks accept always meets (every entry has exactly
    one ``"data_offsets"`` key, and their count must equal the format's)."""
    lead = b'{"__metadata__":'
    if not raw.startswith(lead):
        return None
    try:
        stmeta, _ = json.JSONDecoder().raw_decode(raw[: len(lead) + (1 << 20)].decode("utf-8", "ignore"), len(lead))
        meta = json.loads(stmeta[METADATA_KEY])
        method, tokens = meta["method"]["_data"], meta["inputs"]["tokens"]
        chunk = method["chunk_tokens"]
        if not (is_int(tokens) and is_int(chunk) and 1 <= tokens <= MAX_TOKENS and 1 <= chunk <= MAX_TOKENS):
            return None
        return tensor_count(method["mode"], tokens, chunk)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # the full parse reports it
        return None


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
    check_same_model(kvz.model, fingerprint, ".kvz file")


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


