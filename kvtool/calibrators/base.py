"""The calibrator protocol, the registry of calibrators by name, and the one-call Python entry.

Every calibration method is one object that is also its config (kvpress style: the method object is what the
artifact records), registered with :mod:`kvtool.config`, and implements :class:`Calibrator`:

    cal = calibrator("pca", target_bits=2.0, num_seqs=2)     # the method object, from the registry
    table = cal.fit(lm, ids, special_prefix=[])              # measure: the method's table (Fisher passes)
    transform = cal.solve(table, Budget(bits=2.5))           # a per-layer KVTransform for a budget
    artifacts = cal.artifacts(model_record(lm), inputs, table)   # {output key: artifact}, ready to write

or in one call: ``calibrate(lm, cal)``. ``kvtool calibrate`` is "build the method from flags → fit → artifacts →
(validate) → write". Re-solving a written artifact for another budget without the model is
:func:`kvtool.calibrators.resolve_budget`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from kvtool.artifacts import Artifact
from kvtool.budget import Budget
from kvtool.errors import UsageError
from kvtool.transforms import KVTransform


@runtime_checkable
class Calibrator(Protocol):
    """What ``kvtool calibrate`` and :func:`calibrate` need of a method (its settings are its own fields)."""

    num_seqs: int
    seq_len: int
    seed: int

    def describe(self, arch: Any) -> str:
        """One line for the log: what will be measured on how much data (for a model of ``arch``)."""
        ...

    def outputs(self) -> dict[int, str]:
        """The artifacts it writes: ``{key: file suffix}`` (most methods one, nuq one per bit width)."""
        ...

    @property
    def passes(self) -> int:
        """Passes :meth:`fit` makes over the ``num_seqs`` calibration sequences (``progress`` is called once per
        sequence of each): statistics stream, so a method that needs the data twice reads it twice."""
        ...

    def fit(self, lm: Any, ids: torch.Tensor, *, special_prefix: list[int],
            progress: Callable[[int], None] | None = None) -> Any:  # fmt: skip
        """Measure on ``ids`` (calibration text tokens; each sequence starts with ``special_prefix``)."""
        ...

    def solve(self, table: Any, budget: Budget | None = None) -> KVTransform:
        """The per-layer transform for ``budget`` (``None``: the one the method's own settings ask for)."""
        ...

    def artifacts(self, record: dict[str, Any], inputs: dict[str, Any], table: Any) -> dict[int, Artifact]:
        """The artifacts (keys of :meth:`outputs`) for the model ``record`` and calibration ``inputs``."""
        ...


def registry() -> dict[str, Callable[..., Calibrator]]:
    """Calibrators by ``--method`` name: each a factory taking the method's settings as keywords."""
    from kvtool.calibrators.engine_kv import EngineKVCalibration
    from kvtool.calibrators.nuq import NUQCalibration
    from kvtool.calibrators.precision_search import PrecisionSearch
    from kvtool.calibrators.projection import ProjectionCalibration

    return {
        "search": PrecisionSearch,
        "nuq": NUQCalibration,
        "pca": lambda **kw: ProjectionCalibration(method="pca", **kw),
        "svd": lambda **kw: ProjectionCalibration(method="svd", **kw),
        "engine": EngineKVCalibration,
    }


def calibrator(method: str, **settings: Any) -> Calibrator:
    """The method ``method`` with ``settings`` (its fields); an unknown name is a :class:`UsageError`."""
    factories = registry()
    if method not in factories:
        raise UsageError(f"--method must be one of {', '.join(factories)} (got '{method}')")
    return factories[method](**settings)


def calibration_inputs(lm: Any, cal: Calibrator, text: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration text's token ids (text tokens; each sequence gets the tokenizer's special prefix when it is
    cut) and the ``inputs`` record every calibration artifact carries."""
    from kvtool.digests import token_digest
    from kvtool.models import special_prefix, tokenize
    from kvtool.texts import load_text

    ids = tokenize(lm.tokenizer, load_text(text))
    inputs = {"text": text, "token_ids_digest": token_digest(ids), "tokens": int(ids.numel()),
              "num_seqs": cal.num_seqs, "seq_len": cal.seq_len, "seed": cal.seed,
              "special_prefix": special_prefix(lm.tokenizer)}  # fmt: skip
    return ids, inputs


def calibrate(lm: Any, cal: Calibrator, text: str = "calibration",
              progress: Callable[[int], None] | None = None) -> dict[int, Artifact]:  # fmt: skip
    """Calibrate ``lm`` (a kvtool ``LoadedModel``) with ``cal`` on ``text`` (a book name, file or text): the
    artifacts of :meth:`Calibrator.artifacts`, not yet written (``kvtool.write_artifact`` writes one)."""
    from kvtool.models import model_record

    ids, inputs = calibration_inputs(lm, cal, text)
    table = cal.fit(lm, ids, special_prefix=inputs["special_prefix"], progress=progress)
    return cal.artifacts(model_record(lm), inputs, table)
