"""The ``kvtool.kv_calibration`` artifact: what a calibrator decided, for which model, from which inputs.

Every calibrator produces a per-layer :class:`~kvtool.transforms.KVTransform`; the artifact records it explicitly
(``extra.transform``: per layer, the key and value method with all its settings; keys pre-RoPE or not; sink and
recent tokens), its bits at the calibration context, the optional held-out validation, and the method's own
tables as stacked tensors (e.g. the precision search's measured candidate table). Nothing is left implicit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvtool import config as kvconfig
from kvtool.arch import ArchInfo
from kvtool.artifacts import Artifact, read_artifact
from kvtool.errors import ArtifactError
from kvtool.transforms import KVTransform

SCHEMA = "kvtool.kv_calibration"


def calibration_artifact(
    model: dict[str, Any],
    method: Any,
    inputs: dict[str, Any],
    transform: KVTransform,
    extra: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    context_len: int,
) -> Artifact:
    """Assemble the artifact of a calibration.

    ``model`` is the fingerprint with its ``arch`` (:meth:`ArchInfo.to_dict`); ``method`` a registered config.
    """
    bits = transform.bits(ArchInfo.from_dict(model["arch"]), context_len)
    return Artifact(
        schema=SCHEMA,
        schema_version=1,
        model=model,
        inputs=inputs,
        method=kvconfig.to_dict(method),
        extra={
            "transform": transform.to_dict(),
            "bits": {"nominal": bits["nominal"], "all_in": bits["all_in"], "context_len": context_len},
            "validation": None,
            **extra,
        },
        tensors={**transform.stacked_tensors(), **tensors},
    )


def transform_of(art: Artifact) -> KVTransform:
    """The per-layer transform a calibration artifact prescribes."""
    if art.schema != SCHEMA or "transform" not in art.extra:
        raise ArtifactError(f"{art.schema} is not a calibration artifact with a KV transform")
    try:
        transform = KVTransform.from_dict(art.extra["transform"]).bind(art.tensors)
        if "arch" in art.model and len(transform.keys) != ArchInfo.from_dict(art.model["arch"]).num_layers:
            raise ValueError("the transform does not have one entry per layer of the recorded model")
        return transform
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        # the artifact passed its digest, so it was written this way: a forged or foreign file, not a bug here
        why = " ".join(str(e).split())
        raise ArtifactError(f"malformed calibration transform ({type(e).__name__}: {why})") from None


def load_calibration(path: str | Path, model: dict[str, str] | None = None) -> tuple[Artifact, KVTransform]:
    """Read and validate a calibration artifact (optionally for ``model``'s fingerprint) and its transform."""
    art = read_artifact(path, expect_schema=SCHEMA, model=model)
    return art, transform_of(art)
