"""The ``.kvz`` prefix-cache codec, its public names in one place.

The wing, one way: :mod:`~kvtool.codecs.container` (format, settings, naming, checksums, the strict reader) ←
:mod:`~kvtool.codecs.coding` (the coders: transform, symbols, rANS; :mod:`~kvtool.codecs.ecsq` quantizer and rate
levels; :mod:`~kvtool.codecs.rans` entropy coder) ← :mod:`~kvtool.codecs.encode` and :mod:`~kvtool.codecs.decode`
(the two pipelines; :mod:`~kvtool.codecs.device_decode` on a GPU) ← :mod:`~kvtool.codecs.connector` (the
engine-connector API). ``docs/kvz.md`` describes the format.
"""

from __future__ import annotations

from kvtool.codecs.coding import make_coder, on_backend, pick_level
from kvtool.codecs.container import (
    BATCH_CHUNKS,
    MAX_TOKENS,
    SCHEMA,
    SCHEMA_VERSION,
    CodecSettings,
    Geometry,
    KvzFile,
    check_calibration,
    check_model_of,
    check_tokenizer,
    chunk_crc,
    crc_seed,
    recorded_model_spec,
    tokenizer_digest,
)
from kvtool.codecs.decode import DecodedLayer, bind_model, decode_kvz, load_cache
from kvtool.codecs.encode import encode_cache, encode_prefix, encode_summary, kvz_artifact, prefill_cache

__all__ = [
    "BATCH_CHUNKS", "MAX_TOKENS", "SCHEMA", "SCHEMA_VERSION", "CodecSettings", "DecodedLayer", "Geometry", "KvzFile",
    "bind_model", "check_calibration", "check_model_of", "check_tokenizer", "chunk_crc", "crc_seed", "decode_kvz",
    "encode_cache", "encode_prefix", "encode_summary", "kvz_artifact", "load_cache", "make_coder", "on_backend",
    "pick_level", "prefill_cache", "recorded_model_spec", "tokenizer_digest",
]  # fmt: skip
