"""Exports of a calibrated :class:`~kvtool.transforms.KVTransform` to formats other tools already read.

Every exporter is a pure function of the transform (and, where the format needs it, the model's
:class:`~kvtool.arch.ArchInfo`) returning the exact file contents as a string; :func:`export` dispatches by format
name and also returns what the format cannot represent (``lossy``), which the CLI prints as a warning.

* ``kvtuner-yaml``: KVTuner's per-layer bits, ``{layer: {nbits_key, nbits_value}}``, read by
  ``FlexibleQuantizedCacheConfig(per_layer_quant=True, per_layer_config_path=...)`` with ``yaml.safe_load``.
* ``layer-dtypes``: the per-layer range strings of serving engines (``0-3:int4,4-29:int2``), one for K, one for V.
* ``hf-cache-config``: the closest transformers ``QuantizedCache`` keyword arguments (one setting for all layers).

Only uniform integer quantizers and fp16/bf16 casts (or untouched tensors) have an equivalent in these formats;
any other method is a :class:`~kvtool.errors.UsageError` naming the layer and the method.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtool.arch import ArchInfo
from kvtool.errors import UsageError
from kvtool.quantizers import FloatCast, NonUniformQuantizer, UniformQuantizer
from kvtool.transforms import KVTransform, TensorTransform

#: quanto's bit widths in transformers' ``QuantoQuantizedLayer``
QUANTO_BITS = (2, 4)
#: KVTuner's two global modes (its repository's ``kivi`` / ``pertoken`` settings)
KVTUNER_MODES = {
    "kivi": "axis_key=1, axis_value=0, q_group_size=32, residual_length=32",
    "pertoken": "axis_key=0, axis_value=0, q_group_size=-1, residual_length=0",
}
_CAST_NAMES = {"float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Note:
    """One fact about the export: ``lossy`` ones are what the format cannot carry."""

    text: str
    lossy: bool = True


@dataclass(frozen=True)
class Export:
    """An export: the file contents, their JSON form (for ``--json``), and the notes on what was lost."""

    format: str
    text: str
    data: Any
    notes: list[Note] = field(default_factory=list)

    @property
    def lossy(self) -> list[str]:
        return [n.text for n in self.notes if n.lossy]


# -- per-slot helpers ---------------------------------------------------------------------------------------


def _check(t: TensorTransform | None, layer: int, kind: str, fmt: str, why: str) -> None:
    if t is None or isinstance(t, UniformQuantizer | FloatCast):
        return
    raise UsageError(
        f"layer {layer} {'keys' if kind == 'k' else 'values'}: {type(t).__name__} ({t.label()}) cannot be exported "
        f"to {fmt}: {why}"
    )


def _checked(transform: KVTransform, fmt: str, why: str) -> None:
    for kind, slots in (("k", transform.keys), ("v", transform.values)):
        for i, t in enumerate(slots):
            _check(t, i, kind, fmt, why)


def dtype_name(t: TensorTransform | None) -> str:
    """``int{b}`` (uniform quantizer), ``fp16`` / ``bf16`` (cast), ``none`` (tensor kept as is)."""
    if t is None:
        return "none"
    if isinstance(t, FloatCast):
        return _CAST_NAMES[t.format]
    if isinstance(t, UniformQuantizer):
        return f"int{t.bits}"
    raise UsageError(f"{type(t).__name__} ({t.label()}) has no dtype name")


def layout_name(t: TensorTransform | None) -> str:
    """Grouping of a uniform quantizer as kvtool's layouts name it (``channel-g32``, ``token``, ``token-g32``);
    the dtype name of anything else."""
    if isinstance(t, UniformQuantizer):
        if t.axis == "channel":
            return f"channel-g{t.group_size or 32}"
        return "token" if t.group_size is None else f"token-g{t.group_size}"
    return dtype_name(t)


def runs(labels: Sequence[str]) -> str:
    """Maximal runs of equal consecutive labels: ``["a", "a", "b"]`` → ``0-1:a,2:b``."""
    parts, i = [], 0
    while i < len(labels):
        j = i
        while j + 1 < len(labels) and labels[j + 1] == labels[i]:
            j += 1
        parts.append(f"{i}-{j}:{labels[i]}" if j > i else f"{i}:{labels[i]}")
        i = j + 1
    return ",".join(parts)


def _layers(indices: Sequence[int]) -> str:
    """Sorted layer indices as ranges: ``[0, 1, 4]`` → ``0-1,4``."""
    parts, k = [], 0
    while k < len(indices):
        j = k
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(f"{indices[k]}-{indices[j]}" if j > k else f"{indices[k]}")
        k = j + 1
    return ",".join(parts)


def _unquantized(transform: KVTransform) -> dict[str, list[int]]:
    return {
        kind: [i for i, t in enumerate(slots) if not isinstance(t, UniformQuantizer)]
        for kind, slots in (("keys", transform.keys), ("values", transform.values))
    }


def _describe(per_kind: dict[str, list[int]]) -> str:
    return ", ".join(f"{kind} {_layers(idx)}" for kind, idx in per_kind.items() if idx)


def _grouping(transform: KVTransform) -> str:
    keys, values = (runs([layout_name(t) for t in slots]) for slots in (transform.keys, transform.values))
    return f"keys {keys} and values {values}"


def _quantized_keys(transform: KVTransform) -> bool:
    return any(isinstance(t, UniformQuantizer) for t in transform.keys)


def _token_notes(transform: KVTransform, consumer: str, recent_note: str) -> list[Note]:
    notes = [
        Note(f"sink tokens kept in fp16: {transform.sink_tokens} ({consumer} keeps none)", transform.sink_tokens > 0),
        Note(f"recent tokens kept in fp16: {transform.recent_tokens} ({recent_note})", transform.recent_tokens > 0),
    ]
    if transform.keys_pre_rope and _quantized_keys(transform):
        notes.append(Note(f"keys were quantized before RoPE but {consumer} quantizes the cached post-RoPE keys"))
    rotated = {
        kind: [i for i, t in enumerate(slots) if isinstance(t, UniformQuantizer) and t.rotate]
        for kind, slots in (("keys", transform.keys), ("values", transform.values))
    }
    if any(rotated.values()):
        where = ", ".join(f"{kind} {_layers(idx)}" for kind, idx in rotated.items() if idx)
        notes.append(Note(f"Hadamard-rotated per-token layers ({where}) are quantized unrotated by {consumer}"))
    return notes


# -- kvtuner-yaml -------------------------------------------------------------------------------------------


def kvtuner_layers(transform: KVTransform) -> dict[int, dict[str, int]]:
    """``{layer: {"nbits_key", "nbits_value"}}``; layers kept in fp16 (cast or untouched) become 8 bits, the widest
    setting KVTuner's int8-code quantizer can hold."""
    _checked(transform, "kvtuner-yaml", "KVTuner only understands uniform integer bits")

    def nbits(t: TensorTransform | None) -> int:
        return t.bits if isinstance(t, UniformQuantizer) else 8

    return {
        i: {"nbits_key": nbits(k), "nbits_value": nbits(v)}
        for i, (k, v) in enumerate(zip(transform.keys, transform.values, strict=True))
    }


def kvtuner_mode(transform: KVTransform) -> str:
    """KVTuner's global mode closest to the transform: ``kivi`` if any key is grouped per channel."""
    channel = any(isinstance(t, UniformQuantizer) and t.axis == "channel" for t in transform.keys)
    return "kivi" if channel else "pertoken"


def kvtuner_notes(transform: KVTransform) -> list[Note]:
    """What KVTuner's YAML cannot carry, with the transform's actual values (also the file's header)."""
    mode = kvtuner_mode(transform)
    notes = [
        Note(f"grouping per layer (KVTuner sets one axis and group size for all layers): {_grouping(transform)}"),
        Note("zero points: kvtool stores the fp16 group minimum, KVTuner rounds the zero point to an integer"),
        *_token_notes(transform, "KVTuner", "KVTuner's global residual_length: 32 in kivi mode, 0 in pertoken"),
    ]
    kept = _unquantized(transform)
    if any(kept.values()):
        notes.append(
            Note(
                f"layers kept unquantized ({_describe(kept)}) are written as 8 bits: KVTuner has no unquantized "
                "setting and its vanilla quantizer stores int8 codes"
            )
        )
    notes.append(Note(f"closest KVTuner mode: {mode} ({KVTUNER_MODES[mode]})", lossy=False))
    return notes


def to_kvtuner_yaml(transform: KVTransform) -> str:
    """KVTuner's per-layer YAML (written by hand: deterministic, no YAML dependency), with a comment header."""
    layers = kvtuner_layers(transform)
    lines = [
        "# KVTuner per-layer KV bits, exported by kvtool from the calibrated transform "
        f"'{transform.name}' ({len(layers)} layers).",
        "# Load: FlexibleQuantizedCacheConfig(per_layer_quant=True, per_layer_config_path=<this file>, ...)",
        "# This file holds bits only; KVTuner's axis, group size and residual are global settings. Not represented:",
        *[f"#   {n.text}" for n in kvtuner_notes(transform)],
    ]
    for i, bits in layers.items():
        lines += [f"{i}:", f"  nbits_key: {bits['nbits_key']}", f"  nbits_value: {bits['nbits_value']}"]
    if not layers:
        lines.append("{}")
    return "\n".join(lines) + "\n"


# -- layer-dtypes -------------------------------------------------------------------------------------------


def layer_dtypes(transform: KVTransform) -> dict[str, str]:
    """``{"k": "0-3:int4,4-29:int2", "v": ...}``: maximal runs of equal dtype, serving engines' range syntax."""
    _checked(transform, "layer-dtypes", "only uniform integer quantizers and fp16/bf16 casts have a dtype name")
    return {
        "k": runs([dtype_name(t) for t in transform.keys]),
        "v": runs([dtype_name(t) for t in transform.values]),
    }


def layer_dtypes_notes(transform: KVTransform) -> list[Note]:
    notes = [Note(f"group layout and fp16 scales/zero points are not described: {_grouping(transform)}")]
    differ = [
        i
        for i, (k, v) in enumerate(zip(transform.keys, transform.values, strict=True))
        if dtype_name(k) != dtype_name(v)
    ]
    if differ:
        notes.append(
            Note(
                f"engines take one dtype per layer for K and V together but K and V differ in layers {_layers(differ)}"
            )
        )
    return notes + _token_notes(transform, "the engine", "engines keep no fp16 window")


def to_layer_dtypes(transform: KVTransform) -> str:
    """Two lines, ``k: <runs>`` and ``v: <runs>``."""
    d = layer_dtypes(transform)
    return f"k: {d['k']}\nv: {d['v']}\n"


# -- hf-cache-config ----------------------------------------------------------------------------------------


def hf_cache_config(transform: KVTransform, arch: ArchInfo) -> tuple[dict[str, Any], list[Note]]:
    """The closest transformers ``QuantizedCache`` keyword arguments, and the notes on what they lose.

    ``QuantizedCache(backend="quanto", ...)`` uses one ``nbits`` (2 or 4) for every layer's K and V, per-token
    groups of ``q_group_size`` channels (``axis_key = axis_value = 0``) and a residual of ``residual_length`` recent
    tokens. ``nbits`` is the smallest quanto width >= the largest bits used (capped at 4); ``q_group_size`` the
    smallest per-token group of the transform (the whole head when none is grouped per token); ``residual_length``
    the transform's recent tokens.
    """
    _checked(transform, "hf-cache-config", "transformers' QuantizedCache only has uniform integer quantization")
    other = sorted({lt for lt in arch.layer_types if lt != "full_attention"})
    if other:
        raise UsageError(
            f"hf-cache-config: transformers' QuantizedCache supports only full-attention models; this model has "
            f"{', '.join(other)} layers"
        )
    slots = [t for t in transform.keys + transform.values if isinstance(t, UniformQuantizer)]
    if not slots:
        raise UsageError("hf-cache-config: no layer is quantized; QuantizedCache would quantize every layer")
    used = sorted({t.bits for t in slots})
    nbits = next((b for b in QUANTO_BITS if b >= used[-1]), QUANTO_BITS[-1])
    token_groups = sorted({t.group_size or arch.head_dim for t in slots if t.axis == "token"})
    group = token_groups[0] if token_groups else arch.head_dim
    config = {
        "backend": "quanto",
        "nbits": nbits,
        "axis_key": 0,
        "axis_value": 0,
        "q_group_size": group,
        "residual_length": transform.recent_tokens,
    }
    notes: list[Note] = []
    if used[-1] > QUANTO_BITS[-1]:
        notes.append(Note(f"int{used[-1]} is more than quanto's 4 bits: capped at nbits=4"))
    if len(used) > 1:
        notes.append(
            Note(
                f"mixed bits (keys {runs([dtype_name(t) for t in transform.keys])} and values "
                f"{runs([dtype_name(t) for t in transform.values])}) become nbits={nbits} in every layer, K and V"
            )
        )
    elif used[0] != nbits:
        notes.append(
            Note(f"int{used[0]} becomes nbits={nbits} (quanto has {' and '.join(map(str, QUANTO_BITS))} bits)")
        )
    kept = _unquantized(transform)
    if any(kept.values()):
        notes.append(Note(f"layers kept unquantized ({_describe(kept)}) are quantized to nbits={nbits} too"))
    if any(t.axis == "channel" for t in slots):
        notes.append(
            Note(
                "per-channel groups of tokens become per-token groups of q_group_size channels (axis 0, since quanto's "
                "axis -1 needs the group to divide batch x heads x tokens at every quantization): "
                + _grouping(transform)
            )
        )
    if len(token_groups) > 1:
        notes.append(Note(f"per-token group sizes {token_groups} become one q_group_size={group}"))
    notes += _token_notes(
        transform,
        "QuantizedCache",
        "QuantizedCache keeps 0 to residual_length-1 recent tokens unquantized and quantizes the whole prompt",
    )
    return config, notes


# -- dispatch -----------------------------------------------------------------------------------------------


def _kvtuner(transform: KVTransform, arch: ArchInfo) -> Export:
    text = to_kvtuner_yaml(transform)
    data = {str(i): b for i, b in kvtuner_layers(transform).items()}
    return Export("kvtuner-yaml", text, data, kvtuner_notes(transform))


def _dtypes(transform: KVTransform, arch: ArchInfo) -> Export:
    return Export("layer-dtypes", to_layer_dtypes(transform), layer_dtypes(transform), layer_dtypes_notes(transform))


def _hf(transform: KVTransform, arch: ArchInfo) -> Export:
    config, notes = hf_cache_config(transform, arch)
    return Export("hf-cache-config", json.dumps(config, indent=2) + "\n", config, notes)


#: format name -> exporter
EXPORTERS: dict[str, Callable[[KVTransform, ArchInfo], Export]] = {
    "kvtuner-yaml": _kvtuner,
    "layer-dtypes": _dtypes,
    "hf-cache-config": _hf,
}
FORMATS = tuple(EXPORTERS)


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
    where = ", ".join(f"{kind} {_layers(idx)}" for kind, idx in replaced.items() if idx)
    projected = dataclasses.replace(transform, keys=slots["keys"], values=slots["values"])
    return projected, [
        Note(
            f"non-uniform datatypes ({where}) are exported as uniform integers of the same bits: the consumer's "
            "quantizer replaces kvtool's calibrated lookup tables and fp16 outliers"
        )  # fmt: skip
    ]


def export(fmt: str, transform: KVTransform, arch: ArchInfo) -> Export:
    """Export ``transform`` (of a model with ``arch``) to ``fmt``; an unknown format is a usage error."""
    if fmt not in EXPORTERS:
        raise UsageError(f"unknown export format '{fmt}' (expected one of: {', '.join(FORMATS)})")
    transform, notes = uniform_projection(transform)
    result = EXPORTERS[fmt](transform, arch)
    return dataclasses.replace(result, notes=notes + result.notes)
