"""kvtool: offline KV-cache calibration and compact, portable prefix-KV artifacts.

Public API (the catalogue)::

    load_model, capture_kv, perplexity, continuation_quality, KVTransform, UniformQuantizer, NonUniformQuantizer,
    transformed_attention, read_artifact, write_artifact, load_calibration, load_quantized_cache, ProjectionQuantizer,
    encode_prefix, load_cache, encode_kv, encode_kv_into, decode_kv
"""

from __future__ import annotations

from kvtool._version import __version__
from kvtool.artifacts import read_artifact, write_artifact
from kvtool.attention import transformed_attention
from kvtool.calibration import load_calibration
from kvtool.capture import capture_kv
from kvtool.codecs.connector import decode_kv, encode_kv, encode_kv_into
from kvtool.codecs.kvz import encode_prefix, load_cache
from kvtool.eval.harness import continuation_quality, perplexity
from kvtool.models import load_model
from kvtool.quantizers import NonUniformQuantizer, ProjectionQuantizer, UniformQuantizer
from kvtool.runtime import load_quantized_cache
from kvtool.transforms import KVTransform

__all__ = [
    "__version__",
    "load_model",
    "capture_kv",
    "perplexity",
    "continuation_quality",
    "KVTransform",
    "UniformQuantizer",
    "NonUniformQuantizer",
    "transformed_attention",
    "read_artifact",
    "write_artifact",
    "load_calibration",
    "load_quantized_cache",
    "ProjectionQuantizer",
    "encode_prefix",
    "load_cache",
    "encode_kv",
    "encode_kv_into",
    "decode_kv",
]
