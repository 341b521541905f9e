"""Calibrators: offline, per-model methods that write ``kvtool.kv_calibration`` artifacts (one method per file)."""

from __future__ import annotations

from kvtool import config as kvconfig
from kvtool.artifacts import Artifact
from kvtool.errors import ArtifactError, UsageError
from kvtool.transforms import KVTransform


def resolve_budget(art: Artifact, spec: str) -> tuple[Artifact, KVTransform]:
    """Re-solve a calibration artifact's measured table for the budget ``spec`` without the model.

    Precision search: ``3.25`` (the artifact's accounting), ``3.25n`` (nominal), ``3.25a`` (all-in). Projections:
    ``2.0`` (all-in bits), ``r0.5`` (kept rank fraction of K and V), ``r0.5k`` / ``r0.5v`` (K or V only).
    """
    from kvtool.calibrators.precision_search import PrecisionSearch, resolve_artifact
    from kvtool.calibrators.projection import Budget, ProjectionCalibration, resolve_projection

    method = kvconfig.from_dict(art.method)
    if isinstance(method, ProjectionCalibration):
        return resolve_projection(art, Budget.parse(spec))
    if isinstance(method, PrecisionSearch):
        accounting = {"n": "nominal", "a": "all-in"}.get(spec[-1:], method.accounting)
        try:
            bits = float(spec.rstrip("na"))
        except ValueError as e:
            raise UsageError(f"budget '{spec}' must be a number of bits, e.g. 3.25 or 3.25n") from e
        return resolve_artifact(art, bits, accounting)
    raise ArtifactError(f"made by {type(method).__name__}: it has no measured table to re-solve")
