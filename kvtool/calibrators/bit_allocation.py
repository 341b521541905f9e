"""Bit allocation over many components under one budget: reverse water-filling on measured distortion.

Each component ``n`` (a principal component of one layer's keys or values) has options ``o`` (bit widths; 0 drops
it) with a measured distortion ``D[n, o]`` and a cost ``weight[n] * bits[o]`` (``weight``: how many tokens the
component is stored for). The problem ``min Σ D[n, o_n]  s.t.  Σ weight[n] bits[o_n] <= budget`` is a multiple-choice
knapsack; with thousands of components an exact DP is too large, and the classic answer (Shoham & Gersho 1988, the
operational form of reverse water-filling that transform codecs and KVTC, arXiv:2511.01815, use) is Lagrangian:
for a slope ``λ`` every component independently takes ``argmin D + λ · cost``, and bisection on ``λ`` finds the
cheapest slope that fits. That choice is optimal for its own total cost; the budget left over is then spent on
the upgrades with the best distortion drop per bit (greedy on each component's lower convex hull).
"""

from __future__ import annotations

import torch


def _choose(dist: torch.Tensor, cost: torch.Tensor, lam: float) -> torch.Tensor:
    # Ties go to the cheaper option (argmin returns the first; options are sorted by bits).
    return torch.argmin(dist + lam * cost, dim=1)


def allocate_bits(
    distortion: torch.Tensor,
    option_bits: torch.Tensor | None,
    weight: torch.Tensor,
    budget: float,
    cost: torch.Tensor | None = None,
) -> torch.Tensor:
    """Option index per component minimising total distortion within ``budget``.

    ``distortion`` ``(N, O)`` float64 (non-negative), ``option_bits`` ``(O,)`` ascending, starting at 0 (the
    option that always fits), ``weight`` ``(N,)`` positive: the cost of option ``o`` is ``weight · option_bits[o]``.
    Or, with ``option_bits=None``, ``cost`` ``(N, O)`` directly (e.g. measured entropies; column 0 must be 0 and
    costs should grow with the option index, so ties go to the cheaper one). Returns ``(N,)`` int64 indices.
    """
    dist = distortion.double()
    if cost is None:
        if option_bits is None:
            raise ValueError("give option_bits or cost")
        bits = option_bits.double()
        if bits[0] != 0 or not bool((bits[1:] > bits[:-1]).all()):
            raise ValueError("option_bits must start at 0 and increase")
        cost = weight.double()[:, None] * bits[None, :]
    cost = cost.double()
    if bool((cost[:, 0] != 0).any()):
        raise ValueError("option 0 must cost nothing")
    if float(cost.max(1).values.sum()) <= budget:
        return torch.argmin(dist, dim=1)
    # Bracket the slope: at hi everything is dropped; at lo = 0 everything is kept at the top option.
    hi = 1.0
    while float(cost.gather(1, _choose(dist, cost, hi)[:, None]).sum()) > budget:
        hi *= 4.0
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(cost.gather(1, _choose(dist, cost, mid)[:, None]).sum()) > budget:
            lo = mid
        else:
            hi = mid
    pick = _choose(dist, cost, hi)
    return _fill(dist, cost, pick, budget)


def _fill(dist: torch.Tensor, cost: torch.Tensor, pick: torch.Tensor, budget: float) -> torch.Tensor:
    """Spend what is left of ``budget`` on upgrades, best distortion drop per unit of cost first."""
    pick = pick.clone()
    spent = float(cost.gather(1, pick[:, None]).sum())
    while True:
        here_d = dist.gather(1, pick[:, None])
        here_c = cost.gather(1, pick[:, None])
        extra = cost - here_c
        gain = (here_d - dist) / extra.clamp_min(1e-30)
        gain = torch.where((extra > 0) & (extra <= budget - spent) & (dist < here_d), gain, torch.full_like(gain, -1))
        best_gain, best_opt = gain.max(dim=1)
        if float(best_gain.max()) <= 0:
            return pick
        order = torch.argsort(best_gain, descending=True, stable=True)
        moved = False
        for n in order.tolist():
            if float(best_gain[n]) <= 0:
                break
            o = int(best_opt[n])
            step = float(cost[n, o] - cost[n, pick[n]])
            if step <= budget - spent:
                spent += step
                pick[n] = o
                moved = True
        if not moved:
            return pick
