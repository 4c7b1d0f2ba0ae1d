"""A mask strategy is checked against the canvas a command trains or samples: one searched
for another canvas is refused by name, and absurd canvases are refused when the file loads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_testing import error_lines, run_command

from stafinetune.commands import sample
from stafinetune.config import JobConfig
from stafinetune.errors import UserError
from stafinetune.models import MaskStrategy
from stafinetune.models.strategy import StrategyError
from stafinetune.training.trainer import Trainer

TILE = [1, 2, 2]


def _strategy(path: Path, canvas: list, **metadata) -> Path:
    """A one-step strategy for the shipped tiny teacher (4 layers of 4 heads), window 2x2x2."""
    windows = torch.tensor([2, 2, 2]).expand(1, 4, 4, 3)
    MaskStrategy.from_tensor(windows, canvas=canvas, tile=TILE, candidates=[[2, 2, 2]],
                             metadata=metadata).save(path)  # fmt: skip
    return path


def test_absurd_canvases_are_refused_when_the_file_loads(tmp_path):
    path = _strategy(tmp_path / "s.json", [5, 8, 8])
    raw = json.loads(path.read_text())
    raw["canvas"] = [1e12, 1e12, 1e12]
    path.write_text(json.dumps(raw))
    with pytest.raises(StrategyError, match=r"canvas \[10+, 10+, 10+\] is beyond any video"):
        MaskStrategy.load(path)
    raw["canvas"], raw["metadata"] = [5, 8, 8], {"canvases": [[5, 8, 2**40]]}
    path.write_text(json.dumps(raw))
    with pytest.raises(StrategyError, match=r"metadata.canvases\[0\]"):
        MaskStrategy.load(path)


def test_training_refuses_a_strategy_for_another_canvas(
    tmp_path, tiny_job: Callable[..., JobConfig]
):
    other = _strategy(tmp_path / "other.json", [5, 8, 6])
    job = tiny_job("train.steps=1", "attention.tile=[1,2,2]", f"attention.strategy_path={other}")
    with pytest.raises(UserError) as err:
        Trainer(job, tmp_path / "run")
    message = str(err.value)
    assert str(other) in message and "[5, 8, 6]" in message and "[5, 8, 8]" in message
    same = _strategy(tmp_path / "same.json", [5, 8, 8])
    job = tiny_job("train.steps=1", "attention.tile=[1,2,2]", f"attention.strategy_path={same}")
    assert Trainer(job, tmp_path / "run2").student.plan.canvases == ((5, 8, 8),)


def test_sampling_refuses_a_strategy_for_another_canvas(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STAFINETUNE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moves right\n")
    args = [f"sample.prompts={prompts}", "sample.steps=1", "sample.device=cpu",
            "sample.warmup=false", "logging.progress=false", "attention.tile=[1,2,2]",
            f"data.root={tmp_path / 'data'}"]  # fmt: skip
    other = _strategy(tmp_path / "other.json", [5, 8, 6])
    code, _, err = run_command(sample.main, f"hydra.run.dir={tmp_path / 'a'}", *args,
                               f"attention.strategy_path={other}", capsys=capsys)  # fmt: skip
    assert code == 2, err
    assert error_lines(err) == [
        f"error: attention.strategy_path={other} holds windows for canvas [5, 8, 6] but "
        "sampling uses canvas [5, 8, 8]; search windows for this canvas (stafinetune-search "
        "with the same model and data) or leave attention.strategy_path unset"
    ]
    # an export lists every canvas its student was trained on: each of them samples
    trained = _strategy(tmp_path / "trained.json", [5, 8, 6], canvases=[[5, 8, 6], [5, 8, 8]])
    code, _, err = run_command(sample.main, f"hydra.run.dir={tmp_path / 'b'}", *args,
                               f"attention.strategy_path={trained}", capsys=capsys)  # fmt: skip
    assert code == 0, err
