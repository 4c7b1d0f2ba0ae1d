"""The window search of a two-expert model (Wan 2.2 A14B): one calibration trajectory through
both experts, each step scored on the expert that runs it, training windows per expert."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from search_testing import TILE, build_tiny, calibration

from stafinetune.models import AttentionConfig, MaskStrategy, ModelConfig, build_model
from stafinetune.models.experts import ExpertDiT
from stafinetune.search import SearchConfig, search_windows, select_budget, write_report

CANDIDATES = [[5, 4, 4], [3, 3, 3], [1, 1, 1], [3, 1, 3], [5, 2, 2]]
# timesteps 1000, 750, 500, 250
CFG = SearchConfig(steps=4, num_samples=1, mode="budget", budget=0.4, candidates=CANDIDATES)


def test_each_expert_gets_the_windows_of_its_own_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dit = build_model(ModelConfig(flavor="wan22_tiny_experts"),
                      AttentionConfig(backend="reference", tile=list(TILE)))  # fmt: skip
    assert isinstance(dit, ExpertDiT)  # boundary 500: steps 0-2 high, step 3 low
    batches = calibration("wan_tiny", sizes=(1,))
    result = search_windows(dit, batches, CFG, progress=False)
    # until the switch the trajectory and the scores are those of the high expert alone
    alone = build_tiny("wan_tiny", seed=0)
    alone.load_state_dict(dit.high.state_dict())
    reference = search_windows(alone, batches, CFG, progress=False)
    for metric, errors in result.errors.items():
        torch.testing.assert_close(errors[:3], reference.errors[metric][:3])
        assert not torch.allclose(errors[3], reference.errors[metric][3])
    # one per-step table for both strategies; each expert's training windows from its steps
    high, low = result.strategy, result.strategy_2
    assert low is not None and torch.equal(high.step_tensor(), low.step_tensor())
    err = result.errors[CFG.metric]
    for strategy, steps in ((high, [0, 1, 2]), (low, [3])):
        mean = err[steps].mean(0)  # (L, H, C)
        own = select_budget(mean.reshape(-1, mean.shape[-1]), result.densities, CFG.budget)
        assert torch.equal(strategy.train_tensor(), result.candidates[own.reshape(mean.shape[:-1])])
    paths = write_report(result, tmp_path)
    assert MaskStrategy.load(paths["strategy_2"]).train_tensor().equal(low.train_tensor())
    # the trainer and the sampler load them as the experts' windows
    loaded = build_model(
        ModelConfig(flavor="wan22_tiny_experts"),
        AttentionConfig(tile=list(TILE), strategy_path=str(paths["strategy"]),
                        strategy_path_2=str(paths["strategy_2"])),
    )  # fmt: skip
    assert torch.equal(loaded.high.plan.train, high.train_tensor())
    assert torch.equal(loaded.low.plan.train, low.train_tensor())


def test_an_expert_without_searched_steps_is_refused() -> None:
    torch.manual_seed(0)
    dit = build_model(ModelConfig(flavor="wan22_tiny_experts", boundary_ratio=0.1),
                      AttentionConfig(backend="reference", tile=list(TILE)))  # fmt: skip
    with pytest.raises(ValueError, match="falls in the noise range of transformer_2"):
        cfg = SearchConfig(steps=2, num_samples=1, candidates=CANDIDATES)
        search_windows(dit, calibration("wan_tiny", sizes=(1,)), cfg, progress=False)
