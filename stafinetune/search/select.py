"""Choose one candidate window per entry from a table of candidate errors.

An "entry" is one (step, layer, head), or one (layer, head) for the step-independent
training windows. Two rules:

- ``select_threshold``: the sparsest candidate whose error is within an additive ``threshold``
  of the entry's best candidate.
- ``select_budget``: the assignment with the least total error whose mean density does not
  exceed ``budget`` (a multiple-choice knapsack), by Lagrangian relaxation plus a greedy fill.
"""

from __future__ import annotations

import torch

# Bisection on the Lagrange multiplier stops after this many halvings (float64 has 52 bits).
BISECTION_STEPS = 64
# Absolute slack on the density sum when comparing with the budget (float64 rounding only).
DENSITY_EPS = 1e-12


def select_threshold(
    errors: torch.Tensor, densities: torch.Tensor, threshold: float
) -> torch.Tensor:
    """The sparsest acceptable candidate of every entry.

    Candidate ``c`` is acceptable for an entry iff ``errors[..., c] <= min_c' errors[..., c']
    + threshold`` (additive: the full window is normally a candidate with error ~0, so a
    relative rule ``(1 + threshold) * best`` would accept nothing else). Among acceptable
    candidates the lowest density wins; equal densities go to the lower error, then the lower
    candidate index.

    Args:
        errors: (..., C) finite errors per entry and candidate.
        densities: (C,) fraction of pairs each candidate attends.
        threshold: additive tolerance >= 0.
    Returns:
        (...,) int64 candidate indices.
    """
    best = errors.min(dim=-1, keepdim=True).values  # (..., 1)
    ok = errors <= best + threshold  # (..., C)
    dens = densities.to(errors.dtype).expand_as(errors)  # (..., C)
    inf = torch.tensor(float("inf"), dtype=errors.dtype)
    sparsest = torch.where(ok, dens, inf).min(dim=-1, keepdim=True).values  # (..., 1)
    tied = ok & (dens == sparsest)  # (..., C)
    return torch.where(tied, errors, inf).argmin(dim=-1)


def check_budget(budget: float, densities: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``search.budget`` unless some choice can meet it.

    Args:
        budget: the mean-density cap.
        densities: (C,) the candidates' densities.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"search.budget must lie in (0, 1], got {budget}")
    sparsest = float(densities.min())
    if sparsest > budget + DENSITY_EPS:
        raise ValueError(
            f"search.budget={budget} is below the density {sparsest:.4f} of the sparsest "
            "candidate; raise it or add sparser search.candidates"
        )


def _lagrangian_pick(errors: torch.Tensor, densities: torch.Tensor, lam: float) -> torch.Tensor:
    """(E,) argmin over candidates of ``error + lam * density``; exact ties go to the sparser."""
    order = torch.argsort(densities, stable=True)  # (C,) sparsest first
    score = errors[:, order] + lam * densities[order]  # (E, C)
    return order[score.argmin(dim=-1)]  # argmin returns the first (sparsest) of equal scores


def select_budget(errors: torch.Tensor, densities: torch.Tensor, budget: float) -> torch.Tensor:
    """The least-total-error choice whose mean density over the entries is at most ``budget``.

    This is a multiple-choice knapsack: each entry takes one candidate, the summed density is
    capped. It is solved by Lagrangian relaxation: for a multiplier ``lam >= 0`` the problem
    separates, and every entry independently takes ``argmin_c error + lam * density`` (one
    vectorised argmin over the whole table). The mean density of that choice falls as ``lam``
    grows, so bisection finds the smallest ``lam`` whose choice fits the budget. A choice made
    this way is optimal among all choices of its own (or lower) total density, so the result
    is exact whenever the budget falls on a vertex of the entries' (density, error) convex
    hulls; in between, the slack left below the budget is spent greedily, taking the upgrades
    with the best error decrease per added density that still fit. The budget is never
    exceeded: bisection keeps the feasible end, and the fill only takes upgrades that fit.

    Args:
        errors: (E, C) finite errors per entry and candidate.
        densities: (C,) fraction of pairs each candidate attends.
        budget: cap on the mean density over the E entries, in (0, 1].
    Returns:
        (E,) int64 candidate indices.
    Raises:
        ValueError (naming ``search.budget``) when even the sparsest candidate exceeds it.
    """
    check_budget(budget, densities)
    errors = errors.double()
    densities = densities.double()
    num_entries = errors.shape[0]
    cap = budget * num_entries + DENSITY_EPS  # on the density sum

    def total(choice: torch.Tensor) -> float:
        return float(densities[choice].sum())

    choice = _lagrangian_pick(errors, densities, 0.0)
    if total(choice) <= cap:
        return choice  # every entry already takes its least-error candidate
    lo, hi = 0.0, 1.0
    while total(_lagrangian_pick(errors, densities, hi)) > cap:
        lo, hi = hi, hi * 2.0
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if total(_lagrangian_pick(errors, densities, mid)) <= cap:
            hi = mid
        else:
            lo = mid
    choice = _lagrangian_pick(errors, densities, hi)
    return _greedy_fill(errors, densities, choice, cap - total(choice))


def _greedy_fill(
    errors: torch.Tensor, densities: torch.Tensor, choice: torch.Tensor, slack: float
) -> torch.Tensor:
    """Spend ``slack`` (density sum) on the upgrades with the best error drop per density."""
    choice = choice.clone()
    rows = torch.arange(errors.shape[0])
    while True:
        gain = errors[rows, choice][:, None] - errors  # (E, C) error removed by switching
        cost = densities[None, :] - densities[choice][:, None]  # (E, C) density added
        fits = (gain > 0) & (cost > 0) & (cost <= slack)
        if not fits.any():
            return choice
        ratio = torch.where(fits, gain / cost.clamp_min(DENSITY_EPS), -1.0)  # (E, C)
        flat = int(ratio.argmax())
        entry, cand = divmod(flat, errors.shape[1])
        slack -= float(cost[entry, cand])
        choice[entry] = cand
