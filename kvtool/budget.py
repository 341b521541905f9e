"""One budget type for every solver, with one parser: CLI flags, ``calibrate --resolve`` and the bench's
``ARTIFACT@BUDGET`` suffixes all build a :class:`Budget`.

Grammar of a budget string (``Budget.parse``):

* ``3.25``: bits per element in the artifact's own accounting; ``3.25n`` nominal (code bits only, KVTuner's
  convention), ``3.25a`` all-in (metadata and fp16 tokens counted);
* ``r0.5``: the kept-rank fraction of a projection's keys and values; ``r0.5k`` / ``r0.5v``: keys or values only
  (the other stays fp16);
* ``L2``: codec rate level 2 of a projection artifact (its entropy-coded quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvtool.errors import UsageError

ACCOUNTINGS = ("nominal", "all-in")


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``bits`` (with ``accounting``: ``None`` = the artifact's own), ``rank_fraction`` (over
    ``kinds``) or ``level``. Invalid combinations raise ``ValueError`` naming the field."""

    bits: float | None = None
    accounting: str | None = None
    rank_fraction: float | None = None
    kinds: str = "kv"  #: rank budgets only: which of K and V are projected ("k", "v" or "kv")
    level: int | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.bits, self.rank_fraction, self.level)) != 1:
            raise ValueError("a budget is exactly one of bits, rank_fraction or level")
        if self.bits is not None and not (math.isfinite(self.bits) and self.bits > 0):
            raise ValueError(f"bits must be a positive number (got {self.bits})")
        if self.accounting is not None and self.accounting not in ACCOUNTINGS:
            raise ValueError(f"accounting must be one of {', '.join(ACCOUNTINGS)} (got {self.accounting!r})")
        if self.rank_fraction is not None and not 0 <= self.rank_fraction <= 1:
            raise ValueError(f"rank_fraction must be in [0, 1] (got {self.rank_fraction})")
        if self.kinds not in ("k", "v", "kv"):
            raise ValueError(f"kinds must be k, v or kv (got {self.kinds!r})")
        if self.level is not None and self.level < 0:
            raise ValueError(f"level must be >= 0 (got {self.level})")

    @classmethod
    def parse(cls, spec: str) -> Budget:
        """A budget string (module docstring); a malformed one is a :class:`UsageError` that quotes it."""
        try:
            if spec.startswith("L"):
                return cls(level=int(spec[1:]))
            if spec.startswith("r"):
                kinds = spec[-1] if spec[-1] in "kv" else "kv"
                return cls(rank_fraction=float(spec[1:].rstrip("kv")), kinds=kinds)
            accounting = {"n": "nominal", "a": "all-in"}.get(spec[-1:])
            return cls(bits=float(spec[:-1] if accounting else spec), accounting=accounting)
        except ValueError as e:
            raise UsageError(f"budget '{spec}': use bits (2.5, 2.5n, 2.5a), a rank fraction (r0.5, r0.5k, r0.5v) or "
                             f"a codec level (L2) ({e})") from None  # fmt: skip

    def label(self) -> str:
        """Short name (transform names, file names): ``2.5b``, ``r0.5``, ``r0.5k``, ``L2``."""
        if self.level is not None:
            return f"L{self.level}"
        if self.bits is not None:
            return f"{self.bits:g}b"
        return f"r{self.rank_fraction:g}" + ("" if self.kinds == "kv" else self.kinds)
