"""Named KV configurations for ``bench`` and the CLI: ``fp16``, ``token-k4v4``, ``kivi-k4v2-g64-s4-r128``, ...

Grammar: ``<family>-k<K bits>v<V bits>[-g<group>][-s<sink tokens>][-r<recent tokens>][-post]``

* ``token``: per-token keys and values (groups along head_dim; ``-g`` sets the group, default the whole head);
* ``kivi``: KIVI-style per-channel keys over groups of ``-g`` tokens (default 32) and per-token values;
* ``-post`` quantizes keys after RoPE instead of before (the default is pre-RoPE, KVQuant's finding).

``nf<b>[-o<outlier %>][-s<sinks>]``: KVQuant-style NormalFloat datatype with no calibration at all: keys (pre-RoPE)
and values normalised per token at run time, ``<b>``-bit NormalFloat levels, 1 % fp16 outliers by default.

``original`` is the untouched cache (the identity transform, the reference of every comparison); ``fp16`` and
``bf16`` round K/V to that 16-bit format (what a serving engine stores). Keys and values may differ in bits.

``fp8``, ``fp8-head``, ``nvfp4``: the engines' KV formats with *dynamic* scales (each tensor's own amax, per tensor
or per KV head), post-RoPE keys, no fp16 tokens: what an engine does without calibrated scales. Their static,
calibrated form is ``kvtool calibrate --kv-dtype`` (an artifact in ``--configs``).
"""

from __future__ import annotations

import re

from kvtool.arch import ArchInfo
from kvtool.errors import UsageError
from kvtool.quantizers import FloatCast, Fp8Quantizer, NonUniformQuantizer, Nvfp4Quantizer, UniformQuantizer
from kvtool.transforms import KVTransform

REFERENCE = "original"
BASELINES = (
    "fp16",
    "token-k8v8",
    "token-k4v4",
    "token-k3v3",
    "token-k2v2",
    "kivi-k8v8",
    "kivi-k4v4",
    "kivi-k3v3",
    "kivi-k2v2",
)

_PATTERN = re.compile(
    r"^(?P<family>token|kivi)-k(?P<kb>\d)v(?P<vb>\d)(?:-g(?P<g>\d+))?(?:-s(?P<s>\d+))?(?:-r(?P<r>\d+))?(?P<post>-post)?$"
)


#: engine KV formats with dynamic scales (the tensor's own amax), as engines quantize: post-RoPE, every token
ENGINE_DYNAMIC = {"fp8": Fp8Quantizer("tensor"), "fp8-head": Fp8Quantizer("head"), "nvfp4": Nvfp4Quantizer()}

_NF = re.compile(r"^nf(?P<b>\d)(?:-o(?P<o>\d+(?:\.\d+)?))?(?:-s(?P<s>\d+))?$")


def _normal_float(name: str, m: re.Match[str], arch: ArchInfo) -> KVTransform:
    try:
        q = NonUniformQuantizer(
            int(m["b"]), "token", arch.num_kv_heads, arch.head_dim, float(m["o"] or 1) / 100, table="nf"
        )
    except ValueError as e:
        raise UsageError(f"configuration '{name}': {e}") from e
    return KVTransform.uniform(arch.num_layers, q, q, sink_tokens=int(m["s"] or 0), name=name)


def parse_preset(name: str, arch: ArchInfo) -> KVTransform:
    """Build the :class:`KVTransform` a preset name describes (raises :class:`UsageError` if malformed)."""
    if name == REFERENCE:
        return KVTransform.uniform(arch.num_layers, None, None, name=name)
    if name in ("fp16", "bf16"):
        cast = FloatCast("float16" if name == "fp16" else "bfloat16")
        return KVTransform.uniform(arch.num_layers, cast, cast, keys_pre_rope=False, name=name)
    if name in ENGINE_DYNAMIC:
        q = ENGINE_DYNAMIC[name]
        return KVTransform.uniform(arch.num_layers, q, q, keys_pre_rope=False, name=name)
    if nf := _NF.match(name):
        return _normal_float(name, nf, arch)
    m = _PATTERN.match(name)
    if not m:
        raise UsageError(
            f"unknown configuration '{name}' (expected e.g. original, fp16, token-k4v4, kivi-k4v2-g32-s1-r128)"
        )
    kb, vb = int(m["kb"]), int(m["vb"])
    g = int(m["g"]) if m["g"] else None
    try:
        if m["family"] == "token":
            key, value = UniformQuantizer(kb, "token", g), UniformQuantizer(vb, "token", g)
        else:
            key, value = UniformQuantizer(kb, "channel", g or 32), UniformQuantizer(vb, "token")
    except ValueError as e:
        raise UsageError(f"configuration '{name}': {e}") from e
    return KVTransform.uniform(
        arch.num_layers,
        key,
        value,
        keys_pre_rope=not m["post"],
        sink_tokens=int(m["s"] or 0),
        recent_tokens=int(m["r"] or 0),
        name=name,
    )
