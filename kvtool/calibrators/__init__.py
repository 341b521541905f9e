"""Calibrators: offline, per-model methods that write ``kvtool.kv_calibration`` artifacts (one method per file)."""

from __future__ import annotations

from kvtool import config as kvconfig
from kvtool.artifacts import Artifact
from kvtool.budget import Budget
from kvtool.errors import ArtifactError, UsageError
from kvtool.transforms import KVTransform


def resolve_budget(art: Artifact, budget: Budget | str) -> tuple[Artifact, KVTransform]:
    """Re-solve a calibration artifact's measured table for ``budget`` (a :class:`~kvtool.budget.Budget`, or its
    string form, see :mod:`kvtool.budget`) without the model: bits for the precision search (in the artifact's
    accounting unless the budget names one), bits, a rank fraction or a codec level for projections, all-in bits
    for an engine calibration (its skipped layers, or its per-layer formats when ``mixed``)."""
    from kvtool.calibrators.engine_kv import EngineKVCalibration, resolve_engine
    from kvtool.calibrators.precision_search import PrecisionSearch, resolve_artifact
    from kvtool.calibrators.projection import ProjectionCalibration, resolve_projection

    if isinstance(budget, str):
        budget = Budget.parse(budget)
    method = kvconfig.from_dict(art.method)
    if isinstance(method, ProjectionCalibration):
        return resolve_projection(art, budget)
    if isinstance(method, EngineKVCalibration):
        return resolve_engine(art, budget)
    if isinstance(method, PrecisionSearch):
        if budget.bits is None:
            raise UsageError(f"budget '{budget.label()}': a precision search is re-solved for bits, e.g. 3.25 or 3.25n")
        return resolve_artifact(art, budget.bits, budget.accounting or method.accounting)
    raise ArtifactError(f"made by {type(method).__name__}: it has no measured table to re-solve")
