"""Exports of a calibrated :class:`~kvtool.transforms.KVTransform` to formats other tools already read.

Every exporter is a pure function of the transform, the model's :class:`~kvtool.arch.ArchInfo` and, for engine
formats, where the checkpoint holds scales (:class:`ScaleSites`), returning the exact file contents;
:func:`export` dispatches by format name and also returns what the format cannot represent (``lossy``), which
the CLI prints as a warning.

* ``kvtuner-yaml``: KVTuner's per-layer bits (:mod:`kvtool.exports.kvtuner`).
* ``hf-cache-config``: transformers ``QuantizedCache`` keyword arguments (:mod:`kvtool.exports.hf_cache`).
* ``compressed-tensors``, ``modelopt``, ``vllm-skip-layers``: static FP8 / NVFP4 scales and skipped layers as
  vLLM, ModelOpt and TensorRT-LLM load them (:mod:`kvtool.exports.engines`).

``layer-dtypes`` (per-layer dtype range strings) is gone: no engine parses it (see docs/exports.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from kvtool.arch import ArchInfo
from kvtool.errors import UsageError
from kvtool.exports._common import Export, Note, ScaleSites, layer_ranges, runs
from kvtool.exports.engines import compressed_tensors, modelopt, vllm_skip_layers
from kvtool.exports.hf_cache import hf_cache_config
from kvtool.exports.kvtuner import kvtuner_layers, kvtuner_notes, to_kvtuner_yaml
from kvtool.quantizers import NonUniformQuantizer, UniformQuantizer
from kvtool.transforms import KVTransform, TensorTransform

__all__ = ["EXPORTERS", "FORMATS", "Export", "Note", "ScaleSites", "export", "runs", "uniform_projection"]

#: formats that existed and why they are gone (a clear error instead of "unknown format")
REMOVED = {
    "layer-dtypes": "no engine parses per-layer dtype range strings (the sglang PRs were closed, TensorRT-LLM's is "
    "open); use --to vllm-skip-layers or --to modelopt",
}


def _kvtuner(transform: KVTransform, arch: ArchInfo, sites: ScaleSites | None) -> Export:
    text = to_kvtuner_yaml(transform)
    data = {str(i): b for i, b in kvtuner_layers(transform).items()}
    return Export("kvtuner-yaml", text, data, kvtuner_notes(transform))


def _hf(transform: KVTransform, arch: ArchInfo, sites: ScaleSites | None) -> Export:
    config, notes = hf_cache_config(transform, arch)
    return Export("hf-cache-config", json.dumps(config, indent=2) + "\n", config, notes)


#: format name -> exporter
EXPORTERS: dict[str, Callable[[KVTransform, ArchInfo, ScaleSites | None], Export]] = {
    "kvtuner-yaml": _kvtuner,
    "hf-cache-config": _hf,
    "compressed-tensors": compressed_tensors,
    "modelopt": modelopt,
    "vllm-skip-layers": vllm_skip_layers,
}
FORMATS = tuple(EXPORTERS)
#: formats the integer quantizers map onto (the engine formats take FP8 / NVFP4 only)
_INTEGER_FORMATS = ("kvtuner-yaml", "hf-cache-config")

def uniform_projection(transform: KVTransform) -> tuple[KVTransform, list[Note]]:
    """Replace non-uniform datatypes by the uniform quantizer of the same bits and axis (what the consumers can
    run), with a lossy note naming the layers; other transforms are returned unchanged."""
    replaced: dict[str, list[int]] = {"keys": [], "values": []}
    slots: dict[str, list[TensorTransform | None]] = {}
    for kind, old in (("keys", transform.keys), ("values", transform.values)):
        slots[kind] = []
        for i, t in enumerate(old):
            if isinstance(t, NonUniformQuantizer):
                replaced[kind].append(i)
                t = UniformQuantizer(t.bits, t.axis)
            slots[kind].append(t)
    if not any(replaced.values()):
        return transform, []
    where = ", ".join(f"{kind} {layer_ranges(idx)}" for kind, idx in replaced.items() if idx)
    projected = dataclasses.replace(transform, keys=slots["keys"], values=slots["values"])
    return projected, [
        Note(
            f"non-uniform datatypes ({where}) are exported as uniform integers of the same bits: the consumer's "
            "quantizer replaces kvtool's calibrated lookup tables and fp16 outliers"
        )  # fmt: skip
    ]


def export(fmt: str, transform: KVTransform, arch: ArchInfo, sites: ScaleSites | None = None) -> Export:
    """Export ``transform`` (of a model with ``arch``; ``sites``: where its checkpoint holds KV scales, recorded by
    an engine calibration) to ``fmt``; an unknown or removed format is a usage error."""
    if fmt in REMOVED:
        raise UsageError(f"export format '{fmt}' was removed: {REMOVED[fmt]}")
    if fmt not in EXPORTERS:
        raise UsageError(f"unknown export format '{fmt}' (expected one of: {', '.join(FORMATS)})")
    notes: list[Note] = []
    if fmt in _INTEGER_FORMATS:
        transform, notes = uniform_projection(transform)
    result = EXPORTERS[fmt](transform, arch, sites)
    return dataclasses.replace(result, notes=notes + result.notes)
