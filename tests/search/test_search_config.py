"""SearchConfig validation, OmegaConf structured use, candidate sets and their errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from search_testing import CANVAS, TILE, build_tiny, calibration

from sta_kernels import density
from stafinetune.search import SearchConfig, default_candidates, resolve_candidates, search_windows


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "budget"}, r"search.budget must be set when search.mode=budget"),
        ({"mode": "budget", "budget": 0.0}, r"search.budget must lie in \(0, 1\], got 0.0"),
        ({"mode": "budget", "budget": 1.5}, r"search.budget must lie in \(0, 1\], got 1.5"),
        ({"mode": "budget", "budget": -0.1}, r"search.budget must lie in \(0, 1\]"),
        ({"mode": "threshold", "budget": 0.3}, r"search.budget=0.3 is only used in budget mode"),
        ({"budget": 1.5}, r"search.budget must lie in \(0, 1\], got 1.5"),
        ({"candidates": []}, r"search.candidates must be null .* or a non-empty list"),
        ({"candidates": [[3, 3]]}, r"search.candidates\[0\] must be a window of 3 ints"),
        ({"candidates": [[3, 3, 3], [0, 1, 1]]}, r"search.candidates\[1\] must be a window"),
        ({"mode": "greedy"}, r"search.mode must be one of"),
        ({"metric": "mse"}, r"search.metric must be one of"),
        ({"threshold": -0.1}, r"search.threshold must be a finite number >= 0"),
        ({"steps": 0}, r"search.steps must be an int >= 1"),
        ({"shift": 0.5}, r"search.shift must be >= 1"),
        ({"steps": 4, "dense_first_steps": 4}, r"search.dense_first_steps=4 leaves no step"),
        ({"density_levels": [0.2, 1.0]}, r"search.density_levels\[1\] must lie in \(0, 1\)"),
        ({"candidate_batch": 0}, r"search.candidate_batch must be an int >= 1"),
        ({"num_samples": 0}, r"search.num_samples must be an int >= 1"),
        ({"batch_size": 0}, r"search.batch_size must be an int >= 1"),
    ],
)
def test_bad_config_names_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "mode"),
    [
        ({}, "threshold"),
        ({"budget": 0.3}, "budget"),
        ({"mode": "auto", "budget": 0.3}, "budget"),
        ({"mode": "threshold", "threshold": 0.1}, "threshold"),
        ({"mode": "budget", "budget": 0.5}, "budget"),
    ],
)
def test_auto_mode_follows_the_budget(fields: dict, mode: str) -> None:
    assert SearchConfig(**fields).mode == mode


def test_structured_config_round_trip() -> None:
    """Hydra-style: a schema, overrides from the command line, then the validated dataclass."""
    schema = OmegaConf.structured(SearchConfig)
    merged = OmegaConf.merge(
        schema,
        OmegaConf.from_dotlist(["mode=budget", "budget=0.15", "candidates=[[3,3,3],[1,4,4]]"]),
    )
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, SearchConfig)
    assert cfg.budget == 0.15 and cfg.candidates == [[3, 3, 3], [1, 4, 4]]
    with pytest.raises(ValueError, match="search.budget must lie in"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"mode": "budget", "budget": 2.0}))
    # a budget alone selects budget mode, and the resolved mode is what the config holds
    alone = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(["budget=0.3"])))
    assert alone.mode == "budget" and OmegaConf.structured(alone).mode == "budget"


def test_default_candidates_span_the_grid() -> None:
    windows = default_candidates(CANVAS, TILE)
    dens = density(CANVAS, TILE, torch.tensor(windows)).tolist()
    assert windows[-1] == [5, 4, 4] and dens[-1] == 1.0  # the full window, last
    assert len(windows) == len({tuple(w) for w in windows}) >= 8
    sparse = dens[:-1]
    assert sparse == sorted(sparse) and 0.05 <= min(sparse) and max(sparse) <= 0.5
    assert sum(0.1 <= d <= 0.4 for d in sparse) >= len(sparse) - 4  # mostly 10-40%
    # elongated along each axis: a window spanning a whole axis but not the others
    for axis, n in enumerate((5, 4, 4)):
        assert any(w[axis] == n and sum(w) < 13 for w in windows[:-1]), axis
    # another canvas: HunyuanVideo 720p latents (30, 48, 80) tokens, tile (6, 8, 8)
    big = default_candidates((30, 48, 80), (6, 8, 8))
    assert big[-1] == [5, 6, 10] and len(big) >= 10


def test_candidates_wider_than_the_grid_fail() -> None:
    with pytest.raises(ValueError, match=r"search.candidates\[1\] = \[3, 5, 3\] is wider than"):
        resolve_candidates([[3, 3, 3], [3, 5, 3]], CANVAS, TILE)
    windows, dens = resolve_candidates([[3, 3, 3], [3, 3, 3], [1, 2, 2]], CANVAS, TILE)
    assert windows.tolist() == [[3, 3, 3], [1, 2, 2], [5, 4, 4]]  # deduplicated, full appended
    assert dens.tolist() == pytest.approx([0.3375, 0.05, 1.0])
    # at search start, against the canvas of the calibration latents
    dit = build_tiny("wan_tiny")
    cfg = SearchConfig(steps=1, candidates=[[6, 1, 1]])
    with pytest.raises(ValueError, match=r"search.candidates\[0\] = \[6, 1, 1\] is wider"):
        search_windows(dit, calibration("wan_tiny"), cfg, progress=False)


def test_bad_calibration_fails_clearly() -> None:
    dit = build_tiny("wan_tiny")
    with pytest.raises(ValueError, match="calibration must hold at least one batch"):
        search_windows(dit, [], SearchConfig(steps=1), progress=False)
    batch = calibration("wan_tiny")[0]
    with pytest.raises(ValueError, match=r"calibration\[0\] has no 'text'"):
        search_windows(dit, [{"latents": batch["latents"]}], SearchConfig(steps=1), progress=False)
    other = calibration("wan_tiny", latent_shape=(5, 16, 12))
    with pytest.raises(ValueError, match="must share one latent shape"):
        search_windows(dit, [batch, *other], SearchConfig(steps=1), progress=False)
    cfg = SearchConfig(steps=1, mode="budget", budget=0.01)
    with pytest.raises(ValueError, match=r"search.budget=0.01 is below the density"):
        search_windows(dit, [batch], cfg, progress=False)
