"""``kvtuner-yaml``: KVTuner's per-layer bits, ``{layer: {nbits_key, nbits_value}}``, read by
``FlexibleQuantizedCacheConfig(per_layer_quant=True, per_layer_config_path=...)`` with ``yaml.safe_load``."""

from __future__ import annotations

from kvtool.exports._common import Note, checked, describe, grouping, token_notes, unquantized
from kvtool.quantizers import UniformQuantizer
from kvtool.transforms import KVTransform, TensorTransform

#: KVTuner's two global modes (its repository's ``kivi`` / ``pertoken`` settings)
KVTUNER_MODES = {
    "kivi": "axis_key=1, axis_value=0, q_group_size=32, residual_length=32",
    "pertoken": "axis_key=0, axis_value=0, q_group_size=-1, residual_length=0",
}
#: the bits KVTuner's HQQ backend and its own presets use; its Vanilla backend takes any integer
KVTUNER_HQQ_BITS = (2, 4, 8)


def kvtuner_layers(transform: KVTransform) -> dict[int, dict[str, int]]:
    """``{layer: {"nbits_key", "nbits_value"}}``; layers kept in fp16 (cast or untouched) become 8 bits, the widest
    setting KVTuner's int8-code quantizer can hold."""
    checked(transform, "kvtuner-yaml", "KVTuner only understands uniform integer bits")

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
        Note(f"grouping per layer (KVTuner sets one axis and group size for all layers): {grouping(transform)}"),
        Note("zero points: kvtool stores the fp16 group minimum, KVTuner rounds the zero point to an integer"),
        *token_notes(transform, "KVTuner", "KVTuner's global residual_length: 32 in kivi mode, 0 in pertoken"),
    ]
    kept = unquantized(transform)
    if any(kept.values()):
        notes.append(
            Note(
                f"layers kept unquantized ({describe(kept)}) are written as 8 bits: KVTuner has no unquantized "
                "setting and its vanilla quantizer stores int8 codes"
            )
        )
    odd = sorted({b for layer in kvtuner_layers(transform).values() for b in layer.values()} - set(KVTUNER_HQQ_BITS))
    if odd:
        hqq = ", ".join(map(str, KVTUNER_HQQ_BITS))
        notes.append(Note(f"bits {', '.join(map(str, odd))} run on KVTuner's Vanilla backend only: its HQQ backend "
                          f"takes {hqq}"))  # fmt: skip
    notes.append(Note(f"closest KVTuner mode: {mode} ({KVTUNER_MODES[mode]})", lossy=False))
    return notes


def to_kvtuner_yaml(transform: KVTransform) -> str:
    """KVTuner's per-layer YAML (written by hand: deterministic, no YAML dependency), with a comment header."""
    layers = kvtuner_layers(transform)
    lines = [
        "# KVTuner per-layer KV bits, exported by kvtool from the calibrated transform "
        f"'{transform.name}' ({len(layers)} layers).",
        "# Load: FlexibleQuantizedCacheConfig(per_layer_quant=True, per_layer_config_path=<this file>, ...)",
        "# Backends: Vanilla takes any integer bits; HQQ only 2, 4 and 8 (KVTuner's own presets use no others).",
        "# This file holds bits only; KVTuner's axis, group size and residual are global settings. Not represented:",
        *[f"#   {n.text}" for n in kvtuner_notes(transform)],
    ]
    for i, bits in layers.items():
        lines += [f"{i}:", f"  nbits_key: {bits['nbits_key']}", f"  nbits_value: {bits['nbits_value']}"]
    if not layers:
        lines.append("{}")
    return "\n".join(lines) + "\n"


