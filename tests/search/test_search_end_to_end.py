"""search_windows -> write_report -> the strategy drives both adapters, step by step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from search_testing import TILE, build_tiny, calibration

from stafinetune.models import AttentionConfig, MaskStrategy, ModelConfig, build_model
from stafinetune.search import SearchConfig, search_windows, write_report


def forward(dit, batch, **kwargs) -> torch.Tensor:
    timestep = torch.full((batch["latents"].shape[0],), 400.0)
    return dit(
        batch["latents"],
        timestep,
        batch["text"],
        batch["text_mask"],
        batch["pooled_text"],
        **kwargs,
    )


@pytest.mark.parametrize(
    ("flavor", "cfg"),
    [
        ("wan_tiny", SearchConfig(steps=3, dense_first_steps=1, mode="budget", budget=0.3)),
        ("hunyuan_tiny", SearchConfig(steps=2, threshold=0.2, metric="rel_l1")),
        ("hunyuanvideo15_tiny", SearchConfig(steps=2, dense_first_steps=1, mode="budget", budget=0.5)),
    ],
)
def test_search_output_loads_into_the_adapter(
    flavor: str, cfg: SearchConfig, tmp_path: Path
) -> None:
    dit = build_tiny(flavor, mode="full")
    batches = calibration(flavor, sizes=(2,))
    result = search_windows(dit, batches, cfg, progress=False, metadata={"model": flavor})
    paths = write_report(result, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "mask_strategy.json",
        "search_report.json",
        "search_errors.json",
        "search_report.md",
        "window_heatmap.png",
    }
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(paths["report"].read_text())
    assert report["mode"] == cfg.mode and report["calibration"]["samples"] == 2
    assert len(report["density_per_step"]) == cfg.steps and len(report["error_per_head"]) == 2
    if flavor != "wan_tiny":  # joint text
        assert report["calibration"]["mean_text_len"] > 0
        assert report["predicted_attention_speedup_with_text"] is not None
    errors = json.loads(paths["errors"].read_text())
    num_cand = len(result.candidates)
    assert torch.tensor(errors["rel_l2"][-1]).shape == (2, 4, num_cand)
    markdown = paths["markdown"].read_text()
    assert "# STA window search" in markdown and "## Error per head" in markdown

    strategy = MaskStrategy.load(paths["strategy"], num_layers=2, num_heads=4)
    assert strategy.canvas == [5, 8, 8] and strategy.tile == list(TILE)
    assert strategy.metadata["model"] == flavor
    assert strategy.metadata["search"]["calibration_samples"] == 2
    steps = strategy.step_tensor()  # (steps, L, H, 3)
    assert torch.equal(steps, result.candidates[result.choice])
    dens = result.densities[result.choice]  # (steps, L, H)
    if cfg.mode == "budget":
        assert (steps[0] == torch.tensor([5, 4, 4])).all()  # dense_first_steps=1
        assert float(dens[1:].mean()) <= cfg.budget + 1e-12
    assert report["density"]["all_steps"] == pytest.approx(float(dens.mean()), rel=1e-5)

    sta = build_model(
        ModelConfig(flavor=flavor),
        AttentionConfig(
            tile=list(TILE),
            backend="reference",
            strategy_path=str(paths["strategy"]),
            strict_window=True,
        ),
    )
    sta.load_state_dict(dit.state_dict())
    batch = batches[0]
    with torch.no_grad():
        dense_out = forward(dit, batch)
        outs = [forward(sta, batch, step_index=i) for i in range(cfg.steps)]
        train_out = forward(sta, batch)  # step_index=None: the train windows
    for i, out in enumerate(outs):
        assert out.shape == batch["latents"].shape and torch.isfinite(out).all()
        if bool((dens[i] == 1).all()):
            torch.testing.assert_close(out, dense_out, atol=2e-5, rtol=1e-4)
    assert torch.isfinite(train_out).all()
    assert torch.equal(sta.plan.train, result.candidates[result.train_choice])


def test_strategy_for_another_canvas_fails_in_strict_mode(tmp_path: Path) -> None:
    dit = build_tiny("wan_tiny", mode="full")
    result = search_windows(dit, calibration("wan_tiny"), SearchConfig(steps=1), progress=False)
    path = tmp_path / "mask_strategy.json"
    result.strategy.save(path)
    other = calibration("wan_tiny", latent_shape=(5, 16, 12))[0]  # canvas (5, 8, 6)
    strict = build_tiny("wan_tiny", strategy_path=str(path), strict_window=True)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"searched for canvas \[5, 8, 8\] .* is \[5, 8, 6\]"):
            forward(strict, other, step_index=0)
        lenient = build_tiny("wan_tiny", strategy_path=str(path))
        assert torch.isfinite(forward(lenient, other, step_index=0)).all()
    with pytest.raises(ValueError, match="differs from the tile"):
        build_tiny("wan_tiny", strategy_path=str(path), tile=[1, 1, 1])
