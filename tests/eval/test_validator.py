"""Validation during training: video metrics for the student each time, the teacher once;
tables in the trackers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from eval_testing import DENSE, STA, moving_clip, teacher_config
from torch import nn

from stafinetune.config import DistillConfig
from stafinetune.data import DataConfig, build_text_encoder, build_video_encoder
from stafinetune.inference.weights import Weights, load_model
from stafinetune.training.distill import DistillStep
from stafinetune.training.tracking import JsonlTracker, NullTracker, WandbTracker
from stafinetune.training.validation import VALIDATION_METRICS, Validator, score_samples

CPU = torch.device("cpu")


class _Recorder(NullTracker):
    def __init__(self) -> None:
        self.tables: list[tuple[str, list[str], list[list[Any]], int]] = []
        self.videos: list[str] = []

    def log_table(self, key, columns, rows, step):
        self.tables.append((key, columns, rows, step))

    def log_video(self, key, path, step, caption=""):
        self.videos.append(key)


class _CountSampling(nn.Module):
    """Counts the forwards of a denoising loop (those that pass a step index)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit, self.sampling_calls = dit, 0

    def forward(self, *args, step_index=None, **kwargs):
        self.sampling_calls += step_index is not None
        return self.dit(*args, step_index=step_index, **kwargs)


def _batch() -> dict[str, Any]:
    captions = ["a red circle moving right at 3 pixels per frame on a grey background",
                "a blue square moving up at 2 pixels per frame on a white background"]  # fmt: skip
    text, mask, pooled = build_text_encoder(DataConfig()).encode(captions)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 5, 16, 16, generator=gen)
    return {"latents": latents, "text": text, "text_mask": mask, "pooled_text": pooled,
            "caption": captions, "noise": torch.randn(latents.shape, generator=gen),
            "sigma": torch.tensor([0.3, 0.7])}  # fmt: skip


def test_validation_scores_the_student_each_time_and_the_teacher_once(tmp_path: Path):
    teacher = load_model(teacher_config(), DENSE, Weights("base"), steps=2, device=CPU,
                         dtype=torch.float32)  # fmt: skip
    student = load_model(teacher_config(), STA, Weights("base"), steps=2, device=CPU,
                         dtype=torch.float32)  # fmt: skip
    counted = _CountSampling(teacher)
    step = DistillStep(cfg=DistillConfig(w_data=0.0, w_out=1.0, w_attn=1.0), teacher=teacher,
                       device=CPU, bf16=False, teacher_bf16=False, teacher_module=counted)  # fmt: skip
    validator = Validator(
        step=step, batches=[_batch()], every=10, sample_steps=2, sample_shift=1.0,
        num_samples=2, seed=0, decode=build_video_encoder(DataConfig()).decode,
        out_dir=tmp_path / "samples", fps=8, is_main=True,
    )  # fmt: skip
    tracker = _Recorder()
    first = validator(student, 0, tracker)
    with torch.no_grad():  # the student learns something: its videos change, the teacher's not
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    second = validator(student, 10, tracker)
    assert counted.sampling_calls == 2  # 2 Euler steps, at the first validation only
    for metrics in (first, second):
        for name in VALIDATION_METRICS:
            assert math.isfinite(metrics[f"val/student/{name}"])
        assert metrics["val/sample_latency_s"] > 0 and metrics["val/metrics_s"] > 0
        assert 0 < metrics["val/student/ssim"] < 1 and metrics["val/student/psnr"] < 100
        for model in ("student", "teacher"):  # against the batch captions
            assert 0 <= metrics[f"val/{model}/motion_direction_error_deg"] <= 180
            assert metrics[f"val/{model}/motion_speed_error"] >= 0
        assert "val/teacher/psnr" not in metrics  # the teacher is the reference
    assert all(first[k] == second[k] for k in first if k.startswith("val/teacher/"))
    assert first["val/sample_gap_mse"] != second["val/sample_gap_mse"]
    assert first["val/student/psnr"] != second["val/student/psnr"]
    key, columns, rows, step_logged = tracker.tables[1]
    assert (key, step_logged) == ("val/sample_metrics", 10)
    assert columns == ["model", "sample", "caption", *VALIDATION_METRICS]
    assert [(r[0], r[1]) for r in rows] == [("student", 0), ("student", 1), ("teacher", 0),
                                            ("teacher", 1)]  # fmt: skip
    flicker, psnr = columns.index("temporal_flickering"), columns.index("psnr")
    assert (rows[0][flicker] + rows[1][flicker]) / 2 == second["val/student/temporal_flickering"]
    assert rows[2][psnr] is None and rows[3][psnr] is None  # no reference for the teacher
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_00000000_0.mp4", "step_00000000_1.mp4", "step_00000010_0.mp4", "step_00000010_1.mp4"
    ]  # fmt: skip


def test_wandb_tracker_logs_a_table(tmp_path: Path):
    tracker = WandbTracker(project="stafinetune-tests", entity=None, name=None, group=None,
                           tags=[], mode="offline", directory=tmp_path, config={})  # fmt: skip
    tracker.log_table("val/sample_metrics", ["model", "psnr"], [["student", 31.5]], step=0)
    tracker.finish()
    (table,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/val/sample_metrics*.json")
    assert json.loads(table.read_text()) == {
        "columns": ["model", "psnr"],
        "data": [["student", 31.5]],
    }


def test_jsonl_tracker_keeps_tables_apart_from_the_scalars(tmp_path: Path):
    tracker = JsonlTracker(tmp_path / "metrics.jsonl", NullTracker())
    tracker.log({"val/student/psnr": 31.5}, step=3)
    tracker.log_table("val/sample_metrics", ["model", "psnr", "note"],
                      [["student", 31.5, None], ["teacher", float("nan"), "ok"]], step=3)  # fmt: skip
    tracker.finish()
    scalars = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(scalars) == 1 and scalars[0]["val/student/psnr"] == 31.5
    (table,) = [json.loads(line) for line in (tmp_path / "tables.jsonl").read_text().splitlines()]
    assert table["key"] == "val/sample_metrics" and table["step"] == 3
    assert table["columns"] == ["model", "psnr", "note"]
    assert table["rows"] == [["student", 31.5, None], ["teacher", "nan", "ok"]]


def test_validation_motion_errors_follow_the_captions():
    # a red circle moving right at 4 px/frame: right against its caption, wrong against a
    # caption stating another direction, unscored against a caption stating no motion
    video = torch.from_numpy(moving_clip(4))
    videos = torch.stack([video, video, video])
    captions = ["a red circle moving right at 4 pixels per frame on a dark blue background",
                "a red circle moving up at 4 pixels per frame on a dark blue background",
                "a photo of a cat"]  # fmt: skip
    right, wrong, none = score_samples(videos, fps=8, captions=captions)
    assert right["motion_direction_error_deg"] < 2 and right["motion_speed_error"] < 0.2
    assert abs(wrong["motion_direction_error_deg"] - 90) < 2
    assert "motion_direction_error_deg" not in none and "temporal_flickering" in none
    assert "motion_speed_error" not in score_samples(videos[:1], fps=8)[0]  # no captions
