"""What the search logs to its tracker: per-step rows, then the heatmap at the last step (a
tracker like wandb drops anything logged at a step below one it has seen)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stafinetune.search.job import log_result


class RecordingTracker:
    """The tracker interface, recording (kind, step) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.calls.append(("log", step))

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        self.calls.append(("image", step))

    def summary(self, values: dict[str, Any]) -> None:
        self.calls.append(("summary", -1))


def test_the_heatmap_is_logged_at_the_last_step(tmp_path):
    steps = 20
    report = {
        "density_per_step": [0.5] * steps, "error_per_step": [None] + [0.1] * (steps - 1),
        "metric": "mse", "density": {"searched_steps": 0.5}, "mode": "fast",
        "predicted_attention_speedup": {"searched_steps": 2.0}, "total_error": 1.9,
        "timing": {"cpu_s": 1.0, "wall_s": 1.0},
    }  # fmt: skip
    tracker = RecordingTracker()
    log_result(tracker, SimpleNamespace(report=report), tmp_path / "heatmap.png")
    logged = [step for kind, step in tracker.calls if kind == "log"]
    assert logged == list(range(steps))
    assert ("image", steps - 1) in tracker.calls  # never below a step already logged
    images = [step for kind, step in tracker.calls if kind == "image"]
    assert min(images) >= max(logged)
