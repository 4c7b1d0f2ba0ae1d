"""The end of a run draws its figures: frame strips of the samples and the training curves."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from stafinetune.config import compose_job_config
from stafinetune.training.figures import frame_indices, plot_frame_strip, read_metrics
from stafinetune.training.trainer import Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models run fastest so on a shared CPU
    yield
    torch.set_num_threads(threads)


def test_a_short_distillation_run_writes_its_figures(tmp_path: Path):
    job = compose_job_config(
        [
            f"data.root={tmp_path / 'data'}", "data.num_clips=4", "data.num_workers=0",
            "logging=none", "logging.progress=false", "train.device=cpu", "train.steps=1",
            "train.batch_size=2", "train.warmup_steps=1", "train.val_every=1",
            "train.sample_steps=2", "train.log_every=1", "train.export=false",
        ]
    )  # fmt: skip
    result = Trainer(job, tmp_path / "run").fit()
    figures = tmp_path / "run" / "figures"
    strip, curves = figures / "frame_strip.png", figures / "curves.png"
    assert result.figures == [strip, curves]
    for path in (strip, curves):
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert [row["step"] for row in result.val_history] == [0, 1]
    series = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _ in series["val/sample_gap_mse"]] == [0, 1]
    assert {"val/student/motion_direction_error_deg", "val/teacher/motion_speed_error"} <= set(
        series
    )
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "tables.jsonl").read_text().splitlines()
    ]
    assert "motion_direction_error_deg" in rows[-1]["columns"]


def test_frame_strip_rows_and_frames(tmp_path: Path):
    videos = torch.zeros(2, 17, 32, 32, 3, dtype=torch.uint8)
    one = plot_frame_strip([("data", videos)], ["a", "b"], tmp_path / "one.png", frames=4)
    three = plot_frame_strip([("data", videos)] * 3, ["a", "b"], tmp_path / "three.png", frames=4)
    assert matplotlib.image.imread(three).shape[0] > matplotlib.image.imread(one).shape[0]
    assert frame_indices(17, 6) == [0, 3, 6, 10, 13, 16] and frame_indices(2, 6) == [0, 1]
    with pytest.raises(ValueError, match="2 samples but 1 captions"):
        plot_frame_strip([("data", videos)], ["a"], tmp_path / "x.png")
