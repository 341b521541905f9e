"""The ``kvtool bench --configs`` grammar, parsed in one place into a :class:`ConfigEntry`.

An entry is one of:

* a **preset** name (``original``, ``fp16``, ``kivi-k4v2-g32``, ``nf4``: :mod:`kvtool.eval.presets`);
* a **calibration artifact** ``PATH.safetensors``, optionally re-solved: ``PATH.safetensors@BUDGET`` (the budget
  grammar of :mod:`kvtool.budget`: ``@2.5``, ``@3.25n``, ``@r0.5k``, ``@L2``);
* a **codec**: ``kvz:lossless``, ``kvz:q<step in σ>`` (adaptive), ``kvz:PATH.safetensors[@<bits>|@L<n>]``
  (calibrated; default ``@1.0``), ``lmcache-kvtool@<bits>`` / ``lmcache-kvtool-plain@<bits>`` /
  ``lmcache-kvtool:PATH.safetensors@<bits>`` (fixed-size records of post-RoPE chunks, what the LMCache serde
  stores with the model's RoPE tables / without them / calibrated; the bits may be followed by ``o<N>`` and
  ``z<Z>``: the serde's ``outlier_tokens`` and ``outlier_z``, e.g. ``@1.3o4z4``), or a peer: ``zstd-fp16``,
  ``cachegen``, ``lmcache-fp8``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvtool.budget import Budget
from kvtool.errors import UsageError

PEERS = ("zstd-fp16", "cachegen", "lmcache-fp8")


@dataclass(frozen=True)
class ConfigEntry:
    """What a ``--configs`` entry names (``name`` is the entry as written)."""

    name: str
    kind: Literal["preset", "artifact", "codec", "peer"]
    path: str | None = None  #: artifact (kind ``artifact``, or a calibrated codec)
    budget: Budget | None = None  #: ``@…`` suffix of an artifact or a calibrated codec
    codec: Literal["lossless", "adaptive", "calibrated", "record"] | None = None
    quality: float | None = None  #: adaptive codec step in standard deviations
    bits: float | None = None  #: chunk-record size in bits per element (``lmcache-kvtool@<bits>``)
    rope: bool = True  #: chunk records: keys rotated back within the chunk (``lmcache-kvtool-plain``: not)
    outlier_tokens: int | None = None  #: chunk records: ``o<N>`` suffix (the serde's ``outlier_tokens``)
    outlier_z: float | None = None  #: chunk records: ``z<Z>`` suffix (the serde's ``outlier_z``)

    @property
    def family(self) -> str:
        """The curve a row belongs to in the RD plot: ``kvz A``, ``kvz adaptive``, ``kivi``, ``A`` ..."""
        if self.kind == "codec":
            if self.codec == "adaptive":
                return "kvz adaptive"
            if self.codec == "record":
                if self.path:
                    return "lmcache-kvtool " + _stem(self.path)
                return "lmcache-kvtool" if self.rope else "lmcache-kvtool-plain"
            return "kvz " + (_stem(self.path) if self.path else "lossless")
        if self.kind == "artifact":
            return _stem(self.path or self.name)
        if self.kind == "peer":
            return self.name  # one point each: "lmcache-fp8" is not the "lmcache-kvtool" curve
        return self.name.split("-")[0]


def _stem(path: str) -> str:
    return re.sub(r"(\.kvcal)?\.safetensors$", "", Path(path).name)


def parse_config(name: str) -> ConfigEntry:
    """The :class:`ConfigEntry` of one ``--configs`` entry (see the module docstring); a malformed one is a
    :class:`UsageError` quoting it. Presets are checked when built (:func:`kvtool.eval.presets.parse_preset`)."""
    if name in PEERS:
        return ConfigEntry(name, "peer")
    if name.startswith("lmcache-kvtool"):
        kind, _, rate = name.rpartition("@")
        kind, _, path = kind.partition(":")
        # <bits>[o<outlier tokens>][z<outlier z>]: the serde's bits, outlier_tokens and outlier_z
        m = re.fullmatch(r"(?P<bits>[0-9.]+)(?:o(?P<o>[0-9]+))?(?:z(?P<z>[0-9.]+))?", rate)
        try:
            if kind not in ("lmcache-kvtool", "lmcache-kvtool-plain") or (path and kind != "lmcache-kvtool") or not m:
                raise ValueError(kind)
            return ConfigEntry(name, "codec", codec="record", bits=float(m["bits"]), rope=kind == "lmcache-kvtool",
                               path=path or None, outlier_tokens=int(m["o"]) if m["o"] else None,
                               outlier_z=float(m["z"]) if m["z"] else None)  # fmt: skip
        except ValueError:
            raise UsageError(f"'{name}': use lmcache-kvtool[-plain]@<bits per element>[o<outlier tokens>][z<outlier "
                             "z>] or lmcache-kvtool:<artifact>@<bits>..., e.g. lmcache-kvtool@2.0") from None
    if name.startswith("kvz:"):
        spec = name[4:]
        if spec == "lossless":
            return ConfigEntry(name, "codec", codec="lossless")
        if spec.startswith("q"):
            try:
                return ConfigEntry(name, "codec", codec="adaptive", quality=float(spec[1:]))
            except ValueError:
                raise UsageError(f"'{name}': use kvz:q<step in σ>, e.g. kvz:q0.5") from None
        path, _, level = spec.partition("@")
        budget = Budget.parse(level or "1.0")
        if budget.rank_fraction is not None:
            raise UsageError(f"'{name}': use kvz:<artifact>@<bits> or kvz:<artifact>@L<level>")
        return ConfigEntry(name, "codec", path=path, budget=budget, codec="calibrated")
    path, _, budget = name.partition("@")
    if path.endswith(".safetensors"):
        return ConfigEntry(name, "artifact", path=path, budget=Budget.parse(budget) if budget else None)
    return ConfigEntry(name, "preset")
