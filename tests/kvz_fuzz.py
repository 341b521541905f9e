"""Structured, deterministic fuzzing of the ``.kvz`` reader: case generators, an oracle per case, and a runner.

A *case* is (family, name, how to build the mutated file) and an expectation. Families:

* ``header``: safetensors header edits (dtypes, shapes, offsets, extra / missing / renamed tensors,
  ``__metadata__``, the header length field, the header text itself, the data section's length);
* ``json``: kvtool JSON edits (every field: types, negatives, zero, floats for ints, huge numbers, NaN / Infinity /
  1e400 literals, strings, null, lists, deletions, unknown keys, duplicate keys, deep nesting) and consistent
  multi-field forgeries (huge geometry, another architecture, ...);
* ``chunk``: chunk-tensor edits (bytes and values inside words, lanes, layer_lanes, raw, mean, step, freq, zstd,
  layer_bytes, input_ids; zstd bombs);
* ``cross``: mixes of valid files (a chunk or the prefix ids of another file of the same geometry, another model's
  file or chunk, another mode's chunk, the wrong calibration artifact, forged calibration artifacts);
* ``cli``: special paths in process (FIFO, /dev/zero, a directory, a missing file, as the file or as the
  calibration) and ``kvtool`` itself in subprocesses (the same paths, bad flags, ``-o -``, damaged files).

Every edit is built with each *checksum mode*: ``stale`` (nothing recomputed), ``crc`` (chunk CRC-32s),
``meta`` (``extra.meta_digest``), ``crc+meta``, ``content`` (``content_digest``), ``all`` (CRCs, then the meta
digest, then the content digest: a consistent forgery). Byte-identical builds are run once.

Expectations (``Case.declared``: what a consistent forgery must give; the runner tightens it to
``refuse_or_identical`` whenever a checksum the reader can verify is left stale):

* ``must_refuse``: the file breaks the format (docs/kvz.md, docs/artifacts.md) or contradicts the model or the
  calibration in hand: exit 3, one line. An identical decode is a failure too (``accepted_invalid``).
* ``refuse_or_identical``: exit 3, or a decode bit-identical to the base file's. (A stale ``content_digest``
  alone does not tighten the expectation of a schema-version-2 file: its seeded chunk CRCs and metadata digest
  bind every byte and the decoder skips the whole-file digest by design; ``kvtool inspect`` still checks it.)
* ``may_differ``: a consistent forgery that is a different *valid* file (e.g. other fp16 values in ``raw`` with
  every checksum recomputed): undetectable in principle, so a different decode is allowed (counted apart);
  exit codes other than 0 / 3, hangs and memory are still failures.

The oracle (in process, as ``kvtool decode -o`` does it): ``KvzFile``, ``read_artifact`` of the calibration,
``check_model_of``, ``check_tokenizer``, ``check_calibration``, ``decode_kvz(keep_pre_rope=True)``,
``input_ids()``; every exception is mapped with ``kvtool.cli._errors.message_for``. A deterministic subset (and
every tokenizer case) also goes through ``load_cache``, and every case through ``kvtool inspect --json`` (in process,
via typer's runner: exit 0 or 3). Bounds: :data:`HANG_S` seconds per oracle (``setitimer`` in process; a forked
child is killed after ``2 × HANG_S + 5`` s), and peak RSS growth at most ``2 × max(largest base decode, the case's
file size) + MEM_ALLOWANCE_MB`` (64 MiB), plus HEADER_PARSE_FACTOR × the header length. Cases that may allocate
from a forged number (bombs, huge geometry, special paths) run in a forked child each, whose
``ru_maxrss`` starts at its RSS at fork: one bad case cannot hide in the parent's high-water mark; the child also
runs under ``RLIMIT_AS`` = its size at fork + :data:`CHILD_AS_HEADROOM_MB` (a failed allocation is a ``memory``
failure). CLI subprocesses are killed at :data:`CLI_RSS_CAP_MB` RSS or :data:`CLI_TIMEOUT_S` seconds.

Runner (what to run while fixing the reader)::

    .venv/bin/python tests/kvz_fuzz.py --cases 2000 --seed 0 [--family json] [--isolate-all] [--no-cli]
    .venv/bin/python tests/kvz_fuzz.py --case 'json/llama-lossless/extra.cache_dtype=int32@all'   # one case
    .venv/bin/python tests/kvz_fuzz.py --list --family cross                                        # names only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import select as selectmod
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

FAMILIES = ("header", "json", "chunk", "cross", "cli")
MODES = ("stale", "crc", "meta", "crc+meta", "content", "all")
MUST, EITHER, MAY = "must_refuse", "refuse_or_identical", "may_differ"

HANG_S = 5.0  #: per-case wall-clock bound (a tiny file decodes in ~0.1 s)
MEM_ALLOWANCE_MB = 64  #: fixed allowance on top of 2 × the decoded output
#: Peak memory of parsing a JSON header, per header byte (Python objects for every key and entry): part of the
#: stated bound, since a header of up to 100 MB is valid safetensors.
HEADER_PARSE_FACTOR = 32  # measured: ~28 bytes of Python objects per header byte for 300,000 empty entries
CHILD_AS_HEADROOM_MB = 1024  #: address space a forked case may add to what it inherited
CLI_TIMEOUT_S = 40.0
CLI_RSS_CAP_MB = 1536  #: a kvtool process is ~0.5 GB; killed above this
BOX_CHARS = set(chr(c) for c in range(0x2500, 0x2580))

#: Bits per element of every safetensors dtype code (the reader's table), and a few codes that are not dtypes.
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
        "F8_E5M2FNUZ": 8, "F8_E4M3FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
        "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}  # fmt: skip
NOT_DTYPES: list[Any] = ["F128", "f16", "", "float16", None, 16, ["F16"]]
NP = {"F16": "<f2", "U16": "<u2", "I16": "<i2", "I32": "<i4", "I64": "<i8", "U8": "u1", "F32": "<f4", "F64": "<f8",
      "U32": "<u4", "I8": "i1", "BF16": "<u2", "U64": "<u8"}  # fmt: skip


def _torch_dtypes() -> dict[str, torch.dtype]:
    out = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "C64": torch.complex64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
    for code, name in (("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("F8_E4M3", "float8_e4m3fn"),
                       ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                       ("F8_E5M2FNUZ", "float8_e5m2fnuz")):  # fmt: skip
        if hasattr(torch, name):
            out[code] = getattr(torch, name)
    return out


TORCH = _torch_dtypes()


# =================================================================================================================
# The safetensors document: parse a file, edit it structurally, serialise it back (byte-exact for an unedited file)
# =================================================================================================================


class _Sentinel:
    """A marker that survives ``copy.deepcopy`` (compared with ``is``)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __copy__(self) -> _Sentinel:
        return self

    def __deepcopy__(self, memo: Any) -> _Sentinel:
        return self


MISSING: Any = _Sentinel("MISSING")  #: an absent key (``__metadata__`` or a tensor entry field)
KV: Any = _Sentinel("KV")  #: placeholder for the serialised kvtool JSON


class Raw:
    """A value written verbatim into the kvtool JSON text (``NaN``, ``1e400``, duplicate keys, deep nesting);
    ``value`` stands in for it wherever a digest is computed (what a lenient parser would see)."""

    def __init__(self, text: str, value: Any):
        self.text, self.value = text, value

    def __repr__(self) -> str:
        return f"Raw({self.text[:20]!r})"


@dataclass
class Entry:
    dtype: Any
    shape: Any
    data: bytes
    fields: dict[str, Any] = field(default_factory=dict)  #: extra / overridden entry keys (MISSING: removed)


@dataclass
class Doc:
    stmeta: Any  #: the ``__metadata__`` value (``KV`` marks where the kvtool JSON string goes)
    kv: Any  #: the kvtool JSON object
    tensors: dict[str, Entry]  #: in header order
    layout: list[str]  #: order of the data section
    kv_raw: str | None = None  #: replaces the serialised kvtool JSON verbatim
    header_hooks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    text_hooks: list[Callable[[bytes], bytes]] = field(default_factory=list)  #: on the padded header bytes
    byte_hooks: list[Callable[[bytes], bytes]] = field(default_factory=list)  #: on the whole file

    def copy(self) -> Doc:
        return Doc(copy.deepcopy(self.stmeta), copy.deepcopy(self.kv),
                   {n: dataclasses.replace(e, fields=dict(e.fields)) for n, e in self.tensors.items()},
                   list(self.layout))  # fmt: skip


def parse(data: bytes) -> Doc:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    stmeta = header.pop("__metadata__", MISSING)
    kv = None
    if isinstance(stmeta, dict) and isinstance(stmeta.get("kvtool"), str):
        kv = json.loads(stmeta["kvtool"])
        stmeta = {k: (KV if k == "kvtool" else v) for k, v in stmeta.items()}
    tensors = {
        name: Entry(info["dtype"], info["shape"], body[info["data_offsets"][0] : info["data_offsets"][1]])
        for name, info in header.items()
    }
    layout = sorted(header, key=lambda k: tuple(header[k]["data_offsets"]))
    return Doc(stmeta, kv, tensors, layout)


def _sub_raw(obj: Any, raws: list[Raw]) -> Any:
    if isinstance(obj, Raw):
        raws.append(obj)
        return f"\x00RAW{len(raws) - 1}\x00"
    if isinstance(obj, dict):
        return {k: _sub_raw(v, raws) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_sub_raw(v, raws) for v in obj]
    return obj


def dump_kv(obj: Any) -> str:
    """kvtool's canonical JSON (sorted keys, compact), with :class:`Raw` values spliced in verbatim."""
    raws: list[Raw] = []
    text = json.dumps(_sub_raw(obj, raws), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    for i, r in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), r.text, 1)
    return text


def plain(obj: Any) -> Any:
    """``obj`` with every :class:`Raw` replaced by the value it stands for."""
    if isinstance(obj, Raw):
        return plain(obj.value)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def serialize(doc: Doc) -> bytes:
    kvtext = doc.kv_raw if doc.kv_raw is not None else dump_kv(doc.kv)
    header: dict[str, Any] = {}
    if doc.stmeta is not MISSING:
        s = doc.stmeta
        header["__metadata__"] = {k: (kvtext if v is KV else v) for k, v in s.items()} if isinstance(s, dict) else s
    at, offsets = 0, {}
    for name in doc.layout:
        offsets[name] = [at, at + len(doc.tensors[name].data)]
        at += len(doc.tensors[name].data)
    for name, e in doc.tensors.items():
        entry = {"dtype": e.dtype, "shape": e.shape, "data_offsets": offsets[name]}
        for k, v in e.fields.items():
            if v is MISSING:
                entry.pop(k, None)
            else:
                entry[k] = v
        header[name] = entry
    for hook in doc.header_hooks:
        hook(header)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode()
    head += b" " * (-len(head) % 8)
    for thook in doc.text_hooks:
        head = thook(head)
    out = len(head).to_bytes(8, "little") + head + b"".join(doc.tensors[n].data for n in doc.layout)
    for bhook in doc.byte_hooks:
        out = bhook(out)
    return out


# -- checksums, as a forger recomputes them ------------------------------------------------------------------------


def _lenient_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def as_tensor(e: Entry) -> torch.Tensor:
    dt = TORCH[e.dtype]
    t = torch.frombuffer(bytearray(e.data), dtype=torch.uint8) if e.data else torch.zeros(0, dtype=torch.uint8)
    return t.view(dt).reshape(e.shape)


def crc_seed(kv: Any) -> bytes | None:
    """What the reader starts chunk CRCs from (schema version 2: a digest of the metadata; ``kvz.crc_seed``), or
    None for a reader without seeded CRCs."""
    from kvtool.codecs import kvz

    f = getattr(kvz, "crc_seed", None)
    if f is None:
        return None
    try:
        return f(plain(kv))
    except Exception:  # noqa: BLE001 - metadata the reader refuses before any CRC: any seed will do
        return b""


def chunk_crc(doc: Doc, i: int, seed: Any = "compute") -> int:
    """The CRC-32 the reader computes for chunk ``i``: its own ``tensors_crc`` (seeded with :func:`crc_seed` where the
    reader has one) when the tensors can be built, so this follows the reader if its definition changes; else
    the documented one (seed, then name, NUL, bytes, in name order)."""
    from kvtool.codecs import kvz

    prefix = f"chunk.{i:06d}."
    names = sorted(n for n in doc.tensors if n.startswith(prefix))
    if seed == "compute":
        seed = crc_seed(doc.kv)
    try:
        tensors = {n: as_tensor(doc.tensors[n]) for n in names}
        return int(kvz.tensors_crc(tensors, seed) if seed is not None else kvz.tensors_crc(tensors))
    except Exception:  # noqa: BLE001 - a dtype or shape torch cannot build: the documented definition
        crc = zlib.crc32(seed) if seed else 0
        for n in names:
            crc = zlib.crc32(doc.tensors[n].data, zlib.crc32(n.encode() + b"\0", crc))
        return crc


def meta_digest(kv: Any) -> str:
    from kvtool.codecs import kvz

    p = plain(kv)
    parts = (p.get("schema"), p.get("schema_version"), p.get("model"), p.get("inputs"), p.get("method"), p["extra"])
    try:
        return kvz.meta_digest(*parts)
    except Exception:  # noqa: BLE001 - NaN, or a type the reader's canonical JSON refuses: the lenient twin
        *head, extra = parts
        return (
            "sha256:"
            + hashlib.sha256(
                _lenient_json([*head, {k: v for k, v in extra.items() if k != "meta_digest"}]).encode()
            ).hexdigest()
        )


def content_digest(doc: Doc) -> str:
    """docs/artifacts.md: sha256 of the canonical JSON without ``content_digest`` then, per tensor in name
    order, ``name NUL dtype NUL canonical(shape) NUL`` and its bytes (``.kvz`` version 3 on: their sha256)."""
    p = plain(doc.kv)
    h = hashlib.sha256(_lenient_json({k: v for k, v in p.items() if k != "content_digest"}).encode())
    version = p.get("schema_version") if isinstance(p, dict) else None
    hashed = p.get("schema") == "kvtool.kvz" and type(version) is int and version >= 3
    for name in sorted(doc.tensors):
        e = doc.tensors[name]
        shape = list(e.shape) if isinstance(e.shape, list) else e.shape
        h.update(f"{name}\0{e.dtype}\0{_lenient_json(shape)}\0".encode())
        h.update(hashlib.sha256(e.data).digest() if hashed else e.data)
    return "sha256:" + h.hexdigest()


def ids_digest(doc: Doc) -> str | None:
    from kvtool.digests import token_digest

    try:
        return token_digest(as_tensor(doc.tensors["input_ids"]).to(torch.int64))
    except Exception:  # noqa: BLE001
        return None


def _chunks_of(kv: Any) -> list[Any]:
    extra = kv.get("extra") if isinstance(kv, dict) else None
    chunks = extra.get("chunks") if isinstance(extra, dict) else None
    return chunks if isinstance(chunks, list) else []


def fix_crcs(doc: Doc) -> None:
    seed = crc_seed(doc.kv)  # the seed leaves the CRCs out: one for every chunk
    for i, c in enumerate(_chunks_of(doc.kv)):
        if isinstance(c, dict) and "crc32" in c and not isinstance(c["crc32"], Raw):
            c["crc32"] = chunk_crc(doc, i, seed)


def fix_meta(doc: Doc) -> None:
    extra = doc.kv.get("extra") if isinstance(doc.kv, dict) else None
    if isinstance(extra, dict) and "meta_digest" in extra and not isinstance(extra["meta_digest"], Raw):
        extra["meta_digest"] = meta_digest(doc.kv)


def fix_content(doc: Doc) -> None:
    if isinstance(doc.kv, dict) and "content_digest" in doc.kv and not isinstance(doc.kv["content_digest"], Raw):
        doc.kv["content_digest"] = content_digest(doc)


def fix_ids_digest(doc: Doc) -> None:
    inputs = doc.kv.get("inputs") if isinstance(doc.kv, dict) else None
    d = ids_digest(doc)
    if isinstance(inputs, dict) and d is not None:
        inputs["token_ids_digest"] = d


def recompute(doc: Doc, mode: str) -> None:
    """Recompute the checksums ``mode`` names, in the order a forger must: CRCs, meta digest, content digest."""
    if doc.kv_raw is not None or not isinstance(doc.kv, dict):
        return
    if mode in ("crc", "crc+meta", "all"):
        fix_crcs(doc)
    if mode in ("meta", "crc+meta", "all"):
        fix_meta(doc)
    if mode in ("content", "all"):
        fix_content(doc)


def _content_optional(doc: Doc | None) -> bool:
    """Schema version >= 2: seeded chunk CRCs and the metadata digest bind every byte, and the decoder does not
    check the whole-file content digest by design (``kvz.crc_seed``); a stale content digest alone then does not
    make a forgery detectable *by the decoder* (``kvtool inspect`` still refuses it)."""
    try:
        return crc_seed(doc.kv) is not None and plain(doc.kv).get("schema_version", 1) >= 2
    except Exception:  # noqa: BLE001
        return False


def stale(doc: Doc) -> set[str]:
    """Which checksums the reader can verify do not match the final file (``crc``, ``meta``, ``content``,
    ``ids``): any of them makes the case detectable, whatever the edit."""
    if doc.kv_raw is not None or not isinstance(doc.kv, dict):
        return {"json"}
    out = set()
    try:
        p = plain(doc.kv)
        seed = crc_seed(doc.kv)
        for i, c in enumerate(_chunks_of(p)):
            if not isinstance(c, dict) or c.get("crc32") != chunk_crc(doc, i, seed):
                out.add("crc")
        if p["extra"].get("meta_digest") != meta_digest(doc.kv):
            out.add("meta")
        if p.get("content_digest") != content_digest(doc):
            out.add("content")
        if "input_ids" in doc.tensors and ids_digest(doc) != p["inputs"].get("token_ids_digest"):
            out.add("ids")
    except Exception:  # noqa: BLE001 - a structure too broken to check is stale by definition
        out.add("meta")
    return out


# =================================================================================================================
# Base files (tiny models, built once per session) and the reference decode of each
# =================================================================================================================


class _Tok:
    def get_vocab(self) -> dict[str, int]:
        return {"a": 0}


class LM:
    """The parts of a LoadedModel the codec uses, around a tiny model (as tests/test_kvz.py's ``_LM``)."""

    def __init__(self, arch: str, model: Any):
        from kvtool.arch import arch_info

        self.model, self.arch = model, arch_info(model.config)
        self.fingerprint = {"id": f"tiny-{arch}", "config_digest": self.arch.digest(),
                            "weights_digest": "sha256:" + "1" * 64}  # fmt: skip
        self.tokenizer = _Tok()


IDS_A = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
IDS_B = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(1))

#: base key -> (arch, settings kwargs, tokens, calibration key). ``~b`` twins: same geometry, other token ids.
BASE_SPECS: dict[str, tuple[str, dict[str, Any], int, str | None]] = {
    "llama-lossless": ("llama", dict(mode="lossless", chunk_tokens=16, sink_tokens=1), 48, None),
    "llama-adaptive": (
        "llama",
        dict(mode="adaptive", quality=0.5, chunk_tokens=16, lane_symbols=64, sink_tokens=2, recent_tokens=3),
        40,
        None,
    ),  # fmt: skip
    "llama-calibrated": (
        "llama",
        dict(mode="calibrated", level=-1, chunk_tokens=24, lane_symbols=64, sink_tokens=1, recent_tokens=2),
        70,
        "pca-llama",
    ),  # fmt: skip
    "gemma3-lossless": ("gemma3", dict(mode="lossless", chunk_tokens=16, sink_tokens=1), 50, None),
    "gemma3-adaptive": (
        "gemma3",
        dict(mode="adaptive", quality=0.5, chunk_tokens=16, lane_symbols=64, sink_tokens=1, recent_tokens=2),
        45,
        None,
    ),  # fmt: skip
    "gemma3-calibrated": (
        "gemma3",
        dict(mode="calibrated", level=-1, chunk_tokens=24, lane_symbols=64, sink_tokens=1, recent_tokens=2),
        70,
        "pca-gemma3",
    ),  # fmt: skip
}
BASES = tuple(BASE_SPECS)
TWINS = {k: k + "~b" for k in BASES}


@dataclass
class Decoded:
    layers: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]
    ids: torch.Tensor

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for layer in self.layers for t in layer if t is not None)
        return n + self.ids.numel() * self.ids.element_size()


def _bits_equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def first_difference(got: Decoded, ref: Decoded) -> str | None:
    """Where ``got`` differs from ``ref`` bit for bit (dtype, shape or bytes), or None."""
    if len(got.layers) != len(ref.layers):
        return f"{len(got.layers)} layers, expected {len(ref.layers)}"
    for i, (g, r) in enumerate(zip(got.layers, ref.layers, strict=True)):
        for what, x, y in zip(("keys", "keys_pre_rope", "values", "positions"), g, r, strict=True):
            if not _bits_equal(x, y):
                desc = "None" if x is None else f"{x.dtype} {tuple(x.shape)}"
                return f"layer {i} {what}: {desc} vs {y.dtype} {tuple(y.shape)}" + (
                    f", max |diff| {float((x.double() - y.double()).abs().max()):.3g}"
                    if x is not None and x.shape == y.shape and x.numel() else "")  # fmt: skip
    if not _bits_equal(got.ids, ref.ids):
        return f"input_ids: {got.ids.dtype} {tuple(got.ids.shape)} vs {ref.ids.dtype} {tuple(ref.ids.shape)}"
    return None


@dataclass
class Base:
    key: str
    arch: str
    mode: str
    tokens: int
    cal: str | None
    data: bytes
    doc: Doc
    lm: LM
    ref: Decoded | None = None
    ref_cache: Decoded | None = None
    ref_1t: Decoded | None = None  #: the same decodes on one torch thread (what a forked case runs on)
    ref_cache_1t: Decoded | None = None


def _source_key() -> str:
    """Digest of everything that decides the base files' bytes (kvtool sources, this file, the tiny models)."""
    h = hashlib.sha256()
    root = HERE.parent / "kvtool"
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    import inspect

    h.update((HERE / "tiny_models.py").read_bytes())
    h.update((inspect.getsource(World._encode_all) + repr(BASE_SPECS) + repr(IDS_A.tolist())).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


class World:
    """Tiny models, base files, calibration artifacts, reference decodes, and a scratch folder."""

    def __init__(self, tmp: Path, models: dict[str, Any] | None = None, cache: bool = True, log: Any = None):
        from tiny_models import tiny_model

        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda s: None)
        models = dict(models or {})
        for arch in ("llama", "gemma3"):
            if arch not in models:
                models[arch] = tiny_model(arch, seed=0)
        self.lms = {arch: LM(arch, m) for arch, m in models.items()}
        self.cal_paths: dict[str, Path] = {}
        self.cal_bytes: dict[str, bytes] = {}
        self.bases: dict[str, Base] = {}
        self.files: dict[str, bytes] = {}  #: every built file by key (bases, twins)
        self._cal_artifacts: dict[str, Any] = {}
        cache_dir = None
        if cache and os.environ.get("KVZ_FUZZ_CACHE", "1") != "0":
            cache_dir = Path(tempfile.gettempdir()) / "kvz_fuzz_cache" / _source_key()
        self._build(cache_dir)
        self.decoded_max = max(b.ref.nbytes() for b in self.bases.values() if b.ref is not None)
        self.mem_bound_kb = (2 * self.decoded_max) // 1024 + MEM_ALLOWANCE_MB * 1024
        self._bomb: dict[str, bytes] = {}
        self.cli_model: tuple[Path, Path] | None = None

    # -- building -------------------------------------------------------------------------------------------------

    def _build(self, cache_dir: Path | None) -> None:
        t0 = time.time()
        if cache_dir is not None and (cache_dir / "done").exists():
            for p in cache_dir.iterdir():
                if p.suffix in (".kvz", ".safetensors"):
                    (self.cal_bytes if p.suffix == ".safetensors" else self.files)[p.stem] = p.read_bytes()
        else:
            self._encode_all()
            if cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                for k, v in self.files.items():
                    (cache_dir / f"{k}.kvz").write_bytes(v)
                for k, v in self.cal_bytes.items():
                    (cache_dir / f"{k}.safetensors").write_bytes(v)
                (cache_dir / "done").write_text("ok")
        for k, v in self.cal_bytes.items():
            self.cal_paths[k] = self.tmp / f"{k}.kvcal.safetensors"
            self.cal_paths[k].write_bytes(v)
        for key, (arch, s, tokens, cal) in BASE_SPECS.items():
            data = self.files[key]
            base = Base(key, arch, s["mode"], tokens, cal, data, parse(data), self.lms[arch])
            assert serialize(base.doc) == data, f"{key}: the serialiser does not reproduce the file"
            self.bases[key] = base
        for base in self.bases.values():
            path = self.tmp / f"{base.key}.kvz"
            path.write_bytes(base.data)
            cal = self.cal_paths.get(base.cal) if base.cal else None
            base.ref = oracle_decode(base, path, cal)
            base.ref_cache = oracle_load_cache(base, path, cal)
            # the references a forked case (one torch thread) is judged against: a calibrated file's inverse
            # transform is a batched float32 matmul whose last bits depend on the thread count (gemma3-calibrated:
            # 4e-8 between 1 and 2 threads), so each process compares with a decode made on its own thread count
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                base.ref_1t, base.ref_cache_1t = oracle_decode(base, path, cal), oracle_load_cache(base, path, cal)
            finally:
                torch.set_num_threads(threads)
        self.log(f"base files ready in {time.time() - t0:.1f} s")

    def _encode_all(self) -> None:
        from kvtool.artifacts import read_artifact, write_artifact
        from kvtool.calibrators.projection import (
            Budget,
            ProjectionCalibration,
            fit_projection,
            projection_artifact,
            resolve_projection,
        )
        from kvtool.codecs.kvz import CodecSettings, encode_prefix

        cfg = ProjectionCalibration(num_seqs=2, seq_len=64, table_tokens=96)
        fit_ids = torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(2))
        cals: dict[str, Any] = {}
        for arch in ("llama", "gemma3"):
            lm = self.lms[arch]
            table = fit_projection(lm.model, lm.arch, fit_ids, cfg)
            art, _ = projection_artifact({**lm.fingerprint, "arch": lm.arch.to_dict()}, cfg, {}, table,
                                         Budget(bits=2.0))  # fmt: skip
            p = self.tmp / f"pca-{arch}.kvcal.safetensors"
            write_artifact(p, art)
            self.cal_bytes[f"pca-{arch}"] = p.read_bytes()
            cals[f"pca-{arch}"] = read_artifact(p)
        other, _ = resolve_projection(cals["pca-llama"], Budget(bits=3.0))
        p = self.tmp / "pca-llama-3b.kvcal.safetensors"
        write_artifact(p, other)
        self.cal_bytes["pca-llama-3b"] = p.read_bytes()
        for key, (arch, s, tokens, cal) in BASE_SPECS.items():
            for k, ids in ((key, IDS_A), (TWINS[key], IDS_B)):
                path = self.tmp / f"{k}.kvz"
                encode_prefix(self.lms[arch], ids[:tokens], CodecSettings(**s), path,
                              calibration=cals[cal] if cal else None, backend="torch")  # fmt: skip
                self.files[k] = path.read_bytes()

    def cal_artifact(self, key: str) -> Any:
        from kvtool.artifacts import read_artifact

        if key not in self._cal_artifacts:
            self._cal_artifacts[key] = read_artifact(self.cal_paths[key])
        return self._cal_artifacts[key]

    def bomb(self, kind: str) -> bytes:
        """zstd frames: ``real`` (1 GiB of zeros, content size in the header, ~32 KiB), ``nosize`` (the same
        without a content size), ``declare1g`` / ``declare2e62`` (64 zero bytes whose header claims 1 GiB / 2^62)."""
        import zstandard

        if kind not in self._bomb:
            if kind in ("real", "nosize"):
                buf = io.BytesIO()
                c = zstandard.ZstdCompressor(level=1, write_content_size=kind == "real")
                with c.stream_writer(buf, size=(1 << 30) if kind == "real" else -1, closefd=False) as w:
                    z = bytes(1 << 20)
                    for _ in range(1024):
                        w.write(z)
                self._bomb[kind] = buf.getvalue()
            else:
                self._bomb[kind] = zstd_declaring(1 << 30 if kind == "declare1g" else 1 << 62)
        return self._bomb[kind]


def zstd_declaring(content_size: int, payload: bytes = bytes(64)) -> bytes:
    """A zstd frame of ``payload`` whose header declares ``content_size`` (8-byte field)."""
    import zstandard

    small = zstandard.ZstdCompressor(level=3).compress(payload)
    fhd = small[4]
    single, dict_flag, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    fcs_len = ((1 if single else 0), 2, 4, 8)[fcs_flag]
    new_fhd = (3 << 6) | (single << 5) | (fhd & 0b00011111)
    return small[:4] + bytes([new_fhd]) + small[5:at] + content_size.to_bytes(8, "little") + small[at + fcs_len :]


# =================================================================================================================
# The oracles
# =================================================================================================================


class _Timeout(BaseException):
    """Raised by the interval timer: the case ran past :data:`HANG_S` (a BaseException, so the reader's own
    ``except Exception`` cannot swallow it)."""


_TIMED_OUT = [False]


def _on_alarm(signum: int, frame: Any) -> None:
    _TIMED_OUT[0] = True
    raise _Timeout()


def oracle_decode(base: Base, path: Path, cal: Path | None) -> Decoded:
    """What ``kvtool decode FILE -o OUT`` does with the file, in process."""
    from kvtool.artifacts import read_artifact
    from kvtool.calibration import SCHEMA as CALIBRATION_SCHEMA
    from kvtool.codecs import kvz as kvzmod

    kvz = kvzmod.KvzFile(path)
    calibration = read_artifact(cal, expect_schema=CALIBRATION_SCHEMA) if cal is not None else None
    kvzmod.check_model_of(kvz, base.lm.fingerprint)
    check_tokenizer = getattr(kvzmod, "check_tokenizer", None)
    if check_tokenizer is not None:
        check_tokenizer(kvz, base.lm.tokenizer)
    kvzmod.check_calibration(kvz, calibration)
    layers = kvzmod.decode_kvz(kvz, base.lm.model, calibration, keep_pre_rope=True, backend="torch")
    ids = kvz.input_ids()
    return Decoded([(d.keys, d.keys_pre_rope, d.values, d.positions) for d in layers], ids)


def oracle_load_cache(base: Base, path: Path, cal: Path | None) -> Decoded:
    """``kvtool.load_cache(path, LoadedModel-like, calibration path)``: the cache's keys and values per layer."""
    from kvtool.codecs.kvz import load_cache

    cache, ids = load_cache(path, base.lm, cal, backend="torch")
    layers = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        layers.append((k, None, v, torch.tensor([k.shape[-2], int(layer.get_seq_length())])))
    return Decoded(layers, ids)


def oracle_inspect(path: Path) -> tuple[int, str]:
    """``kvtool inspect PATH --json`` in process: (exit code, stderr)."""
    from typer.testing import CliRunner

    from kvtool.cli.app import app

    r = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    err = r.stderr if r.stderr is not None else ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        if isinstance(r.exception, _Timeout):
            raise r.exception
        err += f"\n[uncaught {type(r.exception).__name__}: {r.exception}]"
    return r.exit_code, err


# =================================================================================================================
# Cases
# =================================================================================================================


@dataclass
class Built:
    data: bytes | None = None  #: the file; None: ``path_kind`` names a special path
    path_kind: str | None = None  #: fifo, devzero, devnull, dir, missing, symlink-devzero, dangling, newline
    cal: Any = "default"  #: "default" (the base's), None, a calibration key, bytes (a forged artifact), or a path kind
    doc: Doc | None = None  #: the final document (for the staleness analysis)
    declared: str | None = None  #: overrides the case's declared class (decided from the built file)


@dataclass
class Case:
    family: str
    name: str
    base: str
    make: Callable[[World], Built]
    declared: str = MUST
    isolate: bool = False
    core: bool = False  #: one of the failure classes the issue lists: always in the fast subset
    heavy: bool = False  #: slow to build and run (huge headers): one base each, in runs of >= 5,000 cases
    load_cache: bool = False  #: also run the load_cache oracle
    exits: tuple[int, ...] = (3,)  #: refusal codes allowed (special paths: also 1)
    note: str = ""
    must_contain: str = ""  #: a refusal's one-line message must hold this


def _mode_cases(family: str, base: str, target: str, edit: str, fn: Callable[[Doc, World], Any], declared: str,
                modes: Iterable[str] = MODES, cal: Any = "default", **kw: Any) -> Iterator[Case]:  # fmt: skip
    """One case per checksum mode of an edit ``fn(doc, world)`` applied to a copy of the base document (it may
    return a dict of :class:`Built` overrides)."""
    for mode in modes:

        def make(world: World, mode: str = mode) -> Built:
            doc = world.bases[base].doc.copy()
            over = fn(doc, world) or {}
            recompute(doc, mode)
            return Built(data=serialize(doc), doc=doc, cal=over.get("cal", cal), declared=over.get("declared"))

        yield Case(family, f"{family}/{base}/{target}/{edit}@{mode}", base, make, declared, **kw)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _chunk_names(doc: Doc) -> list[str]:
    return [n for n in doc.tensors if n.startswith("chunk.")]


def _nbytes(code: Any, shape: list[int]) -> int | None:
    if code not in BITS or not isinstance(shape, list):
        return None
    bits = BITS[code] * math.prod(shape)
    return bits // 8 if bits % 8 == 0 else None


# -- (a) safetensors header edits ------------------------------------------------------------------------------


def _reshape_bytes(shape: list[int], old: str, new: str) -> list[int] | None:
    """A shape of dtype ``new`` with the byte size of ``shape`` in ``old`` (scaling the last axis), or None."""
    if not shape:
        return None
    total_bits = BITS[old] * math.prod(shape)
    rest = math.prod(shape[:-1])
    if rest == 0:
        return list(shape)
    per = total_bits // rest
    if total_bits % rest or per % BITS[new]:
        return None
    return [*shape[:-1], per // BITS[new]]


def _shape_variants(shape: list[int]) -> list[tuple[str, Any, bool]]:
    """(label, new shape, isolate) variants of ``shape``: same element count, other counts, bad types."""
    n = math.prod(shape)
    out: list[tuple[str, Any, bool]] = [("lead1", [1, *shape], False), ("trail1", [*shape, 1], False)]
    if len(shape) > 1:
        out += [("flat", [n], False), ("swap", list(reversed(shape)), False)]
    if shape and shape[0] > 1:
        d = next((k for k in range(2, shape[0]) if shape[0] % k == 0), None)
        if d:
            out.append(("split", [d, shape[0] // d, *shape[1:]], False))
    if len(shape) == 1 and n > 1 and n % 2 == 0:
        out.append(("2xhalf", [2, n // 2], False))
    if n == 1:
        out.append(("scalar", [], False))
    if n == 0:
        out += [("0x2e40", [0, 1 << 40], True), ("2e40x0", [1 << 40, 0], True), ("0x2e62x2e62", [0, 1 << 62, 1 << 62],
                True)]  # fmt: skip
    out += [("first+1", [shape[0] + 1, *shape[1:]] if shape else [1], False), ("zero", [0], False),
            ("neg", [-1, *shape[1:]] if shape else [-1], False),
            ("float", [float(shape[0]), *shape[1:]] if shape else [1.0], False),
            ("bool", [True] * max(1, len(shape)), False), ("str", str(shape), False), ("null", None, False),
            ("obj", {"0": n}, False), ("2e64", [1 << 64], True)]  # fmt: skip
    return out


def gen_header(world: World, seed: int) -> Iterator[Case]:
    for base in BASES:
        doc = world.bases[base].doc
        for name, e in doc.tensors.items():
            core = name.endswith((".raw", ".mean", ".step")) and name.startswith("chunk.000000") or name == "input_ids"
            for code in [*BITS, *NOT_DTYPES]:
                if code == e.dtype:
                    continue
                label = code if isinstance(code, str) and code else repr(code)

                def set_dtype(d: Doc, w: World, name: str = name, code: Any = code) -> None:
                    d.tensors[name].dtype = code

                known = isinstance(code, str) and code in BITS
                same = known and BITS[code] == BITS[e.dtype]
                yield from _mode_cases(
                    "header",
                    base,
                    name,
                    f"dtype={label}",
                    set_dtype,
                    MUST,
                    core=core and same and code in ("BF16", "I16", "U16", "U32", "F32", "F64"),
                )
                if known and not same:
                    shape = _reshape_bytes(e.shape, e.dtype, code)
                    if shape is not None and shape != e.shape:

                        def set_both(d: Doc, w: World, name: str = name, code: Any = code, shape: Any = shape) -> None:
                            d.tensors[name].dtype, d.tensors[name].shape = code, shape

                        yield from _mode_cases("header", base, name, f"dtype={code}+shape={shape}", set_both, MUST,
                                               core=core and code in ("I64", "F64"))  # fmt: skip
            for label, shape, iso in _shape_variants(list(e.shape)):

                def set_shape(d: Doc, w: World, name: str = name, shape: Any = shape) -> None:
                    d.tensors[name].shape = copy.deepcopy(shape)

                yield from _mode_cases("header", base, name, f"shape={label}", set_shape, MUST, isolate=iso,
                                       core=name == "input_ids" and label == "2xhalf")  # fmt: skip
            # Offsets: the same bytes under another same-sized tensor's name (a data swap the header allows).
            partners = [m for m, f in doc.tensors.items() if m != name and len(f.data) == len(e.data) and e.data]
            for m in partners[:3]:

                def swap(d: Doc, w: World, a: str = name, b: str = m) -> None:
                    ta, tb = d.tensors[a], d.tensors[b]
                    ta.data, tb.data = tb.data, ta.data
                    ia, ib = d.layout.index(a), d.layout.index(b)
                    d.layout[ia], d.layout[ib] = b, a

                same_kind = doc.tensors[m].dtype == e.dtype and doc.tensors[m].shape == e.shape
                yield from _mode_cases("header", base, name, f"offsets<->{m}", swap, MAY if same_kind else MUST)
            for label, fn in _offset_hooks(name):
                if not e.data and label in ("from0", "empty"):
                    continue  # an empty tensor's span may sit anywhere: [0, 0] is as good as [b, b]

                def hook(d: Doc, w: World, fn: Any = fn) -> None:
                    d.header_hooks.append(fn)

                yield from _mode_cases("header", base, name, f"offsets={label}", hook, MUST, modes=("stale", "all"))
            for label, value in (("no-dtype", "dtype"), ("no-shape", "shape"), ("no-offsets", "data_offsets")):

                def drop(d: Doc, w: World, name: str = name, key: str = value) -> None:
                    d.tensors[name].fields[key] = MISSING

                yield from _mode_cases("header", base, name, label, drop, MUST, modes=("stale", "all"))

            def unknown_field(d: Doc, w: World, name: str = name) -> None:
                d.tensors[name].fields["x"] = 1

            yield from _mode_cases("header", base, name, "entry+x", unknown_field, EITHER, modes=("stale", "all"))
            for label, value in (("null", None), ("list", []), ("str", "F16")):

                def entry_hook(d: Doc, w: World, name: str = name, value: Any = value) -> None:
                    d.header_hooks.append(lambda h: h.__setitem__(name, copy.deepcopy(value)))

                yield from _mode_cases("header", base, name, f"entry={label}", entry_hook, MUST, modes=("stale",))

            def remove(d: Doc, w: World, name: str = name) -> None:
                del d.tensors[name]
                d.layout.remove(name)

            yield from _mode_cases("header", base, name, "removed", remove, MUST, core=name == "input_ids"
                                   or name.endswith("000000.layer_bytes"))  # fmt: skip
            renames = [name + "x", name.upper(), name + " ", "chunk.000099." + name.rsplit(".", 1)[-1]]
            if name.startswith("chunk."):
                i = int(name.split(".")[1])
                renames.append(f"chunk.{i + 1:06d}.{name.rsplit('.', 1)[-1]}")
                renames.append(f"chunk.{i}.{name.rsplit('.', 1)[-1]}")
            for new in renames:

                def rename(d: Doc, w: World, old: str = name, new: str = new) -> None:
                    if new in d.tensors:
                        return
                    d.tensors = {(new if k == old else k): v for k, v in d.tensors.items()}
                    d.layout = [new if k == old else k for k in d.layout]

                yield from _mode_cases("header", base, name, f"rename={new!r}", rename, MUST)

            def duplicate(d: Doc, w: World, name: str = name) -> None:
                d.tensors[name + ".copy"] = dataclasses.replace(d.tensors[name])
                d.layout.append(name + ".copy")

            yield from _mode_cases("header", base, name, "duplicated", duplicate, MUST)
        for label, entry in (
            ("junk", Entry("U8", [3], b"abc")),
            ("chunk0-extra", Entry("F16", [2], bytes(4))),
            ("chunk-next", Entry("U8", [1], b"\0")),
            ("empty-name", Entry("U8", [0], b"")),
        ):
            tname = {"junk": "junk", "chunk0-extra": "chunk.000000.extra", "empty-name": "",
                     "chunk-next": f"chunk.{len(_chunks_of(doc.kv)):06d}.zstd"}[label]  # fmt: skip

            def add(d: Doc, w: World, tname: str = tname, entry: Entry = entry) -> None:
                d.tensors[tname] = dataclasses.replace(entry)
                d.layout.append(tname)

            yield from _mode_cases("header", base, "tensors", f"added={label}", add, MUST)
        yield from _metadata_cases(base)
        yield from _header_text_cases(base, world)


def _offset_hooks(name: str) -> list[tuple[str, Callable[[dict[str, Any]], None]]]:
    def mod(f: Callable[[list[int]], Any]) -> Callable[[dict[str, Any]], None]:
        def hook(h: dict[str, Any]) -> None:
            h[name]["data_offsets"] = f(list(h[name]["data_offsets"]))

        return hook

    return [("shift+1", mod(lambda o: [o[0] + 1, o[1] + 1])), ("end+1", mod(lambda o: [o[0], o[1] + 1])),
            ("reversed", mod(lambda o: [o[1], o[0]])), ("empty", mod(lambda o: [o[0], o[0]])),
            ("from0", mod(lambda o: [0, o[1] - o[0]])), ("three", mod(lambda o: [*o, 0])),
            ("str", mod(lambda o: str(o))), ("float", mod(lambda o: [float(o[0]), o[1]])),
            ("neg", mod(lambda o: [-1, o[1] - o[0] - 1])), ("2e64", mod(lambda o: [o[0], 1 << 64])),
            ("null", mod(lambda o: None))]  # fmt: skip


def _metadata_cases(base: str) -> Iterator[Case]:
    variants: list[tuple[str, Any, bool]] = [
        ("null", None, True), ("missing", MISSING, False), ("string", "pt", False), ("list", [], False),
        ("empty", {}, False), ("no-kvtool", {"format": "pt"}, False), ("no-format", {"kvtool": KV}, False),
        ("format=np", {"format": "np", "kvtool": KV}, False), ("extra-key", {"format": "pt", "kvtool": KV, "x": "y"},
        False), ("kvtool-object", {"format": "pt", "kvtool": {"schema": "kvtool.kvz"}}, False),
        ("kvtool-number", {"format": "pt", "kvtool": 1}, False), ("kvtool-null", {"format": "pt", "kvtool": None},
        False)]  # fmt: skip
    for label, value, core in variants:

        def set_meta(d: Doc, w: World, value: Any = value) -> None:
            d.stmeta = copy.deepcopy(value)

        yield from _mode_cases("header", base, "__metadata__", f"={label}", set_meta, MUST, modes=("stale",),
                               core=core)  # fmt: skip
    for label, text in (("null", "null"), ("list", "[]"), ("number", "1"), ("brace", "{"), ("empty", ""),
                        ("true", "true"), ("nested-string", json.dumps("{}")), ("bom", "\ufeff{}")):  # fmt: skip

        def set_raw(d: Doc, w: World, text: str = text) -> None:
            d.kv_raw = text

        yield from _mode_cases("header", base, "__metadata__.kvtool", f"={label}", set_raw, MUST, modes=("stale",))


def _header_text_cases(base: str, world: World) -> Iterator[Case]:
    data = world.bases[base].data
    n = int.from_bytes(data[:8], "little")
    size = len(data)

    def t(label: str, f: Callable[[bytes], bytes], declared: str = MUST, core: bool = False) -> Iterator[Case]:
        def add(d: Doc, w: World, f: Any = f) -> None:
            d.text_hooks.append(f)

        yield from _mode_cases("header", base, "header-text", label, add, declared, modes=("stale", "all"),
                               core=core)  # fmt: skip

    first = next(iter(world.bases[base].doc.tensors))
    yield from t("pad+8", lambda h: h + b" " * 8, EITHER)
    yield from t("pad-tabs", lambda h: h.rstrip(b" ") + b"\t" * (len(h) - len(h.rstrip(b" "))), EITHER)
    yield from t("pad-nul", lambda h: h.rstrip(b" ") + b"\0" * (len(h) - len(h.rstrip(b" "))))
    yield from t("lead-space", lambda h: (b" " + h[:-1]) if h.endswith(b" ") else (b" " + h))
    yield from t("bom", lambda h: b"\xef\xbb\xbf" + h)
    yield from t("trailing-garbage", lambda h: h.rstrip(b" ") + b"x" + b" " * 7)
    yield from t("bad-utf8", lambda h: h.replace(b'"format"', b'"form\xff\xfe"', 1))
    esc = f"\\u{ord(first[0]):04x}{first[1:]}".encode()
    yield from t("escaped-name", lambda h: h.replace(f'"{first}"'.encode(), b'"' + esc + b'"', 1), EITHER)
    yield from t("dup-tensor", lambda h: h.replace(b',"' + first.encode() + b'":', b',"' + first.encode() + b'":{},"'
                 + first.encode() + b'":', 1))  # fmt: skip
    yield from t("dup-metadata", lambda h: h.replace(b'{"__metadata__":', b'{"__metadata__":{},"__metadata__":', 1))
    for depth, core in ((100_000, True), (65, False), (1000, False)):
        nest = b"[" * depth + b"]" * depth
        yield from t(f"nest{depth}-entry", lambda h, nest=nest: h.replace(b'"data_offsets"', b'"x":' + nest +
                     b',"data_offsets"', 1), core=core)  # fmt: skip
        obj = b'{"a":' * depth + b"1" + b"}" * depth
        yield from t(f"nest{depth}-obj-metadata", lambda h, obj=obj: h.replace(b'"format":"pt"', b'"format":' + obj, 1))
    yield from t("nan-offset", lambda h: _replace_offset(h, first, b"NaN"))
    yield from t("inf-shape", lambda h: h.replace(b'"shape":[', b'"shape":[1e400,', 1))
    yield from t("float-offset", lambda h: _replace_offset(h, first, None))

    def many_tensors(count: int) -> Callable[[Doc, World], None]:
        def f(d: Doc, w: World) -> None:
            for k in range(count):
                d.tensors[f"t{k:07d}"] = Entry("U8", [0], b"")
                d.layout.append(f"t{k:07d}")

        return f

    for count in (300_000,):
        yield from _mode_cases("header", base, "tensors", f"added-{count}-empty", many_tensors(count), MUST,
                               modes=("stale",), isolate=True, heavy=True)  # fmt: skip

    def long_metadata(d: Doc, w: World) -> None:
        d.stmeta = {**d.stmeta, "x": "y" * 50_000_000}

    yield from _mode_cases("header", base, "__metadata__", "+50MB-string", long_metadata, MUST, modes=("stale",),
                           isolate=True, heavy=True)  # fmt: skip

    def b(label: str, f: Callable[[bytes], bytes], core: bool = False) -> Iterator[Case]:
        def add(d: Doc, w: World, f: Any = f) -> None:
            d.byte_hooks.append(f)

        yield from _mode_cases("header", base, "length", label, add, MUST, modes=("stale",), core=core)

    for label, value in (("N+8", n + 8), ("N-8", n - 8), ("N+1", n + 1), ("N-1", n - 1), ("0", 0), ("1", 1),
                         ("size-8", size - 8), ("size", size), ("1e8+1", 100_000_001), ("2e63", 1 << 63),
                         ("2e64-1", (1 << 64) - 1)):  # fmt: skip
        yield from b(f"N={label}", lambda x, v=value: v.to_bytes(8, "little") + x[8:])
    yield from b("short-prefix", lambda x: x[:5])
    yield from b("data+1", lambda x: x + b"\0")
    yield from b("data+8", lambda x: x + bytes(8))
    yield from b("data-1", lambda x: x[:-1])
    yield from b("header-only", lambda x: x[: 8 + n])
    yield from b("data-half", lambda x: x[: 8 + n + (size - 8 - n) // 2])


def _replace_offset(h: bytes, name: str, token: bytes | None) -> bytes:
    key = b'"' + name.encode() + b'":'
    i = h.find(key)
    j = h.find(b'"data_offsets":[', i) + len(b'"data_offsets":[')
    k = h.find(b",", j)
    new = token if token is not None else h[j:k] + b".0"
    return h[:j] + new + h[k:]


# -- (b) kvtool JSON edits -----------------------------------------------------------------------------------------


DELETE: Any = _Sentinel("DELETE")


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    parent = _get(obj, path[:-1])
    if value is DELETE:
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)


NAN, INF, NINF, BIG, NBIG = (Raw("NaN", float("nan")), Raw("Infinity", float("inf")), Raw("-Infinity", float("-inf")),
                             Raw("1e400", float("inf")), Raw("-1e400", float("-inf")))  # fmt: skip


def _deep(depth: int, kind: str = "list") -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth, [])
    return Raw('{"a":' * depth + "1" + "}" * depth, {})


def _mutations(path: tuple[Any, ...], v: Any) -> list[tuple[str, Any]]:
    """(label, new value) for the value at ``path``: generic per type, plus the field's own suspects."""
    out: list[tuple[str, Any]] = [("del", DELETE), ("null", None), ("true", True), ("false", False), ("0", 0),
                                  ("1", 1), ("-1", -1), ("2e31", 1 << 31), ("2e63", 1 << 63), ("1e30", 10**30),
                                  ("-2e63", -(1 << 63)), ("0.5", 0.5), ("str", "x"), ("emptystr", ""), ("list", []),
                                  ("wrap", [v]), ("obj", {}), ("NaN", NAN), ("Infinity", INF), ("-Infinity", NINF),
                                  ("1e400", BIG), ("-1e400", NBIG), ("nest100000", _deep(100_000)),
                                  ("nest65", _deep(65, "obj"))]  # fmt: skip
    if _is_int(v):
        out += [("+1", v + 1), ("-1d", v - 1), ("neg", -v), ("x2", 2 * v), ("float", float(v)), ("asstr", str(v)),
                ("+2e32", v + (1 << 32)), ("x1e6", v * 1_000_003)]  # fmt: skip
    elif isinstance(v, float):
        out += [("x2", v * 2), ("half", v / 2), ("neg", -v), ("zero", 0.0), ("subnormal", 5e-324), ("64", 64.0),
                ("64+", 64.00001), ("asint", int(v) if v.is_integer() else round(v)), ("asstr", repr(v))]  # fmt: skip
    elif isinstance(v, str):
        out += [("+x", v + "x"), ("upper", v.upper()), ("chop", v[:-1]), ("space", v + " "), ("x2", v * 2)]
        if v.startswith("sha256:"):
            out += [("zeros", "sha256:" + "0" * 64), ("HEX", "sha256:" + v[7:].upper()), ("md5", "md5:" + v[7:39])]
    elif isinstance(v, list):
        out += [("empty", []), ("drop-last", v[:-1]), ("dup-last", v + v[-1:]), ("reversed", v[::-1]),
                ("+null", [*v, None]), ("x2", v * 2)]  # fmt: skip
    elif isinstance(v, dict):
        out += [("empty", {}), ("+unknown", {**v, "zz_unknown": 1})]
        if v:
            k0 = sorted(v)[0]
            out += [("dupkey-same", Raw(_dup_key_text(v, k0, v[k0]), v)),
                    ("dupkey-other", Raw(_dup_key_text(v, k0, None), {**v, k0: None}))]  # fmt: skip
    elif v is None:
        out += [("digest", {"content_digest": "sha256:" + "0" * 64}), ("8", 8), ("strnull", "null")]
    last = path[-1] if path else None
    special = {
        "cache_dtype": [
            "int32",
            "float128",
            5,
            "Tensor",
            "bfloat16",
            "float16",
            "float32",
            "float64",
            "uint8",
            "int16",
            "complex64",
            "bool",
            "float8_e4m3fn",
            "qint8",
            "Size",
            "__class__",
        ],
        "mode": ["calibrated", "adaptive", "lossless", "LOSSLESS"],
        "_type": ["ProjectionCalibration", "PrecisionSearch", "Nope", "CodecSettings "],
        "_version": [0, 2, "1", 1.0],
        "schema": ["kvtool.kv_capture", "kvtool.kv_calibration", "kvtool.kvz2", "KVTOOL.KVZ"],
        "schema_version": [0, -1, 2, 1.0, "1", True],
        "level": [-100, 100, 6, 7, -7, -8, 0, 1.0],
        "rope_style": ["interleaved", "half "],
        "model_type": ["gemma3_text", "llama", "qwen2"],
        "layout": ["see docs/kvz.md ", "other"],
    }.get(last, [])
    out += [(f"={s!r}", s) for s in special]
    seen, uniq = [], []
    for label, new in out:
        if new is not DELETE and not isinstance(new, Raw) and type(new) is type(v) and new == v:
            continue
        if label in seen:
            continue
        seen.append(label)
        uniq.append((label, new))
    return uniq


def _dup_key_text(d: dict[str, Any], key: str, value: Any) -> str:
    body = dump_kv(d)
    return body[:-1] + ("," if len(body) > 2 else "") + json.dumps(key) + ":" + dump_kv(value) + "}"


def _valid_codec_int(path: tuple[Any, ...], new: Any) -> bool:
    last = path[-1]
    lim = {"lane_symbols": (1, 65533), "zstd_level": (-7, 22), "sink_tokens": (0, 1 << 24),
           "recent_tokens": (0, 1 << 24)}[last]  # fmt: skip
    return _is_int(new) and lim[0] <= new <= lim[1]


def classify_json(base: Base, path: tuple[Any, ...], old: Any, new: Any) -> str:
    """What a consistent forgery of one field must give (see the module docstring)."""
    if path == ("content_digest",):
        # version 2: the decoder does not check the whole-file digest by design (inspect does); a malformed one is
        # still a format error any reader sees without hashing
        ok = isinstance(new, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", new) is not None
        return EITHER if ok and (plain(base.doc.kv).get("schema_version", 1) >= 2) else MUST
    if path == ("schema_version",):
        # an older version this reader still reads, every checksum recomputed as that version: a valid file
        return EITHER if _is_int(new) and 1 <= new <= old else MUST
    if path[:1] == ("producer",):
        ok = path in (("producer", "name"), ("producer", "version")) and isinstance(new, str)
        return EITHER if ok else MUST
    if path == ("model", "id"):
        return EITHER if isinstance(new, str) and new else MUST
    if path == ("extra", "layout"):
        return EITHER if isinstance(new, str) else MUST
    data = ("method", "_data")
    if path == (*data, "quality"):
        ok = isinstance(new, int | float) and not isinstance(new, bool | Raw) and 0 < new <= 64
        return EITHER if ok else MUST
    if path[:2] == data and len(path) == 3 and path[2] in ("lane_symbols", "zstd_level", "sink_tokens",
                                                            "recent_tokens"):  # fmt: skip
        return EITHER if _valid_codec_int(path, new) else MUST
    if path == (*data, "level"):
        if not _is_int(new):
            return MUST
        if base.mode != "calibrated":
            return EITHER if -(1 << 24) <= new <= 1 << 24 else MUST
        n_levels = 7
        if not -n_levels <= new < n_levels:
            return MUST
        return EITHER if new % n_levels == old % n_levels else MAY
    if path == ("extra", "cache_dtype") and base.mode != "lossless":
        return EITHER if new in ("float16", "bfloat16", "float32") else MUST
    return MUST


_CORE_JSON = {
    ("extra", "cache_dtype"): ("int32", "float128", 5, "Tensor"),
    ("schema_version",): (0, -1, 1.0, True),
    ("inputs", "tokenizer_digest"): ("sha256:" + "0" * 64,),
    ("extra", "chunks", 1, "start"): ("+1",),
    ("extra", "chunks", 0, "index"): ("+1",),
    ("extra", "chunks", 0, "stop"): ("-1d",),
    ("extra", "layers", 0, 0): ("+1",),
    ("method", "_data", "chunk_tokens"): ("float",),
    ("method", "_data", "level"): (100, -100),
    ("method", "_data", "sink_tokens"): ("+1",),
    ("method", "_data", "recent_tokens"): ("+1",),
    ("model", "arch", "num_layers"): ("+1",),
    ("model", "arch", "num_kv_heads"): ("+1",),
    ("model", "arch", "sliding_window"): ("+1", 8),
    ("extra", "layout"): ("nest100000",),
    ("inputs", "tokens"): ("NaN", "1e400", "Infinity"),
    ("model", "weights_digest"): ("zeros",),
}


def _is_core(path: tuple[Any, ...], label: str, new: Any) -> bool:
    want = _CORE_JSON.get(path, ())
    return label in want or (not isinstance(new, Raw) and any(type(w) is type(new) and w == new for w in want))


def gen_json(world: World, seed: int) -> Iterator[Case]:
    for base in BASES:
        b = world.bases[base]
        for path, v in _leaves(b.doc.kv):
            if not path:
                continue
            for label, new in _mutations(path, v):
                declared = MUST if new is DELETE else classify_json(b, path, v, new)
                if new is DELETE and path[0] in ("producer",) and len(path) == 1:
                    declared = MUST
                if isinstance(new, Raw):
                    declared = MUST

                def edit(d: Doc, w: World, path: tuple[Any, ...] = path, new: Any = new) -> None:
                    _set(d.kv, path, new)

                iso = (_is_int(new) and abs(new) >= 1 << 20) or label.startswith("x1e6")
                core = _is_core(path, label, new)
                tok = path == ("inputs", "tokenizer_digest")
                yield from _mode_cases("json", base, _path_str(path), label, edit, declared, isolate=iso, core=core,
                                       load_cache=tok)  # fmt: skip
        for label in ("+unknown-top", "+unknown-extra", "+unknown-inputs", "+unknown-model", "+unknown-chunk0",
                      "+unknown-data", "+unknown-arch"):  # fmt: skip
            where = {"+unknown-top": (), "+unknown-extra": ("extra",), "+unknown-inputs": ("inputs",),
                     "+unknown-model": ("model",), "+unknown-chunk0": ("extra", "chunks", 0),
                     "+unknown-data": ("method", "_data"), "+unknown-arch": ("model", "arch")}[label]  # fmt: skip

            def add_key(d: Doc, w: World, where: tuple[Any, ...] = where) -> None:
                _get(d.kv, where)["zz_unknown"] = 1

            yield from _mode_cases("json", base, _path_str(where), label, add_key, MUST, core=label == "+unknown-top")
        yield from _compound_cases(world, base)


def _consistent_geometry(d: Doc, tokens: int, chunk_tokens: int, arch: dict[str, Any] | None = None) -> None:
    """Set ``inputs.tokens`` / ``chunk_tokens`` (and the arch) and rewrite the chunk table and ``extra.layers`` so
    they agree with them (the crc32 of each existing chunk kept): a forger's consistent metadata."""
    from kvtool.arch import ArchInfo

    kv = d.kv
    if arch is not None:
        kv["model"]["arch"] = arch
    info = ArchInfo(**{**kv["model"]["arch"], "layer_types": tuple(kv["model"]["arch"]["layer_types"])})
    kv["inputs"]["tokens"] = tokens
    kv["method"]["_data"]["chunk_tokens"] = chunk_tokens
    old = kv["extra"]["chunks"]
    n = int(-(-tokens // chunk_tokens))
    kv["extra"]["chunks"] = [{"index": i, "start": i * chunk_tokens, "stop": min((i + 1) * chunk_tokens, tokens),
                              "crc32": old[i]["crc32"] if i < len(old) else 0} for i in range(n)]  # fmt: skip
    kv["extra"]["layers"] = [[tokens - info.cached_tokens(i, tokens), tokens] for i in range(info.num_layers)]


def _arch_digest(d: Doc) -> None:
    from kvtool.digests import sha256_json

    d.kv["model"]["config_digest"] = sha256_json(d.kv["model"]["arch"])


def _compound_cases(world: World, base: str) -> Iterator[Case]:
    b = world.bases[base]
    n_chunks = len(b.doc.kv["extra"]["chunks"])
    ct = b.doc.kv["method"]["_data"]["chunk_tokens"]
    T = b.tokens

    def c(label: str, fn: Callable[[Doc, World], Any], declared: str = MUST, iso: bool = False, core: bool = False,
          **kw: Any) -> Iterator[Case]:  # fmt: skip
        yield from _mode_cases("json", base, "compound", label, fn, declared, isolate=iso, core=core, **kw)

    pers = dict.fromkeys((1_000_000, 1 << 22, (1 << 24) // n_chunks, 1 << 40))
    for per, core in ((p, p == 1_000_000) for p in pers):
        yield from c(f"tokens={n_chunks}x{per}", lambda d, w, per=per: _consistent_geometry(d, n_chunks * per, per),
                     iso=True, core=core)  # fmt: skip
    yield from c("tokens=2e24+1", lambda d, w: _consistent_geometry(d, (1 << 24) + 1, (1 << 24) + 1), iso=True)

    def huge_with_ids(d: Doc, w: World, per: int) -> None:
        """The huge geometry with an ``input_ids`` of that length too (and its digest): every tensor of a
        lossless file then has the dtype and shape the format asks for."""
        _consistent_geometry(d, n_chunks * per, per)
        ids = np.resize(np.frombuffer(d.tensors["input_ids"].data, "<i4"), n_chunks * per).astype("<i4")
        d.tensors["input_ids"] = Entry("I32", [n_chunks * per], ids.tobytes())
        fix_ids_digest(d)

    for per, core in ((1_000_000, True), (1 << 21, False)):
        yield from c(f"tokens={n_chunks}x{per}+input_ids", lambda d, w, per=per: huge_with_ids(d, w, per), iso=True,
                     core=core and b.mode == "lossless")  # fmt: skip
    yield from c("tokens-1", lambda d, w: _consistent_geometry(d, T - 1, ct), core=True)
    yield from c("tokens+1", lambda d, w: _consistent_geometry(d, T + 1, ct))
    yield from c("chunk_tokens+1", lambda d, w: _consistent_geometry(d, T, ct + 1))
    yield from c("chunk_tokens=T", lambda d, w: _consistent_geometry(d, T, T))
    yield from c("chunk_tokens=float", lambda d, w: _consistent_geometry(d, T, float(ct)), core=True)

    def arch_edit(**changes: Any) -> Callable[[Doc, World], None]:
        def f(d: Doc, w: World) -> None:
            arch = {**d.kv["model"]["arch"], **changes}
            if "num_layers" in changes and "layer_types" not in changes:
                lt = d.kv["model"]["arch"]["layer_types"]
                arch["layer_types"] = (lt * changes["num_layers"])[: changes["num_layers"]]
            _consistent_geometry(d, T, ct, arch)

        return f

    arch = b.doc.kv["model"]["arch"]
    L, H, D, W = arch["num_layers"], arch["num_kv_heads"], arch["head_dim"], arch["sliding_window"]
    variants: list[tuple[str, dict[str, Any], bool, bool]] = [
        ("layers+1", dict(num_layers=L + 1), False, True), ("layers-1", dict(num_layers=L - 1), False, False),
        ("heads/2,dim*2", dict(num_kv_heads=max(1, H // 2), num_heads=arch["num_heads"], head_dim=D * 2), False, True),
        ("dim=2e20", dict(head_dim=1 << 20), True, False), ("heads=2e24", dict(num_kv_heads=1 << 24,
        num_heads=1 << 24), True, False), ("layers=4096", dict(num_layers=4096), True, False),
        ("window=16", dict(sliding_window=16), False, True), ("window=2", dict(sliding_window=2), False, False),
        ("window=null", dict(sliding_window=None), False, False),
        ("types-swapped", dict(layer_types=["full_attention" if t == "sliding_attention" else "sliding_attention"
                                            for t in arch["layer_types"]]), False, False),
        ("rope-theta", dict(rope={"rope_theta": 1.0, "rope_type": "default"}), False, False)]  # fmt: skip
    if W is None:
        variants.append(("window=4-all-sliding", dict(sliding_window=4, layer_types=["sliding_attention"] * L), False,
                         False))  # fmt: skip
    yield from c("arch:layers=2e24-bare", lambda d, w: d.kv["model"]["arch"].__setitem__("num_layers", 1 << 24),
                 iso=True)  # fmt: skip
    for label, ch, iso, core in variants:
        yield from c(f"arch:{label}", arch_edit(**ch), iso=iso, core=core)

        def with_digest(d: Doc, w: World, ch: dict[str, Any] = ch) -> None:
            arch_edit(**ch)(d, w)
            _arch_digest(d)

        yield from c(f"arch:{label}+config_digest", with_digest, iso=iso, core=core)
    other = "gemma3" if b.arch == "llama" else "llama"

    def other_model(d: Doc, w: World) -> None:
        m = w.lms[other]
        d.kv["model"] = {**w.lms[other].fingerprint, "arch": m.arch.to_dict()}
        _consistent_geometry(d, T, ct)

    yield from c("model=other-arch", other_model)
    yield from c("weights_digest", lambda d, w: d.kv["model"].__setitem__("weights_digest", "sha256:" + "2" * 64))
    yield from c("config_digest", lambda d, w: d.kv["model"].__setitem__("config_digest", "sha256:" + "3" * 64))
    s = b.doc.kv["method"]["_data"]
    for label, key, delta in (
        ("sink+1", "sink_tokens", 1),
        ("recent+1", "recent_tokens", 1),
        ("sink-1", "sink_tokens", -1),
        ("sink=T", "sink_tokens", T - s["sink_tokens"]),
    ):
        if s[key] + delta < 0:
            continue
        yield from c(label, lambda d, w, key=key, delta=delta: d.kv["method"]["_data"].__setitem__(
            key, d.kv["method"]["_data"][key] + delta), EITHER, core=b.mode == "lossless" and delta == 1)  # fmt: skip
    cal_digest = parse(world.cal_bytes["pca-" + b.arch]).kv["content_digest"]
    if b.mode != "calibrated":

        def to_cal(d: Doc, w: World, with_digest: bool) -> None:
            d.kv["method"]["_data"].update(mode="calibrated", level=0)
            if with_digest:
                d.kv["inputs"]["calibration"] = {"content_digest": cal_digest}

        yield from c("mode=calibrated", lambda d, w: to_cal(d, w, False), core=True)
        yield from c("mode=calibrated+calibration", lambda d, w: to_cal(d, w, True) or {"cal": "pca-" + b.arch},
                     core=True)  # fmt: skip
    else:

        def to_adaptive(d: Doc, w: World) -> None:
            d.kv["method"]["_data"]["mode"] = "adaptive"
            d.kv["inputs"]["calibration"] = None

        yield from c("mode=adaptive", to_adaptive)
        yield from c("calibration=null", lambda d, w: d.kv["inputs"].__setitem__("calibration", None))
        for lv in range(-7, 7):
            if lv % 7 == 6:
                continue
            yield from c(f"level={lv}", lambda d, w, lv=lv: d.kv["method"]["_data"].__setitem__("level", lv), MAY)
    if b.mode != "lossless":

        def to_lossless(d: Doc, w: World) -> None:
            d.kv["method"]["_data"]["mode"] = "lossless"
            d.kv["inputs"]["calibration"] = None

        yield from c("mode=lossless", to_lossless)
    else:
        yield from c("mode=adaptive", lambda d, w: d.kv["method"]["_data"].__setitem__("mode", "adaptive"))
    for dt in ("float16", "bfloat16", "float64", "int32"):
        yield from c(f"cache_dtype={dt}", lambda d, w, dt=dt: d.kv["extra"].__setitem__("cache_dtype", dt),
                     MUST if b.mode == "lossless" or dt not in ("float16", "bfloat16") else EITHER)  # fmt: skip
    yield from c("chunk-table-62500", lambda d, w: _consistent_geometry(d, 62500 * 16, 16), iso=True)
    yield from c("huge-model-id", lambda d, w: d.kv["model"].__setitem__("id", "x" * 10_000_000), EITHER, iso=True)
    yield from c("tokenizer-digest=other", lambda d, w: d.kv["inputs"].__setitem__(
        "tokenizer_digest", "sha256:" + "4" * 64), core=True, load_cache=True)  # fmt: skip


# -- (c) chunk-tensor edits ----------------------------------------------------------------------------------------


def _np(e: Entry) -> np.ndarray:
    return np.frombuffer(e.data, NP[e.dtype]).copy()


def _value_edits(name: str, e: Entry, rng: random.Random, vocab: int) -> list[tuple[str, Callable[[np.ndarray], Any],
                                                                                 str]]:  # fmt: skip
    """(label, in-place edit of the element array, declared) for one tensor."""
    kind = name.rsplit(".", 1)[-1]
    n = len(e.data) // max(1, BITS.get(e.dtype, 8) // 8)
    if n == 0:
        return []
    i = rng.randrange(n)
    j = (i + 1 + rng.randrange(max(1, n - 1))) % n if n > 1 else i

    def put(value: Any, at: int = i) -> Callable[[np.ndarray], None]:
        def f(a: np.ndarray) -> None:
            a[at] = value

        return f

    def add(delta: int, at: int = i) -> Callable[[np.ndarray], None]:
        def f(a: np.ndarray) -> None:
            a[at] = a[at] + delta

        return f

    def pair(at: int, other: int) -> Callable[[np.ndarray], None]:
        def f(a: np.ndarray) -> None:
            a[at] += 1
            a[other] -= 1

        return f

    def swap(a: np.ndarray) -> None:
        a[i], a[j] = a[j].copy(), a[i].copy()

    if kind in ("raw", "mean", "step"):
        out = [(f"[{i}]={v}", put(np.float16(v)), MAY) for v in ("0", "-0.0", "nan", "inf", "-inf", "65504", "6e-8")]
        out += [(f"[{i}]*2", lambda a: a.__setitem__(i, a[i] * np.float16(2)), MAY),
                (f"[{i}]neg", lambda a: a.__setitem__(i, -a[i]), MAY), (f"swap[{i},{j}]", swap, MAY)]  # fmt: skip
        if kind == "step":
            out.append((f"[{i}]=-1", put(np.float16(-1)), MAY))
        return out
    if kind == "words":
        return [(f"[{i}]=0", put(0), MAY), (f"[{i}]=65535", put(65535), MAY), (f"[{i}]^1", lambda a: a.__setitem__(
                i, a[i] ^ 1), MAY), (f"swap[{i},{j}]", swap, MAY)]  # fmt: skip
    if kind == "lanes":
        out = [(f"[{i}]=0", put(0), MUST), (f"[{i}]=1", put(1), MUST), (f"[{i}]=65535", put(65535), MUST),
               (f"[{i}]+1", add(1), MUST), (f"[{i}]=67", put(67), MUST)]  # fmt: skip
        if n > 1:
            out += [(f"[{i}]+1,[{j}]-1", pair(i, j), MAY), (f"swap[{i},{j}]", swap, MAY)]
        return out
    if kind == "layer_lanes":
        return [(f"[{i}]=-1", put(-1), MUST), (f"[{i}]=0", put(0), MUST), (f"[{i}]+1", add(1), MUST),
                (f"[{i}]=2e31-1", put(2**31 - 1), MUST), (f"swap[{i},{j}]", swap, MUST), (f"[{i}]+1,[{j}]-1",
                pair(i, j), MUST)]  # fmt: skip
    if kind == "freq":
        cols = 2 * 63 + 1
        r, k = divmod(i, cols)
        k2 = (k + 1) % cols
        return [(f"[{r},{k}]=0", put(0), MUST), (f"[{r},{k}]=-1", put(-1), MUST), (f"[{r},{k}]=4096", put(4096), MUST),
                (f"[{r},{k}]+1", add(1), MUST), (f"[{r},{k}]+1,[{r},{k2}]-1", pair(i, r * cols + k2), MAY),
                (f"swap[{i},{j}]", swap, MAY)]  # fmt: skip
    if kind == "layer_bytes":
        out = [(f"[{i}]=-1", put(-1), MUST), (f"[{i}]=0", put(0), MUST), (f"[{i}]+1", add(1), MUST),
               (f"[{i}]=2e62", put(1 << 62), MUST), (f"[{i}]=-2e62", put(-(1 << 62)), MUST)]  # fmt: skip
        if n > 1:
            out += [(f"[{i}]+1,[{j}]-1", pair(i, j), MAY), (f"swap[{i},{j}]", swap, MAY)]
        return out
    if kind == "input_ids":
        return [(f"[{i}]+1", add(1), MAY), (f"[{i}]=-1", put(-1), MUST), (f"[{i}]={vocab}", put(vocab), MUST),
                (f"[{i}]=2e31-1", put(2**31 - 1), MUST), (f"swap[{i},{j}]", swap, MAY)]  # fmt: skip
    return []


def gen_chunk(world: World, seed: int) -> Iterator[Case]:
    for base in BASES:
        b = world.bases[base]
        vocab = b.lm.arch.vocab_size
        for name, e in b.doc.tensors.items():
            if not (name.startswith("chunk.") or name == "input_ids"):
                continue
            rng = random.Random(f"{seed}/{base}/{name}")
            is_ids = name == "input_ids"
            modes = MODES
            # Bytes: flips, set bytes, whole-tensor edits.
            byte_edits: list[tuple[str, Callable[[bytes], bytes], str]] = []
            if e.data:
                for _ in range(3):
                    p, bit = rng.randrange(len(e.data)), rng.randrange(8)
                    byte_edits.append((f"flip[{p}.{bit}]", lambda x, p=p, bit=bit: _setbyte(x, p, x[p] ^ (1 << bit)),
                                       MAY))  # fmt: skip
                p = rng.randrange(len(e.data))
                byte_edits += [
                    (f"byte[{p}]=00", lambda x, p=p: _setbyte(x, p, 0), MAY),
                    (f"byte[{p}]=ff", lambda x, p=p: _setbyte(x, p, 255), MAY),
                    ("zeros", lambda x: bytes(len(x)), MAY),
                    ("ones", lambda x: b"\xff" * len(x), MAY),
                ]
            byte_edits = list({label: (label, f, d) for label, f, d in byte_edits}.values())
            for label, f, declared in byte_edits:

                def edit(d: Doc, w: World, name: str = name, f: Any = f) -> None:
                    d.tensors[name].data = f(d.tensors[name].data)

                decl = _bytes_declared(name, declared)
                yield from _mode_cases("chunk", base, name, label, _ids_guard(edit, vocab) if is_ids else edit, decl,
                                       modes=modes, load_cache=is_ids)  # fmt: skip
                if is_ids:

                    def edit_fix(d: Doc, w: World, name: str = name, f: Any = f) -> None:
                        edit(d, w, name, f)
                        fix_ids_digest(d)

                    yield from _mode_cases("chunk", base, name, label + "+ids_digest", _ids_guard(edit_fix, vocab),
                                           decl, modes=modes, load_cache=True)  # fmt: skip
            # Length: one element fewer / more / none (the header follows, so it stays a valid safetensors file).
            size = BITS.get(e.dtype, 8) // 8
            for label, f in (("drop-last", lambda x, s=size: x[:-s] if len(x) >= s else x),
                             ("dup-last", lambda x, s=size: x + x[-s:]), ("empty", lambda x: b"")):  # fmt: skip
                if not e.data and label != "dup-last":
                    continue

                def resize(d: Doc, w: World, name: str = name, f: Any = f, size: int = size) -> None:
                    t = d.tensors[name]
                    t.data = f(t.data) if t.data else bytes(size)
                    if len(t.shape) == 1:
                        t.shape = [len(t.data) // size]
                    else:
                        row = math.prod(t.shape[1:]) * size
                        if len(t.data) % row:
                            t.data = t.data[: len(t.data) // row * row]
                        t.shape = [len(t.data) // row, *t.shape[1:]]

                yield from _mode_cases("chunk", base, name, label, resize, MUST, modes=modes)
            # Values inside the elements.
            if e.dtype in NP:
                for label, f, declared in _value_edits(name, e, rng, vocab):

                    def vedit(d: Doc, w: World, name: str = name, f: Any = f) -> None:
                        t = d.tensors[name]
                        a = np.frombuffer(t.data, NP[t.dtype]).copy()
                        with np.errstate(all="ignore"):
                            f(a)
                        t.data = a.tobytes()

                    core = is_ids and label.endswith("+1")
                    yield from _mode_cases("chunk", base, name, label, _ids_guard(vedit, vocab) if is_ids else vedit,
                                           declared, modes=modes, isolate="2e" in label,
                                           load_cache=is_ids, core=core)  # fmt: skip
                    if is_ids:

                        def vfix(d: Doc, w: World, name: str = name, f: Any = f) -> None:
                            vedit(d, w, name, f)
                            fix_ids_digest(d)

                        yield from _mode_cases("chunk", base, name, label + "+ids_digest", _ids_guard(vfix, vocab),
                                               declared, modes=modes, load_cache=True, core=core)  # fmt: skip
            if name.endswith(".zstd"):
                yield from _zstd_cases(world, base, name)


def _ids_guard(fn: Callable[[Doc, World], Any], vocab: int) -> Callable[[Doc, World], Any]:
    """An ``input_ids`` edit whose ids leave the model's vocabulary is detectable (``model.arch.vocab_size``)."""

    def g(d: Doc, w: World) -> Any:
        over = fn(d, w) or {}
        t = d.tensors.get("input_ids")
        if t is not None and t.dtype == "I32" and len(t.data) % 4 == 0:
            a = np.frombuffer(t.data, "<i4")
            if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab):
                over["declared"] = MUST
        return over

    return g


def _bytes_declared(name: str, declared: str) -> str:
    """Any change to an index (lanes per layer, words per lane, bytes per layer, a table row) breaks a sum or a
    count the geometry fixes: detectable in principle."""
    kind = name.rsplit(".", 1)[-1]
    return MUST if kind in ("layer_lanes", "layer_bytes", "lanes", "freq") else declared


def _setbyte(x: bytes, p: int, v: int) -> bytes:
    return x[:p] + bytes([v]) + x[p + 1 :]


def _zstd_cases(world: World, base: str, name: str) -> Iterator[Case]:
    import zstandard

    b = world.bases[base]
    chunk = name.split(".")[1]
    lb_name = f"chunk.{chunk}.layer_bytes"
    sizes = np.frombuffer(b.doc.tensors[lb_name].data, "<i8").tolist()
    live = [i for i, s in enumerate(sizes) if s > 0]
    if not live:
        return
    layer = live[-1]
    blob = b.doc.tensors[name].data
    starts = np.cumsum([0, *sizes]).tolist()
    frame = blob[starts[layer] : starts[layer + 1]]
    plain_bytes = zstandard.ZstdDecompressor().decompress(frame)

    def replace(make_frame: Callable[[World], bytes], fix_sizes: bool = True) -> Callable[[Doc, World], None]:
        def f(d: Doc, w: World) -> None:
            new = make_frame(w)
            d.tensors[name].data = blob[: starts[layer]] + new + blob[starts[layer + 1] :]
            d.tensors[name].shape = [len(d.tensors[name].data)]
            if fix_sizes:
                s = list(sizes)
                s[layer] = len(new)
                d.tensors[lb_name].data = np.array(s, "<i8").tobytes()

        return f

    zeros = bytes(len(plain_bytes))
    variants: list[tuple[str, Callable[[World], bytes], str, bool, bool]] = [
        ("bomb-1GiB", lambda w: w.bomb("real"), MUST, True, True),
        ("bomb-nosize", lambda w: w.bomb("nosize"), MUST, True, False),
        ("declares-1GiB", lambda w: w.bomb("declare1g"), MUST, True, True),
        ("declares-2e62", lambda w: w.bomb("declare2e62"), MUST, True, False),
        ("zeros-right-size", lambda w: zstandard.ZstdCompressor().compress(zeros), MAY, False, False),
        ("zeros-no-content-size", lambda w: zstandard.ZstdCompressor(write_content_size=False).compress(zeros), MAY,
         False, False),
        ("two-frames", lambda w: frame + frame, EITHER, False, False),
        ("trailing-junk", lambda w: frame + b"junk", EITHER, False, False),
        ("skippable-prefix", lambda w: b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + frame, EITHER, False, False),
        ("short-by-1", lambda w: zstandard.ZstdCompressor().compress(plain_bytes[:-1]), MUST, False, False),
        ("long-by-1", lambda w: zstandard.ZstdCompressor().compress(plain_bytes + b"\0"), MUST, False, False),
        ("empty", lambda w: b"", MUST, False, False),
        ("lies-size", lambda w: zstd_declaring(len(plain_bytes) * 2, plain_bytes), MUST, False, False),
    ]  # fmt: skip
    for label, mk, declared, iso, core in variants:
        yield from _mode_cases("chunk", base, name, f"layer{layer}:{label}", replace(mk), declared, isolate=iso,
                               core=core)  # fmt: skip
    yield from _mode_cases("chunk", base, name, f"layer{layer}:bomb-1GiB-sizes-stale",
                           replace(lambda w: w.bomb("real"), False), MUST, isolate=True)  # fmt: skip


# -- (d) cross-file mixes ------------------------------------------------------------------------------------------


def _chunk_group(doc: Doc, i: int) -> dict[str, Entry]:
    prefix = f"chunk.{i:06d}."
    return {n: e for n, e in doc.tensors.items() if n.startswith(prefix)}


def _transplant(d: Doc, src: Doc, i: int, j: int | None = None) -> None:
    """Replace chunk ``i``'s tensors of ``d`` by chunk ``j`` (default ``i``) of ``src``, renamed to ``i``."""
    j = i if j is None else j
    prefix, sprefix = f"chunk.{i:06d}.", f"chunk.{j:06d}."
    old = [n for n in d.tensors if n.startswith(prefix)]
    tensors = {n: e for n, e in d.tensors.items() if not n.startswith(prefix)}
    layout = [n for n in d.layout if not n.startswith(prefix)]
    for n, e in _chunk_group(src, j).items():
        new = prefix + n[len(sprefix) :]
        tensors[new] = dataclasses.replace(e)
        layout.append(new)
    order = {n: k for k, n in enumerate(d.tensors)}
    d.tensors = dict(sorted(tensors.items(), key=lambda kv: order.get(kv[0], len(order))))
    d.layout = layout
    del old


def gen_cross(world: World, seed: int) -> Iterator[Case]:
    for base in BASES:
        yield from _cross_for_base(world, base)


def _cross_for_base(world: World, base: str) -> Iterator[Case]:
    if True:
        b = world.bases[base]
        twin = parse(world.files[TWINS[base]])
        n = len(_chunks_of(b.doc.kv))
        other_arch = "gemma3" if b.arch == "llama" else "llama"
        for i in range(n):

            def from_twin(d: Doc, w: World, i: int = i) -> None:
                _transplant(d, twin, i)

            yield from _mode_cases("cross", base, f"chunk{i}", "from-twin", from_twin, MAY)

            def from_twin_crc(d: Doc, w: World, i: int = i) -> None:
                _transplant(d, twin, i)
                d.kv["extra"]["chunks"][i]["crc32"] = twin.kv["extra"]["chunks"][i]["crc32"]

            yield from _mode_cases("cross", base, f"chunk{i}", "from-twin+crc", from_twin_crc, MAY,
                                   modes=("stale", "meta", "content", "all"))  # fmt: skip
            other = parse(world.files[f"{other_arch}-{b.mode}"])
            if i < len(_chunks_of(other.kv)):
                yield from _mode_cases("cross", base, f"chunk{i}", f"from-{other_arch}",
                                       lambda d, w, i=i, other=other: _transplant(d, other, i), MUST)  # fmt: skip
            for mode in ("lossless", "adaptive", "calibrated"):
                if mode == b.mode:
                    continue
                src = parse(world.files[f"{b.arch}-{mode}"])
                if i < len(_chunks_of(src.kv)):
                    yield from _mode_cases("cross", base, f"chunk{i}", f"from-{mode}",
                                           lambda d, w, i=i, src=src: _transplant(d, src, i), MUST)  # fmt: skip
            if i + 1 < n:

                def swap_chunks(d: Doc, w: World, i: int = i) -> None:
                    src = d.copy()
                    _transplant(d, src, i, i + 1)
                    _transplant(d, src, i + 1, i)

                yield from _mode_cases("cross", base, f"chunk{i}", f"swapped-with-{i + 1}", swap_chunks, MAY)

        def ids_from_twin(d: Doc, w: World, digest: bool) -> None:
            d.tensors["input_ids"] = dataclasses.replace(twin.tensors["input_ids"])
            if digest:
                d.kv["inputs"]["token_ids_digest"] = twin.kv["inputs"]["token_ids_digest"]

        yield from _mode_cases("cross", base, "input_ids", "from-twin", lambda d, w: ids_from_twin(d, w, False), MAY,
                               load_cache=True)  # fmt: skip
        yield from _mode_cases("cross", base, "input_ids", "from-twin+digest", lambda d, w: ids_from_twin(d, w, True),
                               MAY, load_cache=True)  # fmt: skip

        def all_chunks_from_twin(d: Doc, w: World) -> None:
            for i in range(n):
                _transplant(d, twin, i)
                d.kv["extra"]["chunks"][i]["crc32"] = twin.kv["extra"]["chunks"][i]["crc32"]

        yield from _mode_cases("cross", base, "chunks", "all-from-twin", all_chunks_from_twin, MAY)
        # Whole files of another model / mode, decoded with this base's model.
        for key in dict.fromkeys((f"{other_arch}-{b.mode}", f"{other_arch}-adaptive")):

            def whole(w: World, key: str = key, base: str = base) -> Built:
                return Built(data=w.files[key], doc=parse(w.files[key]), cal=BASE_SPECS[key][3])

            yield Case("cross", f"cross/{base}/file/{key}@stale", base, whole, MUST)

            def whole_model(d: Doc, w: World, key: str = key) -> dict[str, Any]:
                src = parse(w.files[key])
                d.kv, d.tensors, d.layout, d.stmeta = src.kv, src.tensors, src.layout, src.stmeta
                d.kv["model"] = copy.deepcopy(b.doc.kv["model"])
                return {"cal": BASE_SPECS[key][3]}

            yield from _mode_cases("cross", base, "file", f"{key}+model-section", whole_model, MUST)
        yield from _calibration_cases(world, base)


def _calibration_cases(world: World, base: str) -> Iterator[Case]:
    b = world.bases[base]

    def with_cal(cal: Any, declared: str, label: str, core: bool = False, exits: tuple[int, ...] = (3,)) -> Case:
        def make(w: World) -> Built:
            return Built(data=b.data, doc=b.doc.copy(), cal=cal)

        return Case("cross", f"cross/{base}/calibration/{label}@stale", base, make, declared, core=core, exits=exits)

    others = ["pca-llama", "pca-gemma3", "pca-llama-3b"]
    if b.mode != "calibrated":
        for key in others:
            yield with_cal(key, EITHER, f"given-{key}")
        return
    yield with_cal(None, MUST, "none", core=True)
    for key in others:
        if key != b.cal:
            yield with_cal(key, MUST, key, core=key == "pca-llama-3b")
    for key in (f"{b.arch}-adaptive", base):
        yield with_cal(("file", key), MUST, f"kvz:{key}")
    yield with_cal(("bytes", world.cal_bytes[b.cal][:-7]), MUST, "truncated")
    yield with_cal(("bytes", _flip(world.cal_bytes[b.cal], len(world.cal_bytes[b.cal]) - 3)), MUST, "flipped")
    # Forged calibration artifacts: an edit, its content digest recomputed; "pointed": the .kvz records the forged
    # digest (its meta and content digests recomputed), so only the calibration's own checks can refuse it.
    for label, fn, declared in _cal_forgeries(world, b.cal):
        for pointed in (False, True):

            def make(w: World, fn: Any = fn, pointed: bool = pointed) -> Built:
                cdoc = parse(w.cal_bytes[b.cal]).copy()
                fn(cdoc)
                if isinstance(cdoc.kv, dict) and "content_digest" in cdoc.kv:
                    cdoc.kv["content_digest"] = content_digest(cdoc)
                cal_data = serialize(cdoc)
                doc = b.doc.copy()
                if pointed:
                    doc.kv["inputs"]["calibration"] = {"content_digest": plain(cdoc.kv).get("content_digest")}
                    recompute(doc, "all")
                return Built(data=serialize(doc), doc=doc, cal=("bytes", cal_data))

            yield Case(
                "cross",
                f"cross/{base}/calibration/forged:{label}{'+pointed' if pointed else ''}@all",
                base,
                make,
                declared if pointed else MUST,
                core=label in ("model.arch", "codec-step-I32"),
            )


def _flip(data: bytes, p: int) -> bytes:
    return data[:p] + bytes([data[p] ^ 1]) + data[p + 1 :]


def _cal_forgeries(world: World, cal: str) -> list[tuple[str, Callable[[Doc], None], str]]:
    doc = parse(world.cal_bytes[cal])
    top = max(int(n[5:].split("_")[0]) for n in doc.tensors if n.startswith("codec") and n.endswith("_step"))

    def js(path: tuple[Any, ...], value: Any) -> Callable[[Doc], None]:
        return lambda d: _set(d.kv, path, value)

    def tval(name: str, f: Callable[[np.ndarray], None]) -> Callable[[Doc], None]:
        def g(d: Doc) -> None:
            t = d.tensors[name]
            a = np.frombuffer(t.data, NP[t.dtype]).copy()
            with np.errstate(all="ignore"):
                f(a)
            t.data = a.tobytes()

        return g

    def tset(name: str, **kw: Any) -> Callable[[Doc], None]:
        def g(d: Doc) -> None:
            for k, v in kw.items():
                setattr(d.tensors[name], k, v)

        return g

    def remove(name: str) -> Callable[[Doc], None]:
        def g(d: Doc) -> None:
            del d.tensors[name]
            d.layout.remove(name)

        return g

    arch = doc.kv["model"]["arch"]
    step = f"codec{top}_step"
    live = int(np.flatnonzero(np.frombuffer(doc.tensors[step].data, "<f4") > 0)[0])
    freq = f"codec{top}_freq"
    cols = doc.tensors[freq].shape[1]
    keys = doc.kv["extra"]["transform"]["keys"]
    return [
        ("model.config_digest", js(("model", "config_digest"), "sha256:" + "5" * 64), MUST),
        ("model.arch", js(("model", "arch", "num_layers"), arch["num_layers"] + 1), MUST),
        ("schema_version=0", js(("schema_version",), 0), MUST),
        ("transform.keys-1", js(("extra", "transform", "keys"), keys[:-1]), MUST),
        ("transform.heads", js(("extra", "transform", "keys", 0, "_data", "heads"), 4), MUST),
        ("transform.keys=null", js(("extra", "transform", "keys", 0), None), MUST),
        ("granularity=head", js(("method", "_data", "granularity"), "head"), EITHER),  # the method is informational
        ("inputs+unknown", js(("inputs", "zz_unknown"), 1), EITHER),
        ("codec-levels-json-dropped", js(("extra", "projection", "codec_levels"), []), EITHER),
        ("codec-step-I32", tset(step, dtype="I32"), MUST),
        ("codec-step-shape", tset(step, shape=[2, doc.tensors[step].shape[0] // 2]), MUST),
        ("codec-step-x2", tval(step, lambda a: a.__setitem__(live, a[live] * 2)), MAY),
        ("codec-step-neg", tval(step, lambda a: a.__setitem__(live, -a[live])), MUST),
        ("codec-step-nan", tval(step, lambda a: a.__setitem__(live, np.nan)), MUST),
        ("codec-step-0", tval(step, lambda a: a.__setitem__(live, 0)), MAY),
        ("codec-kmax+1", tval(f"codec{top}_kmax", lambda a: a.__setitem__(live, a[live] + 1)), MAY),
        ("codec-kmax-huge", tval(f"codec{top}_kmax", lambda a: a.__setitem__(live, 1e9)), MUST),
        ("codec-freq-sum", tval(freq, lambda a: a.__setitem__(live * cols, a[live * cols] + 1)), MUST),
        ("codec-freq-zero", tval(freq, lambda a: a.__setitem__(live * cols, 0)), MUST),
        ("codec-freq-shift", tval(freq, lambda a: (a.__setitem__(live * cols, a[live * cols] + 1),
                                                   a.__setitem__(live * cols + 1, a[live * cols + 1] - 1))), MAY),
        ("codec-freq-I32", tset(freq, dtype="I32", shape=[doc.tensors[freq].shape[0], cols // 2])
         if cols % 2 == 0 else tset(freq, dtype="U16"), MUST),
        ("codec0-step-x2", tval("codec0_step", lambda a: a.__setitem__(slice(None), a * 2)), EITHER),
        ("codec0-step-F64", tset("codec0_step", dtype="F64", shape=[doc.tensors["codec0_step"].shape[0] // 2]), MUST),
        ("codec-step-removed", remove(step), MUST),
        ("k_basis-nan", tval("k_basis", lambda a: a.__setitem__(0, np.nan)), MUST),
        ("k_basis-x2", tval("k_basis", lambda a: a.__setitem__(slice(None), a * 2)), MAY),
        ("k_basis-shape", tset("k_basis", shape=list(reversed(doc.tensors["k_basis"].shape))), MUST),
        ("k_mean+1", tval("k_mean", lambda a: a.__setitem__(0, a[0] + 1)), MAY),
        ("k_mean-removed", remove("k_mean"), MUST),
    ]  # fmt: skip


# -- (e) special paths, in process; and the CLI ------------------------------------------------------------------


PATH_KINDS: dict[str, tuple[int, ...]] = {
    "fifo": (1, 3),
    "devzero": (1, 3),
    "devnull": (1, 3),
    "devurandom": (1, 3),
    "dir": (1,),
    "missing": (1,),
    "symlink-devzero": (1, 3),
    "dangling": (1,),
    "symlink-loop": (1,),
}


def gen_cli_paths(world: World, seed: int) -> Iterator[Case]:
    for base in ("llama-adaptive", "gemma3-lossless", "llama-calibrated"):
        for kind, exits in PATH_KINDS.items():

            def make(w: World, kind: str = kind) -> Built:
                return Built(path_kind=kind)

            yield Case("cli", f"cli/{base}/file={kind}@-", base, make, MUST, isolate=True, exits=exits,
                       core=kind in ("fifo", "devzero"))  # fmt: skip
        if BASE_SPECS[base][3]:
            for kind, exits in PATH_KINDS.items():

                def make_cal(w: World, kind: str = kind, base: str = base) -> Built:
                    return Built(data=w.bases[base].data, doc=w.bases[base].doc.copy(), cal=("path", kind))

                yield Case("cli", f"cli/{base}/calibration={kind}@-", base, make_cal, MUST, isolate=True,
                           exits=exits, core=kind in ("fifo", "devzero"))  # fmt: skip

        def newline(w: World, base: str = base) -> Built:
            return Built(data=_flip(w.bases[base].data, len(w.bases[base].data) - 2), path_kind="newline")

        yield Case("cli", f"cli/{base}/file=newline-in-name+flip@stale", base, newline, MUST,
                   must_contain="name.kvz")  # fmt: skip

        def symlink(w: World) -> Built:
            return Built(path_kind="symlink-base")

        yield Case("cli", f"cli/{base}/file=symlink-to-base@-", base, symlink, EITHER)


def enumerate_cases(world: World, seed: int = 0, families: Iterable[str] | None = None) -> list[Case]:
    fams = set(families or FAMILIES)
    gens = {"header": gen_header, "json": gen_json, "chunk": gen_chunk, "cross": gen_cross, "cli": gen_cli_paths}
    out: list[Case] = []
    for fam, gen in gens.items():
        if fam in fams:
            out.extend(gen(world, seed))
    names = Counter(c.name for c in out)
    dup = [n for n, k in names.items() if k > 1]
    assert not dup, f"duplicate case names: {dup[:5]}"
    return out


#: Share of each family in a random selection (the core cases always run).
WEIGHTS = {"header": 0.29, "json": 0.35, "chunk": 0.26, "cross": 0.07, "cli": 0.03}


def core_cases(cases: list[Case]) -> list[Case]:
    """One representative of each core edit (the failure classes the issue lists): its ``stale`` and ``all``
    builds (``-`` for special paths), on one base, chosen by a hash of the edit so that the bases rotate."""
    groups: dict[tuple[str, str, str], list[Case]] = defaultdict(list)
    for c in cases:
        if not c.core:
            continue
        parts = c.name.split("/")
        edit, mode = "/".join(parts[3:]).rsplit("@", 1) if len(parts) > 3 else (parts[-1], "-")
        if mode in ("stale", "all", "-"):
            target = parts[3 - 1] if len(parts) > 3 else ""
            groups[(c.family, target.replace("000001", "000000"), edit + "@" + mode)].append(c)
    out = []
    for key, items in groups.items():
        bases = sorted({c.base for c in items})
        if not bases:
            continue
        pick = bases[int(hashlib.sha256(repr(key[:2] + (key[2].rsplit("@", 1)[0],)).encode()).hexdigest(), 16)
                     % len(bases)]  # fmt: skip
        out += [c for c in items if c.base == pick][:1]
    return out


def select(cases: list[Case], n: int, seed: int, families: Iterable[str] | None = None) -> list[Case]:
    """``n`` cases, deterministic in ``seed``: the :func:`core_cases`, then a random sample per family in
    proportion to :data:`WEIGHTS`, then the rest shuffled (marked ``reserve``: the runner tops up from them when a
    build is a duplicate)."""
    fams = [f for f in FAMILIES if f in set(families or FAMILIES)]
    cases = [c for c in cases if c.family in fams]
    rng = random.Random(seed)
    must = core_cases(cases)
    if n >= 5000:  # the heavy cases: one base each (rotating with the seed)
        heavy = defaultdict(list)
        for c in cases:
            if c.heavy:
                heavy["/".join(c.name.split("/")[2:])].append(c)
        must += [items[seed % len(items)] for _, items in sorted(heavy.items())]
    must_names = {c.name for c in must}
    rest = defaultdict(list)
    for c in cases:
        if c.name not in must_names:
            rest[c.family].append(c)
    for f in fams:
        rng.shuffle(rest[f])
    left = max(0, n - len(must))
    w = {f: WEIGHTS[f] for f in fams if rest[f]}
    total = sum(w.values()) or 1.0
    quota = {f: min(len(rest[f]), int(round(left * w[f] / total))) for f in w}
    picked = list(must)
    reserve = []
    for f in w:
        picked += rest[f][: quota[f]]
        reserve += rest[f][quota[f] :]
    rng.shuffle(reserve)
    return picked + [dataclasses.replace(c, note="reserve") for c in reserve]


# =================================================================================================================
# Running cases
# =================================================================================================================


@dataclass
class Outcome:
    family: str
    name: str
    expect: str
    status: str  #: refused, identical, differ, failed
    failures: list[tuple[str, str]] = field(default_factory=list)  #: (class, detail)
    exit: int | None = None
    message: str = ""
    exc: str = ""
    seconds: float = 0.0
    rss_kb: int | None = None
    stale: tuple[str, ...] = ()
    isolated: bool = False


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _vm_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Runner:
    def __init__(self, world: World, isolate_all: bool = False, inspect: bool = True, log: Any = print):
        self.world, self.isolate_all, self.inspect, self.log = world, isolate_all, inspect, log
        self.case_path = world.tmp / "case.kvz"
        self.cal_path = world.tmp / "case.kvcal.safetensors"
        self.seen: set[str] = set()
        self._special = world.tmp / "special"
        self._special.mkdir(exist_ok=True)
        self._prepare_special()
        self._bound = world.mem_bound_kb

    def _prepare_special(self) -> None:
        s = self._special
        for name in ("fifo", "cal-fifo"):
            p = s / name
            if not p.exists():
                os.mkfifo(p)
        (s / "dir").mkdir(exist_ok=True)
        for name, target in (("symlink-devzero", "/dev/zero"), ("dangling", str(s / "nothing-here")),
                             ("symlink-loop", str(s / "symlink-loop"))):  # fmt: skip
            p = s / name
            if not os.path.lexists(p):
                os.symlink(target, p)

    def special_path(self, kind: str, base: Base, data: bytes | None) -> Path:
        s = self._special
        simple = {"fifo": s / "fifo", "devzero": Path("/dev/zero"), "devnull": Path("/dev/null"),
                  "devurandom": Path("/dev/urandom"), "dir": s / "dir", "missing": s / "missing.kvz",
                  "symlink-devzero": s / "symlink-devzero", "dangling": s / "dangling",
                  "symlink-loop": s / "symlink-loop"}  # fmt: skip
        if kind in simple:
            return simple[kind]
        if kind == "newline":
            p = s / "bad\nname.kvz"
            p.write_bytes(data or b"")
            return p
        if kind == "symlink-base":
            p = s / f"link-{base.key}.kvz"
            target = self.world.tmp / f"{base.key}.kvz"
            if not os.path.lexists(p):
                os.symlink(target, p)
            return p
        raise ValueError(kind)

    def warm_up(self) -> None:
        for base in self.world.bases.values():
            path = self.world.tmp / f"{base.key}.kvz"
            cal = self.world.cal_paths.get(base.cal) if base.cal else None
            oracle_decode(base, path, cal)
            oracle_load_cache(base, path, cal)
            if self.inspect:
                oracle_inspect(path)

    # -- one case -------------------------------------------------------------------------------------------------

    def prepare(self, case: Case) -> tuple[Built, Path, Path | None, str, set[str]] | None:
        """Build a case's files; None when it is a duplicate of one already run (or of a base file)."""
        w = self.world
        built = case.make(w)
        base = w.bases[case.base]
        cal_spec = built.cal
        cal_bytes = None
        if cal_spec == "default":
            cal_path = w.cal_paths.get(base.cal) if base.cal else None
            cal_id = f"key:{base.cal}"
        elif cal_spec is None:
            cal_path, cal_id = None, "none"
        elif isinstance(cal_spec, str):
            cal_path, cal_id = w.cal_paths[cal_spec], f"key:{cal_spec}"
        elif cal_spec[0] == "file":
            cal_path = w.tmp / f"{cal_spec[1]}.kvz"
            cal_path.write_bytes(w.files[cal_spec[1]])
            cal_id = f"file:{cal_spec[1]}"
        elif cal_spec[0] == "path":
            cal_path, cal_id = self.special_path(cal_spec[1], base, None), f"path:{cal_spec[1]}"
        else:
            cal_bytes = cal_spec[1]
            cal_path, cal_id = self.cal_path, "bytes:" + hashlib.sha256(cal_bytes).hexdigest()
        if built.path_kind is not None:
            path = self.special_path(built.path_kind, base, built.data)
            key = f"path:{built.path_kind}:{case.base}:{cal_id}:" + (
                hashlib.sha256(built.data).hexdigest() if built.data else ""
            )
        else:
            assert built.data is not None
            h = hashlib.sha256(built.data).hexdigest()
            if h == hashlib.sha256(base.data).hexdigest() and cal_id == f"key:{base.cal}":
                return None  # an edit the checksum mode undid: the base file itself
            key = f"{h}:{case.base}:{cal_id}"
            path = self.case_path
            path.write_bytes(built.data)
        if key in self.seen:
            return None
        self.seen.add(key)
        if cal_bytes is not None:
            self.cal_path.write_bytes(cal_bytes)
        flags = stale(built.doc) if built.doc is not None else set()
        declared = built.declared or case.declared
        binding = flags - ({"content"} if _content_optional(built.doc) else set())
        expect = declared if declared == MUST or not binding else EITHER
        return built, path, cal_path, expect, flags

    def run(self, case: Case) -> Outcome | None:
        try:
            prepared = self.prepare(case)
        except Exception as e:  # noqa: BLE001 - a bug of this suite, reported as such (never a reader failure)
            return Outcome(case.family, case.name, case.declared, "failed",
                           [("generator_error", f"{type(e).__name__}: {e}"[:300])])  # fmt: skip
        if prepared is None:
            return None
        built, path, cal, expect, flags = prepared
        # The stated bound: 2 x max(the largest base decode, this file's size) + MEM_ALLOWANCE_MB, plus what parsing
        # the file's JSON header may take (HEADER_PARSE_FACTOR x its length; safetensors caps headers at 100 MB).
        data = built.data or b""
        header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
        header_len = min(header_len, len(data))
        self._bound = self.world.mem_bound_kb + (2 * len(data) + HEADER_PARSE_FACTOR * header_len) // 1024
        isolate = case.isolate or self.isolate_all
        t0 = time.time()
        if isolate:
            res = self._forked(case, path, cal, expect)
        else:
            res = self._in_process(case, path, cal, expect)
            if any(k == "memory" for k, _ in res["failures"]):  # confirm, and measure alone
                res = self._forked(case, path, cal, expect)
        out = Outcome(case.family, case.name, expect, res["status"], [tuple(f) for f in res["failures"]],
                      res.get("exit"), res.get("message", ""), res.get("exc", ""), time.time() - t0,
                      res.get("rss_kb"), tuple(sorted(flags)), isolate)  # fmt: skip
        if out.failures:
            out.status = "failed"
        return out

    def _in_process(self, case: Case, path: Path, cal: Path | None, expect: str) -> dict[str, Any]:
        """The oracles in this process; the high-water mark is monotonic, so only growth past the highest mark
        so far is seen (the cases that can allocate from a forged number are isolated for that reason)."""
        before = _maxrss_kb()
        res = evaluate(self.world, case, path, cal, expect, inspect=self.inspect)
        grown = _maxrss_kb() - before
        if grown > self._bound:
            res["failures"].append(("memory", f"peak RSS grew by {grown // 1024} MiB (in process)"))
        return res

    def _forked(self, case: Case, path: Path, cal: Path | None, expect: str) -> dict[str, Any]:
        r, wfd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one case, its own RSS high-water mark and address-space cap
            code = 0
            try:
                os.close(r)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                torch.set_num_threads(1)
                for b in self.world.bases.values():  # this process's own references (see World)
                    b.ref, b.ref_cache = b.ref_1t, b.ref_cache_1t
                start = _maxrss_kb()
                vm = _vm_kb("VmSize")
                limit = (vm + CHILD_AS_HEADROOM_MB * 1024) * 1024
                resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
                res = evaluate(self.world, case, path, cal, expect, inspect=self.inspect, timer=False)
                grown = _maxrss_kb() - start
                res["rss_kb"] = grown
                if grown > self._bound:
                    res["failures"].append(("memory", f"peak RSS grew by {grown // 1024} MiB (bound "
                                                      f"{self._bound // 1024} MiB)"))  # fmt: skip
                payload = json.dumps(res, default=str).encode()
                with os.fdopen(wfd, "wb") as f:
                    f.write(payload)
            except BaseException as e:  # noqa: BLE001
                try:
                    os.write(wfd, json.dumps({"status": "failed", "failures": [["crash", repr(e)[:300]]]}).encode())
                except Exception:  # noqa: BLE001
                    pass
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        deadline = time.time() + 2 * HANG_S + 5
        chunks, killed = [], False
        while True:
            left = deadline - time.time()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            ready, _, _ = selectmod.select([r], [], [], left)
            if ready:
                data = os.read(r, 1 << 16)
                if not data:
                    break
                chunks.append(data)
        os.close(r)
        _, status, ru = os.wait4(pid, 0)
        if killed:
            return {"status": "failed", "failures": [["hang", f"killed after {2 * HANG_S + 5:.0f} s"]],
                    "rss_kb": None}  # fmt: skip
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            return {"status": "failed", "failures": [["crash", f"child died (signal {sig}, status {status})"]]}


def _run_timed(fn: Callable[[], Any], timer: bool) -> tuple[Any, BaseException | None, float]:
    t0 = time.time()
    old = None
    if timer:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
    _TIMED_OUT[0] = False
    try:
        return fn(), None, time.time() - t0
    except BaseException as e:  # noqa: BLE001 - every outcome is classified
        return None, e, time.time() - t0
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _classify_exception(e: BaseException) -> tuple[int, str, str]:
    from kvtool.cli._errors import message_for

    code, msg = message_for(e)
    return code, msg, type(e).__name__


def _judge(
    kind: str,
    got: Decoded | None,
    exc: BaseException | None,
    seconds: float,
    ref: Decoded,
    expect: str,
    exits: tuple[int, ...],
    must_contain: str = "",
) -> tuple[str, list[tuple[str, str]], dict[str, Any]]:
    """(status, failures, info) of one oracle run."""
    p = "" if kind == "decode" else f"{kind}:"
    if exc is not None:
        if isinstance(exc, _Timeout) or _TIMED_OUT[0]:
            return "failed", [(p + "hang", f"over {HANG_S} s")], {"exit": None}
        code, msg, etype = _classify_exception(exc)
        info = {"exit": code, "message": msg, "exc": etype}
        oom = isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "out of memory" in msg
        if oom:
            return "failed", [(p + "memory", f"{etype}: {msg[:160]}")], info
        if code not in exits:
            return "failed", [(p + "wrong_exit", f"exit {code} ({etype}): {msg[:200]}")], info
        if not msg or "\n" in msg:
            return "failed", [(p + "multi_line", repr(msg[:200]))], info
        if must_contain and must_contain not in msg:
            return "failed", [(p + "message_cut", f"{msg[:200]!r} lost {must_contain!r}")], info
        return "refused", [], info
    assert got is not None
    info = {"exit": 0}
    diff = first_difference(got, ref)
    if diff is None:
        if expect == MUST:
            return "failed", [(p + "accepted_invalid", "exit 0, identical decode")], info
        return "identical", [], info
    if expect == MAY:
        return "differ", [], info
    return "failed", [(p + "silent_corruption", f"exit 0, {diff}")], info


def evaluate(world: World, case: Case, path: Path, cal: Path | None, expect: str, inspect: bool = True,
             timer: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the oracles on one case's files: {status, failures, exit, message, exc}."""
    base = world.bases[case.base]
    got, exc, secs = _run_timed(lambda: oracle_decode(base, path, cal), timer)
    status, failures, info = _judge("decode", got, exc, secs, base.ref, expect, case.exits, case.must_contain)
    if secs > HANG_S and not any(f[0] == "hang" for f in failures):
        failures.append(("hang", f"{secs:.1f} s"))
    del got
    use_cache = case.load_cache or int(hashlib.sha256(case.name.encode()).hexdigest(), 16) % 6 == 0
    if use_cache and not any(f[0] == "hang" for f in failures):
        got, exc, secs = _run_timed(lambda: oracle_load_cache(base, path, cal), timer)
        _, f2, _ = _judge("load_cache", got, exc, secs, base.ref_cache, expect, case.exits)
        failures += f2
        del got
    if inspect and not any(f[0] == "hang" for f in failures):
        res, exc, secs = _run_timed(lambda: oracle_inspect(path), timer)
        if exc is not None:
            failures.append(("inspect:hang" if isinstance(exc, _Timeout) else "inspect:crash", repr(exc)[:200]))
        else:
            code, err = res
            allowed = (0, *case.exits)
            if code not in allowed:
                failures.append(("inspect:wrong_exit", f"exit {code}: {err.strip()[-200:]}"))
            elif code != 0 and (len(err.strip().splitlines()) != 1 or not err.startswith("kvtool: error: ")):
                failures.append(("inspect:multi_line", repr(err[:200])))
    return {"status": status, "failures": failures, **info}


# =================================================================================================================
# CLI subprocess cases
# =================================================================================================================


@dataclass
class CliCase:
    name: str
    argv: Callable[[World, dict[str, Path]], list[str]]
    exits: tuple[int, ...]
    usage: bool = False  #: a parser error: stderr must be exactly one line
    needs_model: bool = False
    stdout_artifact: bool = False  #: ``-o -``: stdout must be the artifact when it exits 0
    fast: bool = False
    must_contain: str = ""  #: the error line must hold this (a message cut at a newline in the path loses it)


def cli_cases() -> list[CliCase]:
    A = lambda w, p: str(w.tmp / "llama-adaptive.kvz")  # noqa: E731
    C = lambda w, p: str(w.tmp / "llama-calibrated.kvz")  # noqa: E731
    out = [
        CliCase("cli/proc/decode --bogus", lambda w, p: ["decode", "--bogus"], (2,), usage=True, fast=True),
        CliCase("cli/proc/inspect (no argument)", lambda w, p: ["inspect"], (2,), usage=True),
        CliCase("cli/proc/frobnicate", lambda w, p: ["frobnicate"], (2,), usage=True),
        CliCase(
            "cli/proc/decode --max-new-tokens 0",
            lambda w, p: ["decode", A(w, p), "--max-new-tokens", "0"],
            (2,),
            usage=True,
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode --device tpu",
            lambda w, p: ["decode", str(p["good"]), "-m", str(p["model"]), "--device", "tpu"],
            (2,),
            needs_model=True,
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode --backend nope",
            lambda w, p: ["decode", str(p["good"]), "-m", str(p["model"]), "--backend", "nope"],
            (2,),
            needs_model=True,
        ),  # fmt: skip
        CliCase("cli/proc/inspect --json -q", lambda w, p: ["inspect", A(w, p), "--json", "-q"], (2,), usage=True),
        CliCase("cli/proc/decode FIFO", lambda w, p: ["decode", str(p["fifo"])], (1, 3)),
        CliCase("cli/proc/inspect FIFO", lambda w, p: ["inspect", str(p["fifo"])], (1, 3), fast=True),
        CliCase("cli/proc/decode /dev/zero", lambda w, p: ["decode", "/dev/zero"], (1, 3)),
        CliCase("cli/proc/inspect /dev/zero", lambda w, p: ["inspect", "/dev/zero"], (1, 3)),
        CliCase("cli/proc/decode directory", lambda w, p: ["decode", str(p["dir"])], (1,)),
        CliCase("cli/proc/inspect directory", lambda w, p: ["inspect", str(p["dir"])], (1,)),
        CliCase("cli/proc/decode missing", lambda w, p: ["decode", str(p["dir"] / "missing.kvz")], (1,)),
        CliCase(
            "cli/proc/decode --calibration /dev/zero",
            lambda w, p: ["decode", C(w, p), "--calibration", "/dev/zero"],
            (1, 3),
            fast=True,
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode --calibration FIFO",
            lambda w, p: ["decode", C(w, p), "--calibration", str(p["cal-fifo"])],
            (1, 3),
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode --calibration directory",
            lambda w, p: ["decode", C(w, p), "--calibration", str(p["dir"])],
            (1,),
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode newline-in-name", lambda w, p: ["decode", str(p["newline"])], (3,), must_contain="name.kvz"
        ),  # fmt: skip
        CliCase("cli/proc/inspect __metadata__=null", lambda w, p: ["inspect", str(p["meta-null"])], (3,)),
        CliCase("cli/proc/decode deep-nesting", lambda w, p: ["decode", str(p["nest"])], (3,)),
        CliCase("cli/proc/decode NaN", lambda w, p: ["decode", str(p["nan"])], (3,)),
        CliCase("cli/proc/inspect ok", lambda w, p: ["inspect", A(w, p)], (0,)),
        CliCase(
            "cli/proc/decode -m other model",
            lambda w, p: ["decode", A(w, p), "-m", str(p["model"])],
            (3,),
            needs_model=True,
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode chunk-crc-flip",
            lambda w, p: ["decode", str(p["good-flip"]), "-m", str(p["model"])],
            (3,),
            needs_model=True,
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode raw-F16->BF16",
            lambda w, p: ["decode", str(p["good-bf16"]), "-m", str(p["model"])],
            (3,),
            needs_model=True,
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode -o file",
            lambda w, p: ["decode", str(p["good"]), "-m", str(p["model"]), "-o", str(p["out"]), "--overwrite"],
            (0,),
            needs_model=True,
        ),  # fmt: skip
        CliCase(
            "cli/proc/decode -o -",
            lambda w, p: ["decode", str(p["good"]), "-m", str(p["model"]), "-o", "-"],
            (0, 2),
            needs_model=True,
            stdout_artifact=True,
        ),  # fmt: skip
    ]
    return out


def _kvtool_argv() -> list[str]:
    exe = Path(sys.executable).parent / "kvtool"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kvtool"]


class CliWorld:
    """The files the CLI cases use: special paths, damaged copies of a base, and (when needed) a real model
    folder with a .kvz made for it."""

    def __init__(self, world: World, model_dir: Path | None = None):
        self.world = world
        t = world.tmp / "cli"
        t.mkdir(exist_ok=True)
        self.tmp = t
        self.home = t / "kvhome"
        self.home.mkdir(exist_ok=True)
        (t / "hf-empty").mkdir(exist_ok=True)
        self.env = {**os.environ, "KVTOOL_HOME": str(self.home), "HF_HUB_CACHE": str(t / "hf-empty"),
                    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "COLUMNS": "80", "PYTHONWARNINGS": "ignore"}  # fmt: skip
        self.env.pop("KVTOOL_DEBUG", None)
        self.paths: dict[str, Path] = {"fifo": t / "fifo", "cal-fifo": t / "cal-fifo", "dir": t / "dir",
                                       "out": t / "out.safetensors"}  # fmt: skip
        for k in ("fifo", "cal-fifo"):
            if not self.paths[k].exists():
                os.mkfifo(self.paths[k])
        self.paths["dir"].mkdir(exist_ok=True)
        base = world.bases["llama-adaptive"]
        self._write("newline", "bad\nname.kvz", _flip(base.data, len(base.data) - 2))
        d = base.doc.copy()
        d.stmeta = None
        self._write("meta-null", "meta-null.kvz", serialize(d))
        d = base.doc.copy()
        _set(d.kv, ("extra", "layout"), _deep(100_000))
        self._write("nest", "nest.kvz", serialize(d))
        d = base.doc.copy()
        _set(d.kv, ("inputs", "tokens"), NAN)
        self._write("nan", "nan.kvz", serialize(d))
        self.model_dir = model_dir
        self._model_ready = False

    def _write(self, key: str, name: str, data: bytes) -> None:
        p = self.tmp / name
        p.write_bytes(data)
        self.paths[key] = p

    def ensure_model(self) -> None:
        """A saved tiny Llama with a tokenizer, and a .kvz encoded for it (and damaged copies)."""
        if self._model_ready:
            return
        from kvtool.codecs.kvz import CodecSettings, encode_prefix
        from kvtool.models import load_model, tokenize
        from kvtool.texts import book

        if self.model_dir is None:
            from tiny_models import save_model_folder

            text = self.tmp / "persuasion.txt"
            text.write_text(book("persuasion")[:20000])
            self.model_dir = save_model_folder(self.tmp / "model", text, 32)
        saved = {k: os.environ.get(k) for k in ("KVTOOL_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")}
        os.environ.update({k: self.env[k] for k in saved})
        try:
            lm = load_model(str(self.model_dir), "cpu", "auto")
            ids = tokenize(lm.tokenizer, book("persuasion")[:3000])[:60]
            good = self.tmp / "good.kvz"
            encode_prefix(lm, ids, CodecSettings(mode="adaptive", chunk_tokens=16), good, backend="torch")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.paths["model"], self.paths["good"] = self.model_dir, good
        doc = parse(good.read_bytes())
        raw = "chunk.000001.words"
        flip = doc.copy()
        flip.tensors[raw].data = _flip(flip.tensors[raw].data, 3)
        self._write("good-flip", "good-flip.kvz", serialize(flip))
        bf = doc.copy()
        bf.tensors["chunk.000000.raw"].dtype = "BF16"
        self._write("good-bf16", "good-bf16.kvz", serialize(bf))
        self._model_ready = True


def run_cli_case(cw: CliWorld, case: CliCase) -> Outcome:
    if case.needs_model:
        cw.ensure_model()
    argv = _kvtool_argv() + case.argv(cw.world, cw.paths)
    cwd = cw.tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    for p in cwd.iterdir():
        p.unlink()
    t0 = time.time()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=cw.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        peak, killed, status = 0, None, None
        while True:
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = st
                break
            try:  # VmHWM of the exec'd process (ru_maxrss would include the forking parent's image)
                with open(f"/proc/{proc.pid}/status") as f:
                    vals = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f) if k in ("VmRSS",
                            "VmHWM")}  # fmt: skip
                rss = vals.get("VmRSS", 0)
                peak = max(peak, vals.get("VmHWM", 0))
            except (OSError, ValueError):
                rss = 0
            if rss > CLI_RSS_CAP_MB * 1024:
                killed = f"RSS {rss // 1024} MiB over the {CLI_RSS_CAP_MB} MiB cap"
            elif time.time() - t0 > CLI_TIMEOUT_S:
                killed = f"still running after {CLI_TIMEOUT_S:.0f} s"
            if killed:
                proc.kill()
                os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = 0  # reaped above
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().decode("utf-8", "replace")
    secs = time.time() - t0
    res = Outcome("cli", case.name, "cli", "refused", seconds=secs, rss_kb=peak)
    if killed:
        res.failures.append(("memory" if "RSS" in killed else "hang", killed))
        res.status = "failed"
        return res
    code = os.waitstatus_to_exitcode(status)
    res.exit = code
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    res.message = lines[-1] if lines else ""
    if code not in case.exits:
        res.failures.append(("wrong_exit", f"exit {code}: {stderr.strip()[-300:]!r}"))
    if set(stderr) & BOX_CHARS:
        res.failures.append(("cli_format", "box-drawing characters on stderr: " + repr(stderr[:200])))
    if "Traceback" in stderr:
        res.failures.append(("cli_format", "a traceback on stderr"))
    if code != 0:
        errors = [line for line in lines if line.startswith("kvtool: error: ")]
        if len(errors) != 1 or not lines or not lines[-1].startswith("kvtool: error: "):
            res.failures.append(("cli_format", f"not one 'kvtool: error:' line at the end: {stderr[-300:]!r}"))
        elif case.must_contain and case.must_contain not in lines[-1]:
            res.failures.append(("cli_format", f"the error line lost {case.must_contain!r}: {lines[-1]!r}"))
        elif case.usage and len(lines) != 1:
            res.failures.append(("cli_format", f"{len(lines)} lines on stderr for a usage error: {stderr[:300]!r}"))
        if stdout and not case.stdout_artifact:
            res.failures.append(("cli_stdout", f"{len(stdout)} bytes on stdout with exit {code}"))
    if case.stdout_artifact:
        if (cwd / "-").exists():
            res.failures.append(("cli_stdout", "wrote a file named '-' instead of stdout"))
        if code == 0:
            try:
                n = int.from_bytes(stdout[:8], "little")
                head = json.loads(stdout[8 : 8 + n])
                if "k" not in head or "kvtool" not in head.get("__metadata__", {}):
                    raise ValueError("not a kv_capture artifact")
                ref = cw.paths["out"]
                if ref.exists() and ref.read_bytes() != stdout:
                    res.failures.append(("cli_stdout", "stdout differs from the -o file output"))
            except (ValueError, KeyError) as e:
                res.failures.append(("cli_stdout", f"stdout is not the artifact ({e})"))
    res.status = "failed" if res.failures else ("identical" if code == 0 else "refused")
    return res


def run_cli(cw: CliWorld, cases: list[CliCase], workers: int = 2) -> list[Outcome]:
    """The CLI cases, ``workers`` at a time (threads wait on subprocesses; no fork happens meanwhile)."""
    results: list[Outcome | None] = [None] * len(cases)
    if any(c.needs_model for c in cases):
        cw.ensure_model()
    ordered = sorted(range(len(cases)), key=lambda i: cases[i].name != "cli/proc/decode -o file")
    lock = threading.Lock()
    queue = list(ordered)
    first = queue.pop(0) if queue and cases[ordered[0]].name == "cli/proc/decode -o file" else None
    if first is not None:
        results[first] = run_cli_case(cw, cases[first])  # the reference for "-o -"

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            results[i] = run_cli_case(cw, cases[i])

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


# =================================================================================================================
# Driving a run, and the summary
# =================================================================================================================


@dataclass
class Report:
    outcomes: list[Outcome]
    seconds: float
    duplicates: int = 0

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.failures]

    def table(self) -> str:
        rows = defaultdict(Counter)
        for o in self.outcomes:
            r = rows[o.family]
            r["cases"] += 1
            r[o.status] += 1
            if o.expect == MAY and o.status == "differ":
                r["differ(valid)"] += 1
            r["isolated"] += o.isolated
        lines = [f"{'family':8} {'cases':>7} {'refused':>8} {'identical':>9} {'differ(ok)':>10} {'failures':>8} "
                 f"{'isolated':>8}"]  # fmt: skip
        total = Counter()
        for fam in FAMILIES:
            if fam not in rows:
                continue
            r = rows[fam]
            total.update(r)
            lines.append(f"{fam:8} {r['cases']:7} {r['refused']:8} {r['identical']:9} {r['differ']:10} "
                         f"{r['failed']:8} {r['isolated']:8}")  # fmt: skip
        lines.append(f"{'total':8} {total['cases']:7} {total['refused']:8} {total['identical']:9} "
                     f"{total['differ']:10} {total['failed']:8} {total['isolated']:8}")  # fmt: skip
        lines.append(f"({self.seconds:.1f} s; {self.duplicates} duplicate builds skipped)")
        return "\n".join(lines)

    def by_class(self) -> dict[str, list[tuple[Outcome, str]]]:
        out: dict[str, list[tuple[Outcome, str]]] = defaultdict(list)
        for o in self.outcomes:
            for cls, detail in o.failures:
                out[cls].append((o, detail))
        return out

    def failure_text(self, show: int = 3) -> str:
        """Per failure class: the count, the families, and ``show`` examples (varied over family, base and target)."""
        lines = []
        for cls, items in sorted(self.by_class().items(), key=lambda kv: -len(kv[1])):
            fams = Counter(o.family for o, _ in items)
            lines.append(f"== {cls}: {len(items)} ({', '.join(f'{f} {n}' for f, n in fams.most_common())})")
            picked, keys = [], set()
            for o, detail in items:
                key = "/".join(o.name.split("/")[:3])
                if key not in keys:
                    keys.add(key)
                    picked.append((o, detail))
                if len(picked) >= show:
                    break
            for o, detail in picked:
                lines.append(f"   {o.name}  [{o.expect}; stale={','.join(o.stale) or '-'}]  {detail}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "duplicates": self.duplicates,
                "outcomes": [dataclasses.asdict(o) for o in self.outcomes]}  # fmt: skip


def run_cases(world: World, cases: list[Case], n: int, isolate_all: bool = False, inspect: bool = True,
              progress: Any = None) -> Report:  # fmt: skip
    """Run cases in order until ``n`` distinct ones have run (cases marked ``reserve`` top up after duplicates)."""
    warnings.filterwarnings("ignore")
    runner = Runner(world, isolate_all=isolate_all, inspect=inspect)
    runner.warm_up()
    t0 = time.time()
    outcomes, dups = [], 0
    must = [c for c in cases if c.note != "reserve"]
    reserve = [c for c in cases if c.note == "reserve"]
    queue = must + reserve
    for c in queue:
        if len(outcomes) >= n and c.note == "reserve":
            break
        o = runner.run(c)
        if o is None:
            dups += 1
            continue
        outcomes.append(o)
        if progress and len(outcomes) % 500 == 0:
            progress(f"{len(outcomes)} cases, {sum(1 for x in outcomes if x.failures)} failing, "
                     f"{time.time() - t0:.0f} s")  # fmt: skip
    return Report(outcomes, time.time() - t0, dups)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000, help="distinct structured cases to run (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", action="append", choices=FAMILIES, help="only these families (repeatable)")
    ap.add_argument("--case", action="append", help="run exactly these case names (see --list)")
    ap.add_argument("--list", action="store_true", help="print the selected case names and exit")
    ap.add_argument("--isolate-all", action="store_true", help="run every case in a forked child")
    ap.add_argument("--no-inspect", action="store_true", help="skip the in-process `kvtool inspect` oracle")
    ap.add_argument("--no-cli", action="store_true", help="skip the kvtool subprocess cases")
    ap.add_argument("--cli-all", action="store_true", help="all subprocess CLI cases (default: the fast three)")
    ap.add_argument("--show", type=int, default=3, help="examples per failure class")
    ap.add_argument("--json", type=Path, help="write every outcome here")
    ap.add_argument("--tmp", type=Path, help="scratch folder (default: a new temporary one)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="kvz_fuzz_"))
    world = World(tmp, log=lambda s: print(s, file=sys.stderr))
    cases = enumerate_cases(world, args.seed, args.family)
    print(f"{len(cases)} cases enumerated", file=sys.stderr)
    if args.case:
        wanted = set(args.case)
        chosen = [c for c in cases if c.name in wanted]
        missing = wanted - {c.name for c in chosen}
        if missing:
            print(f"unknown case names: {sorted(missing)}", file=sys.stderr)
            return 2
        n = len(chosen)
    else:
        chosen, n = select(cases, args.cases, args.seed, args.family), args.cases
    if args.list:
        for c in chosen[:n]:
            print(c.name)
        return 0
    report = run_cases(world, chosen, n, args.isolate_all, not args.no_inspect,
                       progress=lambda s: print(s, file=sys.stderr))  # fmt: skip
    if not args.no_cli and not args.case and (args.family is None or "cli" in args.family):
        ccases = [c for c in cli_cases() if args.cli_all or c.fast]
        t0 = time.time()
        report.outcomes += run_cli(CliWorld(world), ccases)
        report.seconds += time.time() - t0
    if args.case:
        for o in report.outcomes:
            print(json.dumps(dataclasses.asdict(o), indent=1, default=str))
    print(report.table())
    text = report.failure_text(args.show)
    if text:
        print(text)
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1, default=str))
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
