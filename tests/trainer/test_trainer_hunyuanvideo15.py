"""Distillation on the tiny HunyuanVideo 1.5: the STA student moves towards its dense teacher
and exports a diffusers folder that loads back (exact resume: ``test_trainer_e2e``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from stafinetune.config import JobConfig
from stafinetune.models import AttentionConfig, ModelConfig, build_model
from stafinetune.training.trainer import Trainer

MODEL = ("model=hunyuanvideo15_tiny", "distill.allow_random_teacher=true")


def test_distillation_narrows_the_gap_and_exports(
    tiny_job: Callable[..., JobConfig], tmp_path: Path
) -> None:
    """The STA student moves towards the dense teacher (its own initial weights); the export
    loads back as a HunyuanVideo 1.5 transformer with the trained weights."""
    job = tiny_job(*MODEL, "train.steps=12", "train.lr=2e-4", "train.val_every=12",
                   "train.export=true", "train.batch_size=2")  # fmt: skip
    trainer = Trainer(job, tmp_path)
    assert trainer.teacher is not None and trainer.teacher.family == "hunyuanvideo15"
    result = trainer.fit()
    start, end = result.val_history[0], result.val_history[-1]
    assert start["val/student_teacher_mse"] > 0  # the window changes the output
    assert end["val/student_teacher_mse"] < 0.9 * start["val/student_teacher_mse"]
    exported = build_model(
        ModelConfig(flavor="hunyuanvideo15_tiny", path=str(result.export_dir / "transformer")),
        AttentionConfig(strategy_path=str(result.export_dir / "mask_strategy.json")),
    )
    saved = load_file(str(result.last_checkpoint / "model.safetensors"))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, saved[name]), name
