"""kvtool artifacts: one self-describing, content-digested safetensors file per result (spec: ``docs/artifacts.md``).

An artifact is a plain safetensors file whose ``__metadata__`` is exactly ``{"format": "pt", "kvtool": <JSON>}``.
The kvtool JSON names the schema and its version, the producer, the model fingerprint, the calibration inputs, the
method settings and schema-specific facts; ``content_digest`` covers that JSON and every tensor byte, so any
modification is detected on read. Tensors are stacked over layers (``k_bits`` of shape ``[layers, ...]``), never
one tensor per layer.

:func:`write_artifact` writes atomically (temporary file in the same folder, ``fsync``, ``os.replace``) and
deterministically (same artifact, same bytes). :func:`read_artifact` validates the file structure, the schema and its
version, the digest and, when asked, the model; every failure is an :class:`~kvtool.errors.ArtifactError` (exit 3)
with a one-line message naming the file, except a path that does not exist or cannot be read
(:class:`~kvtool.errors.InputError`, exit 1).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

from kvtool._version import __version__
from kvtool.atomic import write_bytes_atomic
from kvtool.digests import canonical_json
from kvtool.errors import ArtifactError, InputError

#: Known schemas and the newest ``schema_version`` of each that this kvtool reads and writes.
SCHEMAS: dict[str, int] = {"kvtool.kv_capture": 1, "kvtool.kv_calibration": 1}

#: Largest size of one tensor dimension (2^40: far beyond any real tensor; larger ones overflow stride arithmetic).
MAX_DIM = 1 << 40

#: The same cap on the JSON header as safetensors' ``MAX_HEADER_SIZE``.
MAX_HEADER_SIZE = 100_000_000

#: Fields of the kvtool JSON object (schema version 1 of every schema).
FIELDS = ("schema", "schema_version", "producer", "model", "inputs", "method", "extra", "content_digest")

METADATA_KEY = "kvtool"

# Bits per element of every safetensors dtype (``safetensors/src/tensor.rs`` and the Python bindings).
_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

# The dtypes an artifact may hold: those ``safetensors.torch`` both writes and reads.
_CODE_TO_TORCH: dict[str, torch.dtype] = {
    code: dtype
    for code, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "C64": torch.complex64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    }.items()
    if dtype is not None
}
_TORCH_TO_CODE: dict[torch.dtype, str] = {dtype: code for code, dtype in _CODE_TO_TORCH.items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"F16"`` → ``torch.float16``)."""
    try:
        return _CODE_TO_TORCH[code]
    except KeyError:
        raise ArtifactError(f"unsupported tensor dtype {code!r}") from None


def dtype_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code (0 for a code this torch does not know)."""
    dtype = _CODE_TO_TORCH.get(code)
    return dtype.itemsize if dtype is not None else 0


DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def kvtool_version() -> str:
    """The version of the running kvtool."""
    return __version__


def default_producer() -> dict[str, str]:
    """``{"name": "kvtool", "version": <running version>}``: the producer stamped on new artifacts."""
    return {"name": "kvtool", "version": kvtool_version()}


def register_schema(name: str, version: int) -> None:
    """Make a schema known to :func:`read_artifact` and :func:`write_artifact`.

    Parameters
    ----------
    name
        Schema id, e.g. ``"kvtool.kv_prefix"``.
    version
        The newest ``schema_version`` of it that this kvtool reads and writes (``>= 1``).

    Raises
    ------
    ValueError
        Bad name or version, or ``name`` is already registered with another version.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"schema name must be a non-empty string, got {name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"schema version must be an int >= 1, got {version!r}")
    if SCHEMAS.get(name, version) != version:
        raise ValueError(f"schema {name} is already registered with version {SCHEMAS[name]}, not {version}")
    SCHEMAS[name] = version


@dataclass
class Artifact:
    """The content of one kvtool artifact.

    Attributes
    ----------
    schema
        Schema id, a key of :data:`SCHEMAS` (e.g. ``"kvtool.kv_calibration"``).
    schema_version
        Version of that schema the content follows (``1 <= schema_version <= SCHEMAS[schema]`` to write).
    model
        Model fingerprint: ``{"id", "config_digest", "weights_digest"}`` and an optional ``"arch"`` dict.
    inputs
        Calibration inputs (text digest, token counts, seed, ...).
    method
        Every setting of the method that produced the tensors.
    extra
        Schema-specific facts (e.g. per-layer tables).
    tensors
        Stacked tensors by name (``{k|v}_{quantity}``); plain, dense, contiguous, no two sharing memory.
    producer
        ``{"name", "version"}`` of the program that wrote it; defaults to the running kvtool.
    content_digest
        ``sha256:<hex>`` over the JSON and the tensors; filled by :func:`write_artifact` and :func:`read_artifact`.
    """

    schema: str
    schema_version: int
    model: dict[str, Any]
    inputs: dict[str, Any]
    method: dict[str, Any]
    extra: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    producer: dict[str, Any] = field(default_factory=default_producer)
    content_digest: str = ""


# --------------------------------------------------------------------------------------------------- digest


#: schema → the first of its versions whose content digest hashes each tensor's sha256 instead of its bytes
#: (:func:`register_tensor_hashed_digest`)
TENSOR_HASHED_FROM: dict[str, int] = {}
#: threads hashing tensors for a tensor-hashed digest (hashlib releases the GIL on large buffers)
DIGEST_THREADS = max(1, min(16, os.cpu_count() or 1))
DIGEST_POOL_BYTES = 1 << 18  #: tensors from this size on are hashed on the pool


def register_tensor_hashed_digest(name: str, first_version: int) -> None:
    """From ``first_version`` on, artifacts of schema ``name`` take the tensor-hashed form of the content digest
    (``docs/artifacts.md``): each tensor's bytes are hashed on their own (in parallel), then those digests in
    order, so a writer with hundreds of megabytes of tensors is not held by one sequential SHA-256."""
    TENSOR_HASHED_FROM[name] = first_version


def tensor_hashed(meta: dict[str, Any]) -> bool:
    """Whether ``meta``'s artifact (schema and version) has a tensor-hashed content digest."""
    first = TENSOR_HASHED_FROM.get(meta.get("schema"))  # type: ignore[arg-type]
    version = meta.get("schema_version")
    return first is not None and is_int(version) and version >= first


def content_digest(meta: dict[str, Any], header: dict[str, Any], buffer: bytes | memoryview) -> str:
    """``sha256:<hex>`` of an artifact, as defined in ``docs/artifacts.md``.

    Parameters
    ----------
    meta
        The kvtool JSON object; its ``content_digest`` key, if any, is left out.
    header
        Parsed safetensors header (tensor entries; ``__metadata__`` is ignored).
    buffer
        The data section of the file (everything after the header).

    Returns
    -------
    str
        ``"sha256:" + hex`` of: canonical JSON of ``meta`` without ``content_digest``, then for every tensor in
        name order ``name 0x00 dtype 0x00 canonical-JSON(shape) 0x00`` followed by the tensor's bytes (or, for a
        tensor-hashed schema version, the 32-byte SHA-256 of those bytes).
    """
    view = memoryview(buffer)
    names = sorted(k for k in header if k != "__metadata__")
    data = [view[header[n]["data_offsets"][0] : header[n]["data_offsets"][1]] for n in names]
    return digest_of(meta, names, [header[n] for n in names], data)


def digest_of(meta: dict[str, Any], names: list[str], infos: list[dict[str, Any]],
              data: list[bytes | memoryview]) -> str:  # fmt: skip
    """:func:`content_digest` of tensors given in name order (``infos``: their header entries, ``data``: their
    bytes)."""
    h = content_hasher(meta)
    if tensor_hashed(meta):
        # large tensors on the pool's threads, the rest here: a thread hand-off costs more than hashing a small
        # tensor (a forged header with 300,000 empty ones took 9 s through the pool, 0.8 s inline)
        sizes = [memoryview(d).nbytes for d in data]
        hashed: list[Any] = [None] * len(data)
        big = [i for i, n in enumerate(sizes) if n >= DIGEST_POOL_BYTES]
        pool = ThreadPoolExecutor(min(DIGEST_THREADS, len(big))) if big else None
        try:
            pending = {i: pool.submit(lambda d: hashlib.sha256(d).digest(), data[i]) for i in big} if pool else {}
            for i, n in enumerate(sizes):
                if n < DIGEST_POOL_BYTES:
                    hashed[i] = hashlib.sha256(data[i]).digest()
            for i, f in pending.items():
                hashed[i] = f.result()
        finally:
            if pool is not None:
                pool.shutdown()
        for name, info, digest in zip(names, infos, hashed, strict=True):
            digest_tensor(h, name, info, digest)
    else:
        for name, info, d in zip(names, infos, data, strict=True):
            digest_tensor(h, name, info, d)
    return "sha256:" + h.hexdigest()


def content_hasher(meta: dict[str, Any]) -> Any:
    """The sha256 of :func:`content_digest` after its JSON part, for callers that feed the tensors one by one
    (in name order) with :func:`digest_tensor`."""
    return hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != "content_digest"}).encode())


def digest_tensor(h: Any, name: str, info: dict[str, Any], data: bytes | memoryview) -> None:
    """Feed one tensor (its header entry ``info`` and its bytes, or their SHA-256 for a tensor-hashed digest) to
    a :func:`content_hasher`."""
    h.update(f"{name}\0{info['dtype']}\0{canonical_json(list(info['shape']))}\0".encode())
    h.update(data)


# --------------------------------------------------------------------------------------------------- header


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the first repeated key for the message
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise ValueError(f"number {text[:40]} is out of range")
    return value


#: Deepest nesting of objects and arrays any kvtool JSON may have (kvtool writes at most ~8 levels).
MAX_JSON_DEPTH = 64


def _depth_problem(value: Any) -> str | None:
    # level by level, keeping only the containers (a header has thousands of scalars; a stack of every value
    # cost milliseconds per file open)
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return f"nested deeper than {MAX_JSON_DEPTH} levels"
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, dict | list)]
    return None


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as every kvtool reader must: duplicate keys, ``NaN``/``Infinity`` and numbers out of the float
    range are refused, and so is nesting deeper than :data:`MAX_JSON_DEPTH`. Raises ``ValueError``."""
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    problem = _depth_problem(value)
    if problem:
        raise ValueError(problem)
    return value



def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header_problem(header: Any, data_len: int) -> str | None:
    """Why a parsed safetensors header is invalid for a data section of ``data_len`` bytes, or None."""
    if not isinstance(header, dict):
        return "not a safetensors file: header is not a JSON object"
    meta = header.get("__metadata__")
    if "__metadata__" in header and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        return "__metadata__ is not a string-to-string map"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"tensor {name!r}: entry is not a JSON object"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
            return f"tensor {name!r}: unknown dtype {dtype!r}"
        # ``type(x) is int``: a bool is not a dimension or an offset
        if type(shape) is not list or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
            return f"tensor {name!r}: invalid shape {shape!r}"
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            return f"tensor {name!r}: invalid data_offsets {offsets!r}"
        bits = _DTYPE_BITS[dtype] * math.prod(shape)
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            return f"tensor {name!r}: {dtype} {shape} does not match its {offsets[1] - offsets[0]} data bytes"
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            return "tensor data offsets overlap or leave holes"
        end = stop
    if end > data_len:
        return f"truncated: header declares {end} data bytes but the file holds {data_len}"
    if end < data_len:
        return f"{data_len - end} unexpected bytes after the tensor data"
    return None


def parse_header(read: Callable[[int], bytes], size: int, source: str,
                 precheck: Callable[[bytes], None] | None = None) -> tuple[dict[str, Any], int]:  # fmt: skip
    """Parse and validate a safetensors header; returns (header, offset of the data section). ``precheck``: called
    with the raw header bytes before they are parsed (a schema's cheap refusal of a header it can bound: parsing
    hundreds of thousands of forged entries takes seconds); it raises :class:`ArtifactError` to refuse."""
    prefix = read(8)
    if len(prefix) < 8:
        raise ArtifactError(f"{source}: truncated: {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_SIZE:
        raise ArtifactError(
            f"{source}: not a safetensors file: header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes"
        )
    if n > size - 8:
        raise ArtifactError(f"{source}: truncated: header declares {n} bytes but only {size - 8} follow")
    raw = read(n)
    if len(raw) < n:
        raise ArtifactError(f"{source}: truncated while reading the header")
    if not raw.startswith(b"{"):
        raise ArtifactError(f"{source}: not a safetensors file: header does not start with '{{'")
    if precheck is not None:
        precheck(raw)
    try:
        header = strict_json(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ArtifactError(f"{source}: not a safetensors file: header is not valid JSON ({one_line(e)})") from None
    problem = _header_problem(header, size - 8 - n)
    if problem:
        raise ArtifactError(f"{source}: {problem}")
    return header, 8 + n


#: Largest file any artifact reader opens (a stated cap, ``KVTOOL_MAX_ARTIFACT_BYTES`` overrides it).
MAX_ARTIFACT_BYTES = 1 << 38


def env_limit(name: str, default: int) -> int:
    """A stated cap that the environment variable ``name`` may override (read at call time; ``default`` when unset
    or not an integer)."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def max_artifact_bytes() -> int:
    """The cap on an artifact file's size (``KVTOOL_MAX_ARTIFACT_BYTES``, else :data:`MAX_ARTIFACT_BYTES`)."""
    return env_limit("KVTOOL_MAX_ARTIFACT_BYTES", MAX_ARTIFACT_BYTES)


def open_regular_file(path: str | os.PathLike[str], what: str = "an artifact file") -> io.BufferedReader:
    """Open ``path`` for reading if, and only if, it is a regular file within :func:`max_artifact_bytes`.

    FIFOs, sockets and devices are refused without blocking (``O_NONBLOCK``: opening a FIFO with no writer would
    otherwise wait forever, and ``/dev/zero`` would be read forever). The caller closes the file.

    Raises
    ------
    InputError
        Missing, a directory, not a regular file, unreadable (exit 1).
    ArtifactError
        Larger than the cap (exit 3).
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{source}: is a directory, not {what}") from None
    except OSError as e:
        raise InputError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{source}: is a directory, not {what}")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{source}: not a regular file (a pipe, socket or device cannot be {what})")
        if st.st_size > max_artifact_bytes():
            raise ArtifactError(f"{source}: {st.st_size} bytes, more than the {max_artifact_bytes()}-byte cap")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise



def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed safetensors header of any safetensors file, reading only the header bytes.

    Parameters
    ----------
    path
        A safetensors file (a kvtool artifact or not); a regular file (see :func:`open_regular_file`).

    Returns
    -------
    dict
        ``{tensor name: {"dtype", "shape", "data_offsets"}}`` plus ``"__metadata__"`` when the file has one.

    Raises
    ------
    InputError
        The path does not exist, is not a regular file or cannot be read.
    ArtifactError
        The file is not a valid safetensors file (truncated, header over 100 MB or malformed, offsets that do
        not tile the data section).
    """
    return read_header_with_offset(path)[0]


def read_header_with_offset(path: str | os.PathLike[str],
                            precheck: Callable[[bytes], None] | None = None) -> tuple[dict[str, Any], int]:  # fmt: skip
    """:func:`read_header` and the file offset where the data section starts (tensor ``data_offsets`` are
    relative to it); ``precheck`` as in :func:`parse_header`."""
    with open_regular_file(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            return parse_header(f.read, size, str(path), precheck)
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------------------- kvtool JSON


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """Why a kvtool JSON object of a known schema version is malformed, or None."""
    unknown = sorted(set(meta) - set(FIELDS))
    if unknown:
        return f"unknown fields {unknown}"
    missing = [k for k in FIELDS if k not in meta]
    if missing:
        return f"missing fields {missing}"
    for key in ("producer", "model", "inputs", "method", "extra"):
        if not isinstance(meta[key], dict):
            return f"{key} is not an object"
    producer = meta["producer"]
    if set(producer) != {"name", "version"} or not all(isinstance(v, str) for v in producer.values()):
        return "producer needs string 'name' and 'version'"
    model = meta["model"]
    for key in ("id", "config_digest", "weights_digest"):
        if not isinstance(model.get(key), str):
            return f"model needs a string {key!r}"
    if "arch" in model and not isinstance(model["arch"], dict):
        return "model.arch is not an object"
    if meta["content_digest"] != "" and not (
        isinstance(meta["content_digest"], str) and DIGEST_RE.fullmatch(meta["content_digest"])
    ):
        return "content_digest is not 'sha256:<64 hex digits>'"
    try:
        canonical_json(meta)
    except (TypeError, ValueError) as e:
        return f"not JSON-serializable ({one_line(e)})"
    return None


def _meta_of(artifact: Artifact) -> dict[str, Any]:
    return {
        "schema": artifact.schema,
        "schema_version": artifact.schema_version,
        "producer": artifact.producer or default_producer(),
        "model": artifact.model,
        "inputs": artifact.inputs,
        "method": artifact.method,
        "extra": artifact.extra,
    }


# --------------------------------------------------------------------------------------------------- write


def _check_writable(artifact: Artifact) -> dict[str, Any]:
    if not isinstance(artifact.schema, str) or artifact.schema not in SCHEMAS:
        raise ValueError(f"unknown schema {artifact.schema!r}; known: {sorted(SCHEMAS)} (see register_schema)")
    v, newest = artifact.schema_version, SCHEMAS[artifact.schema]
    if not is_int(v) or not 1 <= v <= newest:
        raise ValueError(f"{artifact.schema}: schema_version must be an int in 1..{newest}, got {v!r}")
    meta = _meta_of(artifact)
    problem = _meta_problem({**meta, "content_digest": ""})
    if problem:
        raise ValueError(f"invalid artifact: {problem}")
    if not isinstance(artifact.tensors, dict):
        raise ValueError("tensors must be a dict of name -> torch.Tensor")
    for name, t in artifact.tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor) or type(t.detach()) is not torch.Tensor:
            raise ValueError(f"tensor {name!r} must be a plain torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"tensor {name!r} must be dense, got layout {t.layout}")
        if t.dtype not in _TORCH_TO_CODE:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in an artifact")
        if not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous; call .contiguous() first")
    return meta


def serialize_artifact(artifact: Artifact) -> tuple[bytes, str]:
    """The exact file bytes of ``artifact`` and its content digest (no file is touched): :func:`serialized_parts`
    joined.

    Parameters
    ----------
    artifact
        The content; see :class:`Artifact` for the rules on each field.

    Returns
    -------
    tuple[bytes, str]
        File bytes (deterministic) and ``sha256:<hex>`` content digest.

    Raises
    ------
    ValueError
        Unknown schema or version, malformed fields, or tensors that cannot be stored.
    """
    parts, digest = serialized_parts(artifact)
    return b"".join(parts), digest


def serialized_parts(artifact: Artifact) -> tuple[list[bytes | memoryview], str]:
    """The file bytes of ``artifact`` as consecutive pieces (the header, then views of each tensor's bytes: a
    writer streams them without assembling one buffer) and its content digest; see :func:`serialize_artifact`."""
    meta = _check_writable(artifact)
    tensors = {name: t.detach().cpu() for name, t in sorted(artifact.tensors.items())}
    _check_unshared(tensors)
    # safetensors gives the order of the entries (by dtype, then name) and their dtype codes, from empty stand-ins;
    # the data is laid out here and copied once (safetensors.torch.save copies every tensor twice, then the header
    # is rebuilt, a third copy: seconds for a large .kvz)
    try:
        probe = safetensors.torch.save({n: torch.empty(0, dtype=t.dtype) for n, t in tensors.items()})
    except Exception as e:  # anything safetensors refuses
        raise ValueError(f"cannot serialize the tensors: {one_line(e)}") from e
    n = int.from_bytes(probe[:8], "little")
    order = json.loads(probe[8 : 8 + n])
    order.pop("__metadata__", None)
    entries: dict[str, Any] = {}
    data: dict[str, memoryview] = {}
    at = 0
    for name, info in order.items():
        data[name] = tensor_bytes(tensors[name])
        entries[name] = {"dtype": info["dtype"], "shape": list(tensors[name].shape),
                         "data_offsets": [at, at + data[name].nbytes]}  # fmt: skip
        at += data[name].nbytes
    names = sorted(entries)
    meta["content_digest"] = digest_of(meta, names, [entries[n] for n in names], [data[n] for n in names])
    # __metadata__ first ("format", then "kvtool"), then the tensor entries in safetensors' order (safetensors writes
    # __metadata__ from a hash map, in random key order: the header is written here with a fixed one)
    header = {"__metadata__": {"format": "pt", METADATA_KEY: canonical_json(meta)}, **entries}
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    if len(head) > MAX_HEADER_SIZE:
        raise ValueError(f"artifact header of {len(head)} bytes exceeds {MAX_HEADER_SIZE}; stack the tensors")
    return [len(head).to_bytes(8, "little"), head, *(data[name] for name in entries)], meta["content_digest"]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor as stored (native byte order, row-major): a view of a contiguous CPU tensor, a copy
    otherwise."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _check_unshared(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that share memory (as safetensors does: each tensor is stored once, and a reader could not
    tell which copy is meant)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                   for name, t in tensors.items() if t.numel())  # fmt: skip
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ValueError(f"cannot serialize the tensors: {a!r} and {b!r} share memory; clone one of them")


def write_artifact(path: str | os.PathLike[str], artifact: Artifact) -> str:
    """Write ``artifact`` to ``path`` atomically and return its content digest.

    The bytes go to ``.<name>.tmp-<pid>`` in the target's folder, are flushed and fsynced, and the temporary file
    is renamed onto ``path`` with :func:`os.replace`. On any failure the temporary file is removed and ``path`` is
    left as it was. ``artifact.content_digest`` (and an empty ``producer``) are filled in.

    Parameters
    ----------
    path
        Target file (its folder must exist); conventionally ``*.safetensors``.
    artifact
        The content to write.

    Returns
    -------
    str
        The ``sha256:<hex>`` content digest.

    Raises
    ------
    ValueError
        The artifact cannot be written (see :func:`serialize_artifact`); nothing is created.
    KvtoolError
        The file system refused the write (exit 1); nothing is left behind.
    """
    parts, digest = serialized_parts(artifact)
    write_bytes_atomic(path, parts)  # streamed: no joined copy of a large .kvz in memory
    artifact.producer = artifact.producer or default_producer()
    artifact.content_digest = digest
    return digest


# --------------------------------------------------------------------------------------------------- read


def _short(digest: Any) -> str:
    text = str(digest)
    return text[:19] + "..." if len(text) > 22 else text


def fingerprint_mismatch(recorded: dict[str, Any], fingerprint: dict[str, Any], strict: bool = False) -> list[str]:
    """The digests (``config_digest``, ``weights_digest``) on which a recorded model and the model in use differ:
    every digest ``fingerprint`` has (``strict``: one the record lacks differs too), else those both have. The
    one comparison behind every "made for another model" refusal (artifacts, ``.kvz`` files)."""
    keys = [k for k in ("config_digest", "weights_digest") if k in fingerprint and (strict or k in recorded)]
    return [k for k in keys if recorded.get(k) != fingerprint[k]]


def check_model(artifact: Artifact, fingerprint: dict[str, Any]) -> None:
    """Refuse an artifact made for another model.

    Compares ``config_digest`` and ``weights_digest`` (those of them present in ``fingerprint``); the ``id`` is
    only named in the message, since the same model may live under another name or path.

    Parameters
    ----------
    artifact
        A read artifact.
    fingerprint
        The model in use: ``{"id", "config_digest", "weights_digest"}`` (one of the digests may be left out).

    Raises
    ------
    ArtifactError
        A digest differs.
    ValueError
        ``fingerprint`` has neither digest.
    """
    keys = [k for k in ("config_digest", "weights_digest") if k in fingerprint]
    if not keys:
        raise ValueError("model fingerprint needs config_digest or weights_digest")
    if not fingerprint_mismatch(artifact.model, fingerprint, strict=True):
        return

    def describe_model(m: dict[str, Any]) -> str:
        parts = ", ".join(f"{k.split('_')[0]} {_short(m.get(k))}" for k in keys)
        return f"{m.get('id', '?')} ({parts})"

    raise ArtifactError(
        f"artifact was made for model {describe_model(artifact.model)}, not {describe_model(fingerprint)}"
    )


def _tensors_from(header: dict[str, Any], buffer: memoryview, source: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        dtype = _CODE_TO_TORCH.get(info["dtype"])
        if dtype is None:
            raise ArtifactError(f"{source}: tensor {name!r}: dtype {info['dtype']} is not supported in artifacts")
        begin, end = info["data_offsets"]
        if begin == end:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(bytearray(buffer[begin:end]), dtype=dtype).reshape(info["shape"])
    return tensors


def _written_by(producer: Any) -> str:
    if not isinstance(producer, dict):
        return "an unknown producer"
    if producer.get("name") == "kvtool":
        return f"kvtool {producer.get('version')}"
    return f"{producer.get('name')} {producer.get('version')}"


def kvtool_metadata(header: dict[str, Any], source: str, expect_schema: str | None = None) -> dict[str, Any]:
    """The validated kvtool JSON object of a parsed safetensors header (see :func:`read_artifact` for the checks,
    all but the content digest); every failure is an :class:`ArtifactError` naming ``source``."""
    stmeta = header.get("__metadata__") or {}
    if METADATA_KEY not in stmeta:
        raise ArtifactError(f"{source}: not a kvtool artifact (no '{METADATA_KEY}' key in the safetensors metadata)")
    try:
        meta = strict_json(stmeta[METADATA_KEY])
    except ValueError as e:
        raise ArtifactError(f"{source}: malformed kvtool metadata: not valid JSON ({one_line(e)})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{source}: malformed kvtool metadata: not a JSON object")
    schema, version, producer = meta.get("schema"), meta.get("schema_version"), meta.get("producer")
    if not isinstance(schema, str) or not is_int(version) or version < 1:
        raise ArtifactError(f"{source}: malformed kvtool metadata: needs a string schema and an int schema_version")
    written_by = _written_by(producer)
    if schema not in SCHEMAS:
        raise ArtifactError(
            f"{source}: unknown schema {schema!r} (written by {written_by}); this kvtool {kvtool_version()} reads "
            f"{', '.join(sorted(SCHEMAS))}; upgrade kvtool if the artifact is newer"
        )
    if expect_schema is not None and schema != expect_schema:
        raise ArtifactError(f"{source}: is a {schema} artifact, expected {expect_schema}")
    if version > SCHEMAS[schema]:
        raise ArtifactError(
            f"{source}: {schema} version {version} was written by {written_by}; this kvtool {kvtool_version()} "
            f"reads up to version {SCHEMAS[schema]}: upgrade kvtool"
        )
    if set(stmeta) != {"format", METADATA_KEY} or stmeta["format"] != "pt":
        raise ArtifactError(
            f"{source}: malformed kvtool metadata: __metadata__ must be exactly format='pt' and {METADATA_KEY}"
        )
    problem = _meta_problem(meta)
    if problem:
        raise ArtifactError(f"{source}: malformed kvtool metadata: {problem}")
    if not DIGEST_RE.fullmatch(meta["content_digest"]):  # only a writer leaves it empty, before it computes it
        raise ArtifactError(f"{source}: malformed kvtool metadata: no content digest")
    return meta


def read_artifact(
    path: str | os.PathLike[str],
    expect_schema: str | None = None,
    model: dict[str, Any] | None = None,
) -> Artifact:
    """Read and fully validate a kvtool artifact.

    Checks, in order (the first failure is reported): the file can be read; it is a valid safetensors file; its
    ``__metadata__`` has a ``kvtool`` key holding a JSON object; the schema is known; it is ``expect_schema``; its
    version is not newer than this kvtool reads; the fields are well formed; the content digest matches; and, if
    ``model`` is given, the artifact was made for that model.

    Parameters
    ----------
    path
        The artifact file.
    expect_schema
        Refuse any other schema (e.g. ``"kvtool.kv_calibration"``).
    model
        Fingerprint of the model in use (see :func:`check_model`).

    Returns
    -------
    Artifact
        The content, tensors on the CPU, ``content_digest`` verified.

    Raises
    ------
    InputError
        The path does not exist or cannot be read (exit 1).
    ArtifactError
        Anything else (exit 3); a one-line message starting with the path.
    """
    source = str(path)
    with open_regular_file(path) as f:
        try:
            data = f.read()
        except OSError as e:
            raise InputError(f"{source}: cannot read: {e.strerror or e}") from None
    header, start = parse_header(io.BytesIO(data).read, len(data), source)

    meta = kvtool_metadata(header, source, expect_schema)
    buffer = memoryview(data)[start:]
    if content_digest(meta, header, buffer) != meta["content_digest"]:
        raise ArtifactError(f"{source}: content digest mismatch: the file is corrupted or was modified")
    artifact = Artifact(
        schema=meta["schema"],
        schema_version=meta["schema_version"],
        model=meta["model"],
        inputs=meta["inputs"],
        method=meta["method"],
        extra=meta["extra"],
        tensors=_tensors_from(header, buffer, source),
        producer=meta["producer"],
        content_digest=meta["content_digest"],
    )
    if model is not None:
        try:
            check_model(artifact, model)
        except ArtifactError as e:
            raise ArtifactError(f"{source}: {e}") from None
    return artifact


def describe(artifact: Artifact) -> dict[str, Any]:
    """A JSON-able summary of an artifact for ``kvtool inspect``.

    Returns
    -------
    dict
        ``schema``, ``schema_version``, ``producer``, ``model``, ``inputs``, ``method``, ``extra``, ``tensors``
        (``{name: {"dtype": safetensors dtype code, "shape": [...]}}``, sorted by name) and ``content_digest``.
    """
    return {
        "schema": artifact.schema,
        "schema_version": artifact.schema_version,
        "producer": artifact.producer,
        "model": artifact.model,
        "inputs": artifact.inputs,
        "method": artifact.method,
        "extra": artifact.extra,
        "tensors": {
            name: {"dtype": _TORCH_TO_CODE.get(t.dtype, str(t.dtype).removeprefix("torch.")), "shape": list(t.shape)}
            for name, t in sorted(artifact.tensors.items())
        },
        "content_digest": artifact.content_digest,
    }
