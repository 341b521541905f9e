"""What every export shares: the result record, per-slot checks, dtype and layout names, layer ranges and the
notes on tokens and RoPE that several formats cannot carry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtool.errors import UsageError
from kvtool.quantizers import FloatCast, UniformQuantizer
from kvtool.transforms import KVTransform, TensorTransform

_CAST_NAMES = {"float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class ScaleSites:
    """Where a checkpoint holds each layer's KV scales, as the calibration found them in the model: the attention
    module (``model.layers.0.self_attn``) and its key / value projections (``None`` where fused or absent), and the
    calibration amax ``{"k" | "v": (layers, kv_heads)}`` (scales of layers kept in the model dtype)."""

    attention: list[str | None]
    kv_proj: list[dict[str, str] | None]
    amax: dict[str, Any] | None = None


@dataclass(frozen=True)
class Note:
    """One fact about the export: ``lossy`` ones are what the format cannot carry."""

    text: str
    lossy: bool = True


@dataclass(frozen=True)
class Export:
    """An export: the file contents, their JSON form (for ``--json``), and the notes on what was lost.

    A format of several files (a config and a safetensors file of scales) has them in ``files`` (``{name:
    bytes}``, ``text`` being the main one): it is written as a folder.
    """

    format: str
    text: str
    data: Any
    notes: list[Note] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def lossy(self) -> list[str]:
        return [n.text for n in self.notes if n.lossy]


# -- per-slot helpers ---------------------------------------------------------------------------------------


def check_slot(t: TensorTransform | None, layer: int, kind: str, fmt: str, why: str) -> None:
    if t is None or isinstance(t, UniformQuantizer | FloatCast):
        return
    raise UsageError(
        f"layer {layer} {'keys' if kind == 'k' else 'values'}: {type(t).__name__} ({t.label()}) cannot be exported "
        f"to {fmt}: {why}"
    )


def checked(transform: KVTransform, fmt: str, why: str) -> None:
    for kind, slots in (("k", transform.keys), ("v", transform.values)):
        for i, t in enumerate(slots):
            check_slot(t, i, kind, fmt, why)


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


def layer_ranges(indices: Sequence[int]) -> str:
    """Sorted layer indices as ranges: ``[0, 1, 4]`` → ``0-1,4``."""
    parts, k = [], 0
    while k < len(indices):
        j = k
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(f"{indices[k]}-{indices[j]}" if j > k else f"{indices[k]}")
        k = j + 1
    return ",".join(parts)


def unquantized(transform: KVTransform) -> dict[str, list[int]]:
    return {
        kind: [i for i, t in enumerate(slots) if not isinstance(t, UniformQuantizer)]
        for kind, slots in (("keys", transform.keys), ("values", transform.values))
    }


def describe(per_kind: dict[str, list[int]]) -> str:
    return ", ".join(f"{kind} {layer_ranges(idx)}" for kind, idx in per_kind.items() if idx)


def grouping(transform: KVTransform) -> str:
    keys, values = (runs([layout_name(t) for t in slots]) for slots in (transform.keys, transform.values))
    return f"keys {keys} and values {values}"


def quantized_keys(transform: KVTransform) -> bool:
    return any(isinstance(t, UniformQuantizer) for t in transform.keys)


def token_notes(transform: KVTransform, consumer: str, recent_note: str) -> list[Note]:
    notes = [
        Note(f"sink tokens kept in fp16: {transform.sink_tokens} ({consumer} keeps none)", transform.sink_tokens > 0),
        Note(f"recent tokens kept in fp16: {transform.recent_tokens} ({recent_note})", transform.recent_tokens > 0),
    ]
    if transform.keys_pre_rope and quantized_keys(transform):
        notes.append(Note(f"keys were quantized before RoPE but {consumer} quantizes the cached post-RoPE keys"))
    rotated = {
        kind: [i for i, t in enumerate(slots) if isinstance(t, UniformQuantizer) and t.rotate]
        for kind, slots in (("keys", transform.keys), ("values", transform.values))
    }
    if any(rotated.values()):
        where = ", ".join(f"{kind} {layer_ranges(idx)}" for kind, idx in rotated.items() if idx)
        notes.append(Note(f"Hadamard-rotated per-token layers ({where}) are quantized unrotated by {consumer}"))
    return notes
