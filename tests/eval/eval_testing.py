"""Helpers of the sampling and evaluation tests: clips with known motion, commands, models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from stafinetune.config import asset_path
from stafinetune.data.synthetic import ShapeMotion, render_clip, write_mp4
from stafinetune.models import AttentionConfig, ModelConfig

FRAMES, SIZE, FPS = 17, 64, 8
VBENCH = (
    "temporal_flickering",
    "dynamic_degree",
    "motion_smoothness",
    "subject_consistency",
    "background_consistency",
)


def moving_clip(speed: float) -> np.ndarray:
    """A red circle crossing a dark blue frame at ``speed`` px/frame: uint8 (F, H, W, 3)."""
    half = (FRAMES - 1) / 2
    motion = ShapeMotion(
        "circle", "red", "right", int(speed), SIZE * 0.12, SIZE / 2 - speed * half, SIZE / 2,
        float(speed), 0.0,
    )  # fmt: skip
    return render_clip("dark blue", [motion], FRAMES, SIZE, SIZE)


def write_clips(folder: Path) -> dict[str, np.ndarray]:
    """``fast.mp4`` (4 px/frame) and ``still.mp4`` (its first frame held) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    fast = moving_clip(4)
    clips = {"fast.mp4": fast, "still.mp4": np.repeat(fast[:1], FRAMES, axis=0)}
    for name, video in clips.items():
        write_mp4(folder / name, video, fps=FPS)
    return clips


def run_command(module: str, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m <module> <overrides>`` with this process's environment, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *overrides, "logging.progress=false"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def teacher_config() -> ModelConfig:
    """The shipped tiny teacher (wan_tiny weights trained on the synthetic clips)."""
    return ModelConfig(flavor="wan_tiny", path=asset_path("wan_tiny_teacher"))


STA = AttentionConfig(mode="sta", backend="reference", tile=[1, 2, 2], window=[3, 3, 3])
DENSE = AttentionConfig(mode="full")
LATENT_SHAPE = (16, 5, 16, 16)  # (C, T, H, W) of the default data's 17 x 128 x 128 clips
