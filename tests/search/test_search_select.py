"""Selection rules: the threshold rule exactly as documented, the budget never exceeded and
better than any uniform window that fits it."""

from __future__ import annotations

import itertools

import pytest
import torch

from stafinetune.search import (
    CandidateErrors,
    SearchConfig,
    resolve_candidates,
    select_budget,
    select_threshold,
    select_windows,
)

DENS = torch.tensor([0.1, 0.1, 0.3, 1.0], dtype=torch.float64)


def test_threshold_rule_is_additive_and_prefers_sparse_then_low_error() -> None:
    errors = torch.tensor(
        [
            [0.30, 0.25, 0.05, 0.0],  # best 0; 0.25 > 0.2 -> the 0.3-dense candidate
            [0.20, 0.15, 0.05, 0.0],  # both 0.1-dense ones fit: the lower error (index 1)
            [0.50, 0.40, 0.30, 0.29],  # best 0.29: 0.50 misses the 0.49 bar, 0.40 is in
            [0.90, 0.90, 0.90, 0.0],  # nothing sparse fits: the full window
        ],
        dtype=torch.float64,
    )
    assert select_threshold(errors, DENS, 0.2).tolist() == [2, 1, 1, 3]
    assert select_threshold(errors, DENS, 0.0).tolist() == [3, 3, 3, 3]
    assert select_threshold(errors[None], DENS, 0.2).shape == (1, 4)  # any leading shape


def uniform_total(errors: torch.Tensor, c: int) -> float:
    return float(errors[:, c].sum())


def budget_tables() -> list[torch.Tensor]:
    """Error tables shaped like real ones (error falls with density, per-entry scale and
    shape differ, non-nested windows add noise) plus fully random ones."""
    _, dens = resolve_candidates(None, (5, 8, 8), (1, 2, 2))
    g = torch.Generator().manual_seed(0)
    tables = []
    for entries in (7, 64, 300):
        scale = torch.rand(entries, 1, generator=g, dtype=torch.float64) * 2  # (E, 1)
        power = 0.3 + 2 * torch.rand(entries, 1, generator=g, dtype=torch.float64)
        noise = 0.05 * torch.rand(entries, len(dens), generator=g, dtype=torch.float64)
        tables.append((scale * (1 - dens) ** power + noise * (dens < 1)).clamp_min(0))
        tables.append(torch.rand(entries, len(dens), generator=g, dtype=torch.float64))
    return tables


@pytest.mark.parametrize("budget", [0.0625, 0.1, 0.15, 0.2, 0.3, 0.3375, 0.45, 0.6, 1.0])
def test_budget_is_never_exceeded_and_beats_uniform_windows(
    budget: float, wan_errors: CandidateErrors
) -> None:
    dens = wan_errors.densities
    measured = wan_errors.errors["rel_l2"].reshape(-1, len(dens))  # (steps * L * H, C)
    for errors in [measured, *budget_tables()]:
        choice = select_budget(errors, dens, budget)
        assert float(dens[choice].mean()) <= budget + 1e-12
        total = float(errors.gather(1, choice[:, None]).sum())
        for c in range(len(dens)):
            if dens[c] <= budget:  # a uniform window within the budget never does better
                assert total <= uniform_total(errors, c) + 1e-9, (budget, c)


def test_budget_is_optimal_on_small_tables() -> None:
    """Against brute force over every assignment of 5 entries x 4 candidates."""
    g = torch.Generator().manual_seed(1)
    combos = torch.tensor(list(itertools.product(range(4), repeat=5)))  # (4**5, 5)
    combo_density = DENS[combos].mean(dim=1)  # (4**5,)
    for _ in range(20):
        errors = torch.rand(5, 4, generator=g, dtype=torch.float64)
        errors[:, 3] = 0.0  # the full window is exact
        combo_error = errors[torch.arange(5), combos].sum(dim=1)  # (4**5,)
        for budget in (0.1, 0.26, 0.5, 0.82):
            best = float(combo_error[combo_density <= budget + 1e-12].min())
            choice = select_budget(errors, DENS, budget)
            got = float(errors.gather(1, choice[:, None]).sum())
            assert float(DENS[choice].mean()) <= budget + 1e-12
            # Lagrangian + greedy fill: optimal up to the last item of the knapsack
            assert best - 1e-12 <= got <= best + float(errors.max()) + 1e-12


def test_budget_below_the_sparsest_candidate_fails() -> None:
    with pytest.raises(ValueError, match=r"search.budget=0.05 is below the density 0.1000"):
        select_budget(torch.rand(3, 4, dtype=torch.float64), DENS, 0.05)
    with pytest.raises(ValueError, match=r"search.budget must lie in \(0, 1\]"):
        select_budget(torch.rand(3, 4, dtype=torch.float64), DENS, 0.0)


def test_select_windows_budget_counts_only_searched_steps(wan_errors: CandidateErrors) -> None:
    cfg = SearchConfig(steps=3, dense_first_steps=1, mode="budget", budget=0.2)
    errors = {m: e.clone() for m, e in wan_errors.errors.items()}
    for e in errors.values():
        e[0] = float("nan")  # as evaluated with dense_first_steps=1
    measured = CandidateErrors(**{**wan_errors.__dict__, "errors": errors})
    result = select_windows(measured, cfg, metadata={"model": "wan_tiny"})
    dens = measured.densities
    assert (result.choice[0] == len(dens) - 1).all()  # forced dense: the full window
    assert float(dens[result.choice[1:]].mean()) <= 0.2 + 1e-12
    assert float(dens[result.train_choice].mean()) <= 0.2 + 1e-12
    report = result.report
    assert report["density"]["searched_steps"] == pytest.approx(
        float(dens[result.choice[1:]].mean()), rel=1e-5
    )
    assert report["density"]["all_steps"] == pytest.approx(
        float(dens[result.choice].mean()), rel=1e-5
    )
    assert report["predicted_attention_speedup"]["searched_steps"] == pytest.approx(
        1 / report["density"]["searched_steps"], rel=1e-4
    )
    assert result.strategy.metadata["model"] == "wan_tiny"
    assert result.strategy.metadata["search"]["budget"] == 0.2
    assert result.strategy.step_tensor().shape == (3, 2, 4, 3)
    with pytest.raises(ValueError, match="selects steps that were not scored"):
        select_windows(measured, SearchConfig(steps=3, mode="budget", budget=0.2))
