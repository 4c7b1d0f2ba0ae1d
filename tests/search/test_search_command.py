"""stafinetune-search end to end: the strategy it writes drives the adapter and the trainer,
and bad inputs stop it with exit code 2 and the field's name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sta_kernels import density
from stafinetune.commands.search import run
from stafinetune.config import compose_job_config
from stafinetune.models import AttentionConfig, MaskStrategy, ModelConfig, build_model
from stafinetune.search.job import compose_search_config
from stafinetune.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
DATA = ("data.num_clips=16", "data.num_workers=0")  # the default data, fewer clips
# the default search, shortened: fewer calibration steps and samples
SHORT = ("search.steps=4", "search.num_samples=2", "logging.progress=false")
LAYERS = 4  # the shipped teacher's (the default model the search runs on)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "WANDB_SILENT": "true"}


def _cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stafinetune", "search", *overrides],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def searched(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of ``python -m stafinetune search hydra.run.dir=OUT search.budget=0.3``."""
    out = tmp_path_factory.mktemp("search") / "run"
    proc = _cli(
        f"hydra.run.dir={out}", "search.budget=0.3", f"data.root={data_root}", *DATA, *SHORT,
        "logging=wandb", "logging.mode=offline",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mask strategy     {out / 'mask_strategy.json'}" in proc.stdout
    return out


def test_command_writes_a_strategy_the_wan_adapter_loads(searched: Path) -> None:
    names = {p.name for p in searched.iterdir()}
    assert {
        "mask_strategy.json",
        "search_report.json",
        "search_errors.json",
        "search_report.md",
        "window_heatmap.png",
        "config.yaml",
        "metrics.jsonl",
        "wandb",
    } <= names
    path = searched / "mask_strategy.json"
    strategy = MaskStrategy.load(path, num_layers=LAYERS, num_heads=4)
    assert strategy.canvas == [5, 8, 8] and strategy.tile == [1, 2, 2]
    assert strategy.num_steps == 4
    assert strategy.metadata["search"]["mode"] == "budget"  # chosen by search.budget alone
    assert strategy.metadata["search"]["budget"] == 0.3
    assert strategy.metadata["model"] == "wan_tiny"
    assert len(strategy.metadata["calibration_indices"]) == 2
    steps = strategy.step_tensor()  # (steps, L, H, 3)
    train = strategy.train_tensor()  # (L, H, 3)
    for windows in (steps, train):
        mean = density([5, 8, 8], [1, 2, 2], windows.reshape(-1, 3)).double().mean()
        assert float(mean) <= 0.3 + 1e-6  # density() is float32: 0.3 reads 0.30000001

    report = json.loads((searched / "search_report.json").read_text())
    assert report["timing"]["cpu_s"] > 0 and report["calibration"]["samples"] == 2
    assert "Search time:" in (searched / "search_report.md").read_text()
    rows = [json.loads(line) for line in (searched / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all("search/density" in r for r in rows)
    # logging=wandb: the heatmap and the summary are in the offline run
    (run_dir,) = (searched / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("files/media/images/search/window_heatmap_*.png"))
    assert b"search/density_searched_steps" in next(run_dir.glob("run-*.wandb")).read_bytes()

    dit = build_model(
        ModelConfig(flavor="wan_tiny", config_overrides={"num_layers": LAYERS}),
        AttentionConfig(backend="reference", strategy_path=str(path), strict_window=True),
    )
    assert torch.equal(dit.plan.steps, steps) and torch.equal(dit.plan.train, train)
    latents = torch.randn(1, 16, 5, 16, 16)
    text, mask = torch.randn(1, 16, 32), torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        for i in range(strategy.num_steps):
            out = dit(latents, torch.full((1,), 500.0), text, mask, step_index=i)
            assert out.shape == latents.shape and torch.isfinite(out).all()


def test_training_starts_from_the_searched_windows(
    searched: Path, data_root: Path, tmp_path: Path
) -> None:
    path = searched / "mask_strategy.json"
    job = compose_job_config(
        [
            f"attention.strategy_path={path}", f"data.root={data_root}", *DATA,
            "logging=none", "logging.progress=false", "train.steps=2", "train.warmup_steps=0",
            "train.sample_steps=0", "train.export=false", "train.device=cpu",
        ]
    )  # fmt: skip
    trainer = Trainer(job, tmp_path)
    strategy = MaskStrategy.load(path, num_layers=LAYERS, num_heads=4)
    assert torch.equal(trainer.student.plan.train, strategy.train_tensor())
    assert torch.equal(trainer.student.plan.steps, strategy.step_tensor())
    assert trainer.teacher is not None and trainer.teacher.plan.train is None  # dense teacher
    result = trainer.fit()
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert torch.equal(trainer.student.plan.train, strategy.train_tensor())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.budget=1.5", "search.budget must lie in (0, 1], got 1.5"),
        ("search.candidates=[]", "search.candidates must be null (derive from the tile grid)"),
    ],
)
def test_bad_config_exits_2_naming_the_field(override: str, message: str, tmp_path: Path) -> None:
    proc = _cli(f"hydra.run.dir={tmp_path / 'run'}", override, "logging=none")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"config error: {message}") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.candidates=[[3,3,3],[6,1,1]]"], r"search.candidates\[1\] = \[6, 1, 1\] is wider"),
        (["search.budget=0.01"], r"search.budget=0.01 is below the density 0.0625"),
        (["search.num_samples=17"], r"search.num_samples=17 but the data holds only 16 samples"),
    ],
)
def test_inputs_checked_against_the_data_exit_2(
    overrides: list[str],
    message: str,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        job = compose_search_config(
            [f"data.root={data_root}", *DATA, "logging=none", "logging.progress=false", *overrides]
        )
        run(job, tmp_path)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: ") and "\n" not in err
    assert re.search(message, err), err


def test_logging_none_writes_nothing_to_wandb(data_root: Path, tmp_path: Path) -> None:
    job = compose_search_config(
        [
            f"data.root={data_root}", *DATA, "logging=none", "logging.progress=false",
            "search.steps=1", "search.num_samples=3", "search.batch_size=2",
            "search.threshold=0.1",
        ]
    )  # fmt: skip
    assert job.search.mode == "threshold"
    run(job, tmp_path)
    assert not (tmp_path / "wandb").exists()
    strategy = json.loads((tmp_path / "mask_strategy.json").read_text())
    indices = strategy["metadata"]["calibration_indices"]
    assert len(indices) == len(set(indices)) == 3  # batches of 2 + 1
    assert strategy["metadata"]["search"]["mode"] == "threshold"
