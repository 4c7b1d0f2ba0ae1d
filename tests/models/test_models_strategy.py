"""Mask-strategy files: schema round trip, per-step windows, dense first steps, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dit_testing import build, make_batch, run

from stafinetune.models import AttentionConfig, MaskStrategy, StrategyError, build_window_plan

CANDIDATES = [[1, 1, 1], [3, 3, 3], [5, 4, 4], [3, 1, 3]]


def two_step_strategy(layers: int = 2, heads: int = 4) -> MaskStrategy:
    """Step 0: every head dense (5, 4, 4); step 1: (3, 3, 3), except head 2 of layer 1."""
    windows = torch.tensor([5, 4, 4]).repeat(2, layers, heads, 1)  # (steps, L, H, 3)
    windows[1] = torch.tensor([3, 3, 3])
    windows[1, layers - 1, 2] = torch.tensor([3, 1, 3])
    return MaskStrategy.from_tensor(
        windows, canvas=[5, 8, 8], tile=[1, 2, 2], candidates=CANDIDATES, metadata={"search": "test"}
    )


def test_round_trip(tmp_path: Path) -> None:
    strategy = two_step_strategy()
    path = tmp_path / "mask.json"
    strategy.save(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == "stafinetune.mask_strategy" and raw["version"] == 1
    loaded = MaskStrategy.load(path, num_layers=2, num_heads=4)
    assert loaded == strategy
    assert (loaded.num_steps, loaded.num_layers, loaded.num_heads) == (2, 2, 4)
    assert torch.equal(loaded.step_tensor(), strategy.step_tensor())
    # training window: per-axis max over steps unless train_windows is given
    assert loaded.train_tensor().tolist() == [[[5, 4, 4]] * 4] * 2
    loaded.train_windows = [[[3, 3, 3]] * 4] * 2
    loaded.save(path)
    assert MaskStrategy.load(path).train_tensor().tolist() == [[[3, 3, 3]] * 4] * 2


def test_strategy_drives_per_step_windows(tmp_path: Path) -> None:
    path = tmp_path / "mask.json"
    two_step_strategy().save(path)
    dit = build("wan_tiny", mode="sta", strategy_path=str(path))
    b = make_batch()
    with torch.no_grad():
        step0 = run(dit, b, step_index=0)
        step1 = run(dit, b, step_index=1)
        dense = run(build("wan_tiny", mode="full"), b)
        head_windows = [[[3, 3, 3]] * 4, [[3, 3, 3], [3, 3, 3], [3, 1, 3], [3, 3, 3]]]
        sparse = run(build("wan_tiny", mode="sta", head_windows=head_windows), b)
        torch.testing.assert_close(step0, dense, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(step1, sparse, atol=1e-6, rtol=1e-5)
        with pytest.raises(ValueError, match="step_index=2 but the mask strategy"):
            run(dit, b, step_index=2)


def test_one_step_strategy_applies_to_every_step(tmp_path: Path) -> None:
    """What a finetune exports (one step-independent window per layer and head) drives a
    sampler of any length."""
    path = tmp_path / "mask.json"
    one_step = two_step_strategy()
    one_step.windows = one_step.windows[1:]
    one_step.save(path)
    plan = build_window_plan(AttentionConfig(strategy_path=str(path), dense_first_steps=1), 2, 4)
    assert plan.windows_for_step(0) is None
    for step in (1, 7, 49):
        assert torch.equal(plan.windows_for_step(step), one_step.step_tensor()[0])


def test_dense_first_steps(tmp_path: Path) -> None:
    b = make_batch(batch=1)
    dit = build("wan_tiny", mode="sta", window=[3, 3, 3], dense_first_steps=2)
    with torch.no_grad():
        dense = run(build("wan_tiny", mode="full"), b)
        sparse = run(dit, b)  # training: no step, sparse
        torch.testing.assert_close(run(dit, b, step_index=0), dense, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(run(dit, b, step_index=1), dense, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(run(dit, b, step_index=2), sparse)
    assert (sparse - dense).abs().max() > 1e-3
    plan = build_window_plan(AttentionConfig(dense_first_steps=1, strategy_path=None), 2, 4)
    assert plan.windows_for_step(0) is None and plan.windows_for_step(5).shape == (2, 4, 3)


def write(tmp_path: Path, **changes) -> Path:
    raw = two_step_strategy().to_json()
    raw.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"windows": [[[[3, 3, 3]] * 4]] * 2}, r"windows\[0\] must hold 2 layers"),
        ({"windows": [[[[3, 3, 3]] * 3] * 2]}, r"windows\[0\]\[0\] must hold 4 heads"),
        ({"windows": [[[[3, 3, 3]] * 4, [[3, 3, 3], [3, 3], [3, 3, 3], [3, 3, 3]]]]}, r"windows\[0\]\[1\]\[1\] must be a list of 3 positive ints"),
        ({"windows": [[[[3, 3, 3]] * 4, [[3, 3, 3]] * 3 + [[0, 3, 3]]]]}, r"windows\[0\]\[1\]\[3\] must be a list of 3 positive ints"),
        ({"windows": [[[[3, 3, 3]] * 4, [[3, 3, 3]] * 3 + [[1, 3, 1]]]]}, r"\[1, 3, 1\] is not one of the candidates"),
        ({"windows": [[[[3, 3, 3]] * 4, [[3, 3, 3]] * 3 + [[3, 3.5, 3]]]]}, r"windows\[0\]\[1\]\[3\] must hold integers"),
        ({"candidates": [[3, 3, 3], [7, 4, 4]]}, r"candidates\[1\] = \[7, 4, 4\] is wider than the tile grid \[5, 4, 4\]"),
        ({"version": 2}, r"version must be 1"),
        ({"format": "other"}, r"format must be 'stafinetune.mask_strategy'"),
        ({"extra": 1}, r"unknown keys \['extra'\]"),
        ({"train_windows": [[[3, 3, 3]] * 4]}, r"train_windows must hold 2 layers"),
    ],
)
def test_bad_strategy_fails_clearly(tmp_path: Path, change: dict, message: str) -> None:
    path = write(tmp_path, **change)
    with pytest.raises(StrategyError, match=message) as err:
        MaskStrategy.load(path, num_layers=2, num_heads=4)
    assert str(path) in str(err.value)


def test_bad_strategy_fails_at_build(tmp_path: Path) -> None:
    """The model's layer/head counts are checked when the DiT is built, naming the file."""
    path = tmp_path / "hunyuan_has_2_layers.json"
    two_step_strategy(layers=3).save(path)
    with pytest.raises(StrategyError, match=r"must hold 2 layers \(the model's\), got 3"):
        build("hunyuan_tiny", mode="sta", strategy_path=str(path))
    two_step_strategy().save(path)
    with pytest.raises(ValueError, match=r"attention.tile \[1, 1, 1\] differs from the tile \[1, 2, 2\]"):
        build("hunyuan_tiny", mode="sta", tile=[1, 1, 1], strategy_path=str(path))
    with pytest.raises(StrategyError, match="not found"):
        build("wan_tiny", mode="sta", strategy_path=str(tmp_path / "missing.json"))
    path.write_text("{not json")
    with pytest.raises(StrategyError, match="not valid JSON"):
        build("wan_tiny", mode="sta", strategy_path=str(path))


def test_strict_window_checks_the_strategy_canvas(tmp_path: Path) -> None:
    path = tmp_path / "mask.json"
    two_step_strategy().save(path)
    dit = build("wan_tiny", strategy_path=str(path), strict_window=True)
    with torch.no_grad():
        run(dit, make_batch(batch=1), step_index=1)  # canvas (5, 8, 8) matches
        small = make_batch(batch=1)
        small["latents"] = small["latents"][:, :, :3]  # canvas (3, 8, 8)
        with pytest.raises(ValueError, match=r"searched for canvas \[5, 8, 8\] but this forward's canvas is \[3, 8, 8\]"):
            run(dit, small, step_index=1)
