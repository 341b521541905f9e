"""``hf-cache-config``: the closest transformers ``QuantizedCache`` keyword arguments (one setting for all layers)."""

from __future__ import annotations

from typing import Any

from kvtool.arch import ArchInfo
from kvtool.errors import UsageError
from kvtool.exports._common import Note, checked, describe, dtype_name, grouping, runs, token_notes, unquantized
from kvtool.quantizers import UniformQuantizer
from kvtool.transforms import KVTransform

#: quanto's bit widths in transformers' ``QuantoQuantizedLayer``
QUANTO_BITS = (2, 4)
def hf_cache_config(transform: KVTransform, arch: ArchInfo) -> tuple[dict[str, Any], list[Note]]:
    """The closest transformers ``QuantizedCache`` keyword arguments, and the notes on what they lose.

    ``QuantizedCache(backend="quanto", ...)`` uses one ``nbits`` (2 or 4) for every layer's K and V, per-token
    groups of ``q_group_size`` channels (``axis_key = axis_value = 0``) and a residual of ``residual_length`` recent
    tokens. ``nbits`` is the smallest quanto width >= the largest bits used (capped at 4); ``q_group_size`` the
    smallest per-token group of the transform (the whole head when none is grouped per token); ``residual_length``
    the transform's recent tokens.
    """
    checked(transform, "hf-cache-config", "transformers' QuantizedCache only has uniform integer quantization")
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
    kept = unquantized(transform)
    if any(kept.values()):
        notes.append(Note(f"layers kept unquantized ({describe(kept)}) are quantized to nbits={nbits} too"))
    if any(t.axis == "channel" for t in slots):
        notes.append(
            Note(
                "per-channel groups of tokens become per-token groups of q_group_size channels (axis 0, since quanto's "
                "axis -1 needs the group to divide batch x heads x tokens at every quantization): "
                + grouping(transform)
            )
        )
    if len(token_groups) > 1:
        notes.append(Note(f"per-token group sizes {token_groups} become one q_group_size={group}"))
    notes += token_notes(
        transform,
        "QuantizedCache",
        "QuantizedCache keeps 0 to residual_length-1 recent tokens unquantized and quantizes the whole prompt",
    )
    return config, notes


