"""Evaluation functions that training and the evaluation commands share.

- :func:`validation_gap`: flow-matching loss and student-teacher gaps on fixed batches,
  noise and noise levels (the ``val/*`` metrics).
- :func:`generate_pair`: sample latents with the student and the teacher from the same noise
  and conditioning, and the gap between them (``val/sample_gap_mse``).
- :func:`write_side_by_side`: decode latents and write student | teacher mp4s.
- :class:`Validator`: the training loop's cadence around both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.synthetic import write_mp4
from .distill import DistillStep, to_device
from .models import VideoDiT
from .sampling import sample_latents, to_uint8_video

SAMPLE_NOISE_SEED = 11  # offset from train.seed of the validation videos' noise

_VAL_NAMES = {"data": "val/flow_loss", "out": "val/student_teacher_mse", "attn": "val/attn_mse"}


@torch.no_grad()
def validation_gap(
    step: DistillStep, student: VideoDiT, batches: list[dict[str, Any]]
) -> dict[str, float]:
    """Mean of each loss term over fixed batches (each carrying its ``noise`` and ``sigma``).

    Returns ``val/flow_loss`` and, with a teacher, ``val/student_teacher_mse`` and
    ``val/attn_mse`` (when the attention term is on).
    """
    was_training = student.training
    student.eval()
    sums: dict[str, float] = {}
    for batch in batches:
        batch = to_device(batch, step.device)
        terms = step.losses(student, student, batch, batch["noise"], batch["sigma"])
        for key in _VAL_NAMES:
            if key in terms:
                sums[key] = sums.get(key, 0.0) + float(terms[key])
    student.train(was_training)
    return {_VAL_NAMES[k]: v / len(batches) for k, v in sums.items()}


@torch.no_grad()
def generate_pair(
    step: DistillStep,
    student: VideoDiT,
    batch: dict[str, Any],
    *,
    num: int,
    steps: int,
    shift: float,
    seed: int,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Generate ``num`` latents from fixed noise with the student (and the teacher).

    Returns:
        ([student latents, teacher latents (when distilling)], each (num, C, T, H, W) on the
        CPU), and ``{"val/sample_gap_mse": ...}`` when there is a teacher.
    """
    n = min(num, batch["latents"].shape[0])
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch["latents"][:n].shape, generator=gen)  # (n, C, T, H, W)
    cond = [batch["text"][:n], batch["text_mask"][:n], batch["pooled_text"][:n]]
    models = [(student, step.device, step.bf16)]
    if step.teacher is not None:
        device = next(step.teacher.parameters()).device
        models.append((step.teacher_module, device, step.teacher_bf16))
    latents = []
    for model, device, bf16 in models:
        was_training = model.training
        model.eval()
        out = sample_latents(
            model,
            noise.to(device),
            *(c.to(device) for c in cond),
            steps=steps,
            shift=shift,
            autocast_bf16=bf16 and device.type == "cuda",
        )
        model.train(was_training)
        latents.append(out.float().cpu())
    metrics = {}
    if len(latents) == 2:
        metrics["val/sample_gap_mse"] = float(torch.mean((latents[0] - latents[1]) ** 2))
    return latents, metrics


def write_side_by_side(
    latents: list[torch.Tensor], decode: Any, out_dir: Path, stem: str, fps: int
) -> list[Path]:
    """Decode each model's latents and write one mp4 per sample, models side by side (left to
    right in ``latents`` order). ``decode`` maps (n, C, T, H, W) latents to (n, 3, F, H, W)."""
    videos = [decode(lat) for lat in latents]  # each (n, 3, F, H, W) in [-1, 1]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(videos[0].shape[0]):
        frames = to_uint8_video(torch.cat([v[k] for v in videos], dim=-1))  # (F, H, W*m, 3)
        path = out_dir / f"{stem}_{k}.mp4"
        write_mp4(path, frames.numpy(), fps=fps)
        paths.append(path)
    return paths


@dataclass
class Validator:
    """Validation of the training loop: the gap on fixed batches every ``every`` steps (and at
    steps 0 and the end), plus sample videos when ``sample_steps > 0``.

    Attributes:
        step: the run's loss computation (teacher, weights, devices).
        batches: fixed validation batches.
        every: cadence in optimiser steps; 0 validates only at the start and the end.
        sample_steps, sample_shift, num_samples, seed: the sample videos' sampler and noise.
        decode: latents -> pixels (the data's video encoder), when sampling videos.
        out_dir, fps: where and at which rate the videos are written.
        is_main: only rank 0 writes and logs the videos (every rank generates them: under
            sequence parallelism or sharding the model runs on all ranks together).
    """

    step: DistillStep
    batches: list[dict[str, Any]]
    every: int
    sample_steps: int
    sample_shift: float
    num_samples: int
    seed: int
    decode: Any
    out_dir: Path
    fps: int
    is_main: bool

    def should_validate(self, step: int, last: int) -> bool:
        """Validate at step 0, every ``every`` steps, and at the final step ``last``."""
        return step == 0 or step == last or (self.every > 0 and step % self.every == 0)

    def __call__(self, student: VideoDiT, step: int, tracker: Any) -> dict[str, float]:
        """Every validation metric at ``step``; videos are logged to ``tracker`` (rank 0)."""
        metrics = validation_gap(self.step, student, self.batches)
        if self.sample_steps > 0:
            batch = self.batches[0]
            latents, gap = generate_pair(
                self.step,
                student,
                batch,
                num=self.num_samples,
                steps=self.sample_steps,
                shift=self.sample_shift,
                seed=self.seed + SAMPLE_NOISE_SEED,
            )
            metrics.update(gap)
            if self.is_main:
                paths = write_side_by_side(
                    latents, self.decode, self.out_dir, f"step_{step:08d}", self.fps
                )
                for k, path in enumerate(paths):
                    tracker.log_video(f"samples/{k}", path, step, caption=batch["caption"][k])
        return metrics
