"""The adaptive coder's slot statistics: the numba (CPU) twin equals the reference bit for bit (the Triton twin is
checked in ``kernel_checks.py``), and the dispatcher picks the twin of each backend."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import stats_inputs

from kvtool.codecs.slot_stats import slot_stats_reference
from kvtool.kernels import _numba_problem, slot_stats

pytestmark = pytest.mark.skipif(_numba_problem() is not None, reason="numba is not usable here")


@pytest.mark.parametrize("quality", [0.5, 1.5])
def test_numba_slot_stats_equal_the_reference(quality: float) -> None:
    from kvtool.kernels.stats_numba import slot_stats_numba

    for x in stats_inputs():
        got, want = slot_stats_numba(x, quality), slot_stats_reference(x, quality)
        for name, a, b in zip(want._fields, got, want, strict=True):
            assert torch.equal(a, b), f"{name} differs for {tuple(x.shape)}"


def test_dispatch_gives_the_same_values_on_every_cpu_backend() -> None:
    x = stats_inputs()[3]
    want = slot_stats_reference(x, 0.5)
    for backend in ("auto", "numba", "torch"):
        for a, b in zip(slot_stats(x, 0.5, backend), want, strict=True):
            assert torch.equal(a, b), backend
