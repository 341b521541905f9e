"""The budget solver: Pareto pruning and the exact multiple-choice knapsack, checked against brute force.

Instances are small enough (at most 4^5 = 1024 combinations) to enumerate. Costs are drawn on a grid of 1/8 bit and
weights from {1, 2}, so the solver's discretisation (``resolution / max weight`` steps per bit and element) is exact
and its answer must equal the brute-force optimum, not merely approach it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvtool.calibrators.solver import pareto_mask, solve_budget
from kvtool.errors import UsageError

SEEDS = range(20)

# -- pareto_mask -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cost", "error", "keep"),
    [
        ([1, 2, 3], [3, 2, 1], [True, True, True]),  # a proper front: nothing dominated
        ([1, 2, 3], [1, 2, 0.5], [True, False, True]),  # 1 is costlier and worse than 0
        ([3, 1, 2], [0.5, 1, 2], [True, True, False]),  # unsorted input; 2 dominated by 1
        ([2, 2], [3, 1], [False, True]),  # same cost: the better one stays
        ([1, 2], [1, 1], [True, False]),  # same error: the cheaper one stays
        ([2, 2], [1, 1], [True, False]),  # exact tie: the first stays
        ([2, 1, 2, 2], [1, 5, 1, 1], [True, True, False, False]),  # ties keep the first of the tied group
        ([4], [7], [True]),  # a single candidate
        ([5, 1, 3], [0, 9, 9], [True, True, False]),
    ],
)
def test_pareto_mask_hand_cases(cost: list[float], error: list[float], keep: list[bool]) -> None:
    got = pareto_mask(np.array(cost, dtype=float), np.array(error, dtype=float))
    assert got.dtype == bool
    assert got.tolist() == keep


def _dominates(c: np.ndarray, e: np.ndarray, j: int, i: int) -> bool:
    """j strictly dominates i: at most as costly and strictly better, or strictly cheaper and at most as bad."""
    return bool((c[j] <= c[i] and e[j] < e[i]) or (c[j] < c[i] and e[j] <= e[i]))


@pytest.mark.parametrize("seed", SEEDS)
def test_pareto_mask_property(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(1, 12))
        # Small integer ranges make equal costs, equal errors and exact duplicates common.
        c = rng.integers(0, 5, n).astype(float)
        e = rng.integers(0, 5, n).astype(float)
        keep = pareto_mask(c, e)
        kept = np.flatnonzero(keep)
        assert keep.any()
        for i in kept:
            assert not any(_dominates(c, e, j, i) for j in range(n)), (c, e, keep, i)
        # Kept candidates are pairwise distinct points (ties keep only one)...
        assert len({(c[i], e[i]) for i in kept}) == len(kept)
        for i in np.flatnonzero(~keep):
            # ...and every removed one is dominated by a kept one, or is the duplicate of an earlier kept one.
            assert any(_dominates(c, e, j, i) for j in kept) or any(
                j < i and c[j] == c[i] and e[j] == e[i] for j in kept
            ), (c, e, keep, i)
        # Ties keep the first: the kept copy of each (cost, error) point is its lowest index.
        for i in kept:
            assert all(not (c[j] == c[i] and e[j] == e[i]) for j in range(i)), (c, e, keep, i)


# -- solve_budget against brute force ----------------------------------------------------------------------------


def _instance(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], list[float], list[np.ndarray]]:
    """(costs in eighths of a bit as ints, errors, weights) of a random instance: 4-5 slots x 3-4 candidates."""
    slots = int(rng.integers(4, 6))
    eighths = [rng.integers(4, 129, int(rng.integers(3, 5))) for _ in range(slots)]  # 0.5 .. 16 bits
    errors = [rng.random(len(k)) * 10 for k in eighths]
    weights = [float(w) for w in rng.choice([1, 2], slots)]
    return eighths, errors, weights


def _brute_force(
    eighths: list[np.ndarray],
    errors: list[np.ndarray],
    weights: list[float],
    budget_eighths: int,
    allowed: list[np.ndarray] | None = None,
) -> float:
    """Least total error over all combinations with ``Σ w·cost <= budget`` (integer arithmetic, exact)."""
    best = np.inf
    pools = [range(len(k)) if allowed is None else np.flatnonzero(allowed[s]) for s, k in enumerate(eighths)]
    for combo in itertools.product(*pools):
        cost = sum(int(eighths[s][j]) * int(weights[s]) for s, j in enumerate(combo))
        if cost <= budget_eighths:
            best = min(best, sum(float(errors[s][j]) for s, j in enumerate(combo)))
    return best


def _targets(rng: np.random.Generator, eighths: list[np.ndarray], weights: list[float]) -> list[float]:
    """Budgets from the cheapest to the most expensive configuration, some exactly attainable (tight)."""
    w = np.array(weights)
    lo = float(np.dot([k.min() for k in eighths], w)) / 8 / w.sum()
    hi = float(np.dot([k.max() for k in eighths], w)) / 8 / w.sum()
    tight = [float(np.dot([rng.choice(k) for k in eighths], w)) / 8 / w.sum() for _ in range(3)]
    return [lo, hi, (lo + hi) / 2, *rng.uniform(lo, hi, 3).tolist(), *tight]


def _mean_cost(costs: list[np.ndarray], weights: list[float], picks: list[int]) -> float:
    w = np.array(weights)
    return float(np.dot([c[j] for c, j in zip(costs, picks, strict=True)], w) / w.sum())


@pytest.mark.parametrize("seed", SEEDS)
def test_solve_budget_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    eighths, errors, weights = _instance(rng)
    costs = [k / 8 for k in eighths]
    total_w = sum(weights)
    for target in _targets(rng, eighths, weights):
        picks = solve_budget(costs, errors, weights, target)
        assert len(picks) == len(costs)
        assert all(0 <= j < len(c) for j, c in zip(picks, costs, strict=True))
        assert _mean_cost(costs, weights, picks) <= target + 1e-12  # the pick meets the budget
        budget_eighths = int(np.floor(target * 8 * total_w + 1e-9))
        best = _brute_force(eighths, errors, weights, budget_eighths)
        got = sum(float(errors[s][j]) for s, j in enumerate(picks))
        assert got == pytest.approx(best, rel=1e-12, abs=1e-12), (seed, target, picks)


@pytest.mark.parametrize("seed", SEEDS)
def test_solve_budget_respects_allowed(seed: int) -> None:
    """Random ``allowed`` masks: the pick is allowed and optimal among allowed combinations."""
    rng = np.random.default_rng(1000 + seed)
    eighths, errors, weights = _instance(rng)
    costs = [k / 8 for k in eighths]
    allowed = []
    for k in eighths:
        m = rng.random(len(k)) < 0.6
        m[rng.integers(len(k))] = True  # at least one candidate per slot
        allowed.append(m)
    w = np.array(weights)
    lo = float(np.dot([k[m].min() for k, m in zip(eighths, allowed, strict=True)], w)) / 8 / w.sum()
    hi = float(np.dot([k[m].max() for k, m in zip(eighths, allowed, strict=True)], w)) / 8 / w.sum()
    for target in [lo, hi, *rng.uniform(lo, hi, 4).tolist()]:
        picks = solve_budget(costs, errors, weights, target, allowed)
        assert all(allowed[s][j] for s, j in enumerate(picks)), (allowed, picks)
        assert _mean_cost(costs, weights, picks) <= target + 1e-12
        best = _brute_force(eighths, errors, weights, int(np.floor(target * 8 * w.sum() + 1e-9)), allowed)
        assert sum(float(errors[s][j]) for s, j in enumerate(picks)) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_disallowed_dominant_candidate_is_never_chosen() -> None:
    """Candidate 0 is the cheapest and the best of every slot, but not allowed."""
    costs = [np.array([1.0, 2.0, 4.0, 8.0])] * 4
    errors = [np.array([0.0, 3.0, 2.0, 1.0])] * 4
    allowed = [np.array([False, True, True, True])] * 4
    for target in (2.0, 3.0, 5.0, 8.0, 16.0):
        picks = solve_budget(costs, errors, [1, 2, 1, 2], target, allowed)
        assert 0 not in picks
    # Without the mask it is chosen everywhere.
    assert solve_budget(costs, errors, [1, 2, 1, 2], 2.0) == [0, 0, 0, 0]


def test_pareto_pruning_keeps_the_optimum() -> None:
    """Restricting every slot to its Pareto set (as the precision search does) never loses the optimum."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        eighths, errors, weights = _instance(rng)
        costs = [k / 8 for k in eighths]
        allowed = [pareto_mask(c, e) for c, e in zip(costs, errors, strict=True)]
        for target in _targets(rng, eighths, weights):
            full = solve_budget(costs, errors, weights, target)
            pruned = solve_budget(costs, errors, weights, target, allowed)
            tot = [sum(float(errors[s][j]) for s, j in enumerate(p)) for p in (full, pruned)]
            assert tot[1] == pytest.approx(tot[0], rel=1e-12, abs=1e-12)


def test_budget_below_cheapest_raises_usage_error() -> None:
    costs = [np.array([2.0, 4.0]), np.array([3.0, 8.0])]
    errors = [np.array([1.0, 0.0]), np.array([1.0, 0.0])]
    with pytest.raises(UsageError, match="below the cheapest configuration"):
        solve_budget(costs, errors, [1, 1], 2.49)
    # Exactly the cheapest configuration is feasible.
    assert solve_budget(costs, errors, [1, 1], 2.5) == [0, 0]
    # The cheapest configuration is counted over allowed candidates only.
    allowed = [np.array([False, True]), np.array([True, True])]
    with pytest.raises(UsageError, match="below the cheapest configuration"):
        solve_budget(costs, errors, [1, 1], 3.0, allowed)
    assert solve_budget(costs, errors, [1, 1], 3.5, allowed) == [1, 0]
    # Weights count: the heavy slot's cost dominates the mean ((2 + 2 * 3) / 3 bits).
    with pytest.raises(UsageError, match="below the cheapest configuration"):
        solve_budget(costs, errors, [1, 2], 2.66)
    assert solve_budget(costs, errors, [1, 2], 8 / 3) == [0, 0]


@pytest.mark.parametrize("seed", SEEDS)
def test_optimal_error_non_increasing_in_target(seed: int) -> None:
    rng = np.random.default_rng(2000 + seed)
    eighths, errors, weights = _instance(rng)
    costs = [k / 8 for k in eighths]
    targets = sorted(_targets(rng, eighths, weights) + np.linspace(0.5, 16, 25).tolist())
    totals = []
    for target in targets:
        try:
            picks = solve_budget(costs, errors, weights, target)
        except UsageError:
            assert not totals, "a larger budget became infeasible"
            continue
        totals.append(sum(float(errors[s][j]) for s, j in enumerate(picks)))
    assert totals
    assert all(b <= a + 1e-12 for a, b in zip(totals, totals[1:], strict=False)), totals
    # At the largest budget every slot takes its least-error candidate.
    assert totals[-1] == pytest.approx(sum(float(e.min()) for e in errors))


@pytest.mark.parametrize("seed", SEEDS)
def test_off_grid_costs_meet_budget_and_are_near_optimal(seed: int) -> None:
    """Real-valued costs (as all-in bits are): the pick always meets the budget as measured, and it is at least as
    good as every combination that fits with one grid step per slot to spare (costs are rounded up on the grid)."""
    rng = np.random.default_rng(3000 + seed)
    slots = int(rng.integers(4, 6))
    costs = [rng.uniform(1.0, 16.0, int(rng.integers(3, 5))) for _ in range(slots)]
    errors = [rng.random(len(c)) for c in costs]
    weights = [float(w) for w in rng.choice([1, 2], slots)]
    w = np.array(weights)
    resolution = 256
    slack = slots * w.max() / (resolution * w.sum())  # upper bound of the mean rounding of a combination
    lo = float(np.dot([c.min() for c in costs], w) / w.sum())
    hi = float(np.dot([c.max() for c in costs], w) / w.sum())
    for target in rng.uniform(lo + slack, hi, 6):
        picks = solve_budget(costs, errors, weights, float(target), resolution=resolution)
        assert _mean_cost(costs, weights, picks) <= target + 1e-12
        got = sum(float(errors[s][j]) for s, j in enumerate(picks))
        best_with_slack = np.inf
        for combo in itertools.product(*[range(len(c)) for c in costs]):
            if _mean_cost(costs, weights, list(combo)) <= target - slack:
                best_with_slack = min(best_with_slack, sum(float(errors[s][j]) for s, j in enumerate(combo)))
        assert got <= best_with_slack + 1e-12
