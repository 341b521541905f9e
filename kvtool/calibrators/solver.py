"""Budgeted choice of one candidate per slot: Pareto pruning and an exact multiple-choice knapsack.

A *slot* is one layer's keys or one layer's values. Each slot has candidates with a cost (bits per element) and
an additive error (the sensitivity proxy). The solver minimises the total error subject to the element-weighted
mean cost staying within the budget. Costs are discretised upwards (never below their true value) on a grid of
``1 / resolution`` bit per element of the largest slot, so a returned solution always meets the budget exactly as
measured; it is optimal on that grid (KVTuner, arXiv:2502.04420, searches the same space with 1000 NSGA-II trials
of GSM8K instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kvtool.errors import UsageError


def pareto_mask(cost: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Candidates not dominated on (cost, error): no other candidate is at most as costly and strictly better, or
    strictly cheaper and at most as bad. Ties keep the first. ``cost``, ``error``: ``(n,)``; returns bool ``(n,)``."""
    order = np.lexsort((error, cost))  # by cost, then error
    keep = np.zeros(len(cost), dtype=bool)
    best = math.inf
    for i in order:
        if error[i] < best:
            keep[i] = True
            best = error[i]
    return keep


def solve_budget(
    costs: Sequence[np.ndarray],
    errors: Sequence[np.ndarray],
    weights: Sequence[float],
    target: float,
    allowed: Sequence[np.ndarray] | None = None,
    resolution: int = 256,
) -> list[int]:
    """Pick one candidate per slot minimising ``Σ error`` with ``Σ w·cost / Σ w ≤ target``.

    Parameters
    ----------
    costs, errors : sequence of ``(n_s,)`` arrays
        Bits per element and proxy error of each candidate of slot ``s``.
    weights : sequence of float
        Elements of each slot (slots of sliding-window layers hold fewer tokens).
    target : float
        Budget in bits per element, averaged over all elements.
    allowed : sequence of bool ``(n_s,)`` arrays, optional
        Candidates the solver may pick (e.g. the Pareto set); default all.
    resolution : int
        Grid steps per bit per element of the largest slot.

    Returns
    -------
    list[int]
        The chosen candidate index of every slot.

    Raises
    ------
    UsageError
        No choice fits the budget (the target is below the cheapest configuration).
    """
    w = np.asarray(weights, dtype=np.float64)
    scale = resolution / w.max()
    budget = int(math.floor(target * w.sum() * scale + 1e-9))
    masks = [np.ones(len(c), dtype=bool) for c in costs] if allowed is None else [np.asarray(a, bool) for a in allowed]
    cheapest = sum(float(np.min(np.asarray(c)[m])) * wi for c, m, wi in zip(costs, masks, w, strict=True))
    if cheapest > target * w.sum() + 1e-9:
        raise UsageError(
            f"--target-bits {target:g} is below the cheapest configuration ({cheapest / w.sum():.3f} bits per element)"
        )
    inf = np.inf
    dp = np.zeros(budget + 1)  # dp[b]: least error of the slots so far within cost b
    choices = np.zeros((len(costs), budget + 1), dtype=np.int16)
    for s, (c, e) in enumerate(zip(costs, errors, strict=True)):
        units = np.ceil(np.asarray(c, dtype=np.float64) * w[s] * scale - 1e-9).astype(np.int64)
        ok = masks[s]
        new = np.full(budget + 1, inf)
        arg = np.zeros(budget + 1, dtype=np.int16)
        for j in np.flatnonzero(ok):
            u = units[j]
            if u > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[u:] = dp[: budget + 1 - u] + float(e[j])
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp, choices[s] = new, arg
    if not np.isfinite(dp[budget]):
        # Rounding costs up can push a configuration that exactly meets the target off the grid; the cheapest
        # configuration met it (checked above), so it is the answer.
        return [int(np.flatnonzero(m)[np.lexsort((np.asarray(e)[m], np.asarray(c)[m]))[0]])
                for c, e, m in zip(costs, errors, masks, strict=True)]  # fmt: skip
    picks, b = [], budget
    for s in range(len(costs) - 1, -1, -1):
        j = int(choices[s, b])
        picks.append(j)
        b -= int(np.ceil(float(costs[s][j]) * w[s] * scale - 1e-9))
    return picks[::-1]
