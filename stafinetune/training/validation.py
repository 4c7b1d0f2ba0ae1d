"""Evaluation functions that training and the evaluation commands share.

- :func:`validation_gap`: flow-matching loss and student-teacher gaps on fixed batches,
  noise and noise levels (the ``val/*`` metrics).
- :func:`generate_pair`: sample latents with the student and the teacher from the same noise
  and conditioning, the gap between them (``val/sample_gap_mse``) and the student's sampling
  time (``val/sample_latency_s``).
- :func:`decode_videos` and :func:`write_side_by_side`: latents to uint8 videos, and
  student | teacher mp4s.
- :func:`score_samples`: the offline metrics of those videos (:mod:`stafinetune.metrics`),
  motion errors against the captions included.
- :class:`Validator`: the training loop's cadence around all of them; it also keeps the
  first and the latest student latents for the end-of-run frame strip
  (:meth:`Validator.frame_strip`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stafinetune.data.synthetic import write_mp4
from stafinetune.diffusion.sampling import (
    ClassifierFreeGuidance,
    Schedule,
    sample_latents,
    to_uint8_video,
)
from stafinetune.metrics import score_video
from stafinetune.metrics.fidelity import PSNR_CAP_DB, psnr, ssim
from stafinetune.metrics.motion import IntendedMotion, parse_caption
from stafinetune.models import VideoDiT

from .distill import DistillStep, to_device
from .figures import plot_frame_strip

log = logging.getLogger(__name__)

SAMPLE_NOISE_SEED = 11  # offset from train.seed of the validation videos' noise

# What validation scores on its videos: VBench-style temporal quality (pixel-proxy
# consistency), for the student PSNR / SSIM against the teacher's video of the same noise,
# and, where the caption states a shape's motion (the synthetic clips' do), the measured
# motion's errors against it. MS-SSIM and VMAF cost several times more on CPU:
# ``stafinetune-eval`` computes them.
VALIDATION_METRICS = (
    "temporal_flickering",
    "dynamic_degree",
    "motion_smoothness",
    "subject_consistency",
    "background_consistency",
    "psnr",
    "ssim",
    "motion_direction_error_deg",
    "motion_speed_error",
)

_VAL_NAMES = {"data": "val/flow_loss", "out": "val/student_teacher_mse", "attn": "val/attn_mse"}


@torch.no_grad()
def validation_gap(
    step: DistillStep,
    student: VideoDiT,
    batches: list[dict[str, Any]],
    on_batch: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Mean of each loss term over fixed batches (each carrying its ``noise`` and ``sigma``).

    Returns ``val/flow_loss`` and, with a teacher, ``val/student_teacher_mse`` and
    ``val/attn_mse`` (when the attention term is on). ``on_batch`` is called after each
    batch (a progress bar's update).
    """
    was_training = student.training
    student.eval()
    sums: dict[str, float] = {}
    for batch in batches:
        batch = to_device(batch, step.device)
        for part, weight in _expert_parts(step, batch):
            terms = step.losses(student, student, part, part["noise"], part["sigma"])
            for key in _VAL_NAMES:
                if key in terms:
                    sums[key] = sums.get(key, 0.0) + weight * float(terms[key])
        if on_batch is not None:
            on_batch()
    student.train(was_training)
    return {_VAL_NAMES[k]: v / len(batches) for k, v in sums.items()}


def _expert_parts(step: Any, batch: dict[str, Any]) -> list[tuple[dict[str, Any], float]]:
    """A validation batch as the run's experts see it, with each part's share of the batch.

    One expert of a two-expert model (``step.sigma_range``) gets the batch's levels mapped
    into its range; both experts (``step.boundary``) get the rows on their side of the boundary
    as two parts (one expert runs each). Otherwise the batch itself.
    """
    lo, hi = getattr(step, "sigma_range", (0.0, 1.0))
    boundary = getattr(step, "boundary", None)
    if (lo, hi) != (0.0, 1.0):
        return [({**batch, "sigma": lo + (hi - lo) * batch["sigma"]}, 1.0)]
    if boundary is None:
        return [(batch, 1.0)]
    size, parts = batch["sigma"].shape[0], []
    high = batch["sigma"] >= boundary  # (B,)
    for rows in (high, ~high):
        if bool(rows.any()):
            part = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == (size,) else v
                    for k, v in batch.items()}  # fmt: skip
            parts.append((part, float(rows.sum()) / size))
    return parts


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
    teacher_latents: torch.Tensor | None = None,
    student_schedule: Schedule | None = None,
    guidance: tuple[Any, float] | None = None,
    on_step: Callable[[], None] | None = None,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Generate ``num`` latents from fixed noise with the student (and the teacher).

    Args:
        steps, shift: the teacher's Euler schedule, and the student's unless
        student_schedule: the student's own (a few-step student's; its fresh noise is seeded
            from ``seed`` too, so every validation sees the same).
        guidance: ``(negative prompt encoding, scale)`` of the teacher's classifier-free
            guidance (the student samples without: a few-step student has it baked in).
        teacher_latents: the teacher's latents (num, C, T, H, W) from an earlier call with the
            same batch, noise and schedule (the frozen teacher gives the same ones again):
            used instead of sampling the teacher.
        on_step: called after every sampling step of every model (a progress bar's update).
    Returns:
        ([student latents, teacher latents (when distilling)], each (num, C, T, H, W) on the
        CPU), and ``val/sample_latency_s`` (seconds to sample the student's ``num`` videos, in
        one batch, CUDA-synchronised) plus ``val/sample_gap_mse`` when there is a teacher.
    """
    n = min(num, batch["latents"].shape[0])
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch["latents"][:n].shape, generator=gen)  # (n, C, T, H, W)
    cond = [batch["text"][:n], batch["text_mask"][:n], batch["pooled_text"][:n]]
    image = {key: batch[key][:n] for key in ("image_latents", "image_embeds") if key in batch}
    glyph = {key: batch[key][:n] for key in ("text_2", "text_2_mask") if key in batch}
    teacher_schedule = Schedule.flow(steps, shift)
    models = [(student, step.device, step.bf16, student_schedule or teacher_schedule)]
    if step.teacher is not None:
        device = next(step.teacher.parameters()).device
        teacher: nn.Module = step.teacher_module
        if guidance is not None and guidance[1] != 1.0:
            teacher = ClassifierFreeGuidance(teacher, guidance[0], guidance[1])
        models.append((teacher, device, step.teacher_bf16, teacher_schedule))
    if teacher_latents is not None:
        models = models[:1]
    latents, seconds = [], []
    for model, device, bf16, schedule in models:
        was_training = model.training
        model.eval()
        _sync(device)
        start = time.perf_counter()
        out = sample_latents(
            model,
            noise.to(device),
            *(c.to(device) for c in cond),
            schedule=schedule,
            generator=torch.Generator().manual_seed(seed + 1),
            autocast_bf16=bf16 and device.type == "cuda",
            on_step=on_step,
            condition={key: value.to(device) for key, value in glyph.items()} or None,
            **{key: value.to(device) for key, value in image.items()},  # the batch's first frames
        )
        _sync(device)
        seconds.append(time.perf_counter() - start)
        model.train(was_training)
        latents.append(out.float().cpu())
    if teacher_latents is not None:
        latents.append(teacher_latents)
    metrics = {"val/sample_latency_s": seconds[0]}
    if len(latents) == 2:
        metrics["val/sample_gap_mse"] = float(torch.mean((latents[0] - latents[1]) ** 2))
    return latents, metrics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_videos(latents: torch.Tensor, decode: Any) -> torch.Tensor:
    """(n, C, T, H, W) latents -> (n, F, H, W, 3) uint8 videos; ``decode`` maps latents to
    (n, 3, F, H, W) pixels in [-1, 1] (the data's video encoder)."""
    pixels = decode(latents).float().cpu()  # (n, 3, F, H, W)
    return torch.stack([to_uint8_video(v) for v in pixels])


def write_side_by_side(
    videos: list[torch.Tensor], out_dir: Path, stem: str, fps: int
) -> list[Path]:
    """Write one mp4 per sample, models side by side (left to right in ``videos`` order);
    each entry of ``videos`` is (n, F, H, W, 3) uint8."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(videos[0].shape[0]):
        frames = torch.cat([v[k] for v in videos], dim=2)  # (F, H, W*m, 3)
        path = out_dir / f"{stem}_{k}.mp4"
        write_mp4(path, frames.numpy(), fps=fps)
        paths.append(path)
    return paths


def intended_motion(caption: str) -> list[IntendedMotion] | None:
    """The shape motions a caption states, or None when it states none (real-data captions)."""
    try:
        return parse_caption(caption)
    except ValueError:
        return None


def score_samples(
    videos: torch.Tensor,
    reference: torch.Tensor | None = None,
    fps: float | None = None,
    captions: list[str] | None = None,
) -> list[dict[str, float]]:
    """:data:`VALIDATION_METRICS` of each video (n, F, H, W, 3) uint8, F >= 3.

    PSNR and SSIM compare video ``k`` with ``reference[k]`` (the teacher's video of the same
    noise) and are left out without a reference; PSNR of identical videos is capped at
    100 dB. ``fps``: the frame rate (dynamic degree samples frames at ~8 fps). ``captions``:
    the prompt of each video; where one states a shape's motion (``parse_caption``), the
    row gets ``motion_direction_error_deg`` and ``motion_speed_error`` (px/frame) of the
    measured motion against it.
    """
    out = []
    for k, video in enumerate(videos):
        intended = intended_motion(captions[k]) if captions is not None else None
        scores = score_video(video, fps=fps, caption=intended)
        row = {name: float(scores[name]) for name in VALIDATION_METRICS if name in scores}
        if reference is not None:
            row["psnr"] = min(psnr(video, reference[k]), PSNR_CAP_DB)
            row["ssim"] = ssim(video, reference[k])
        out.append(row)
    return out


@dataclass
class Validator:
    """Validation of the training loop: the gap on fixed batches at step 0, every ``every``
    steps and at the end (never when ``every`` is 0), plus sample videos when
    ``sample_steps > 0``. With ``progress``, rank 0 shows a progress bar of each validation
    (batches, sampling steps, scoring).

    With videos, rank 0 also scores them (``score_videos``): the student's videos with
    :data:`VALIDATION_METRICS` (PSNR / SSIM against the teacher's video of the same noise),
    the teacher's once (its videos never change: the teacher is frozen and the noise fixed,
    so its latents are generated once and reused). It logs a table
    ``val/sample_metrics`` (one row per model and video) and the means as
    ``val/student/<metric>`` and ``val/teacher/<metric>``, with ``val/sample_latency_s`` and
    ``val/metrics_s`` (seconds spent scoring). The motion errors use the batch captions and
    average over the videos whose caption states a motion.

    It keeps the student's latents of its first and latest validation (the same noise as
    the teacher's), so :meth:`frame_strip` can set them beside the data clip and the teacher.

    Attributes:
        step: the run's loss computation (teacher, weights, devices).
        batches: fixed validation batches.
        every: cadence in optimiser steps; 0: never validate.
        sample_steps, sample_shift, num_samples, seed: the sample videos' sampler and noise.
        decode: latents -> pixels (the data's video encoder), when sampling videos.
        out_dir, fps: where and at which rate the videos are written.
        is_main: only rank 0 writes, scores and logs the videos (every rank generates them:
            under sequence parallelism or sharding the model runs on all ranks together).
        score_videos: score the videos with the offline metrics.
        student_label: what the frame strip calls the student (e.g. ``STA student``).
        progress: show the progress bar (``logging.progress``; rank 0 only).
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
    score_videos: bool = True
    student_label: str = "student"
    student_schedule: Schedule | None = None  # a few-step student's own; None: the teacher's
    guidance: tuple[Any, float] | None = None  # the teacher's (negative prompt, scale)
    progress: bool = False
    _teacher: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _student: dict[str, tuple[int, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )  # "first" / "latest": (step, latents (n, C, T, H, W))

    def should_validate(self, step: int, last: int) -> bool:
        """Validate at step 0, every ``every`` steps, and at the final step ``last``; never
        when ``every`` is 0."""
        return self.every > 0 and (step == 0 or step == last or step % self.every == 0)

    def _progress_bar(self, step: int) -> tqdm:
        """A bar over this validation's batches, sampling steps and scoring (rank 0)."""
        total = len(self.batches)
        if self.sample_steps > 0:
            student = self.student_schedule.steps if self.student_schedule else self.sample_steps
            teacher = self.step.teacher is not None and "latents" not in self._teacher
            total += student + self.sample_steps * teacher + (self.is_main and self.score_videos)
        return tqdm(total=total, desc=f"validate step {step}", leave=False, dynamic_ncols=True,
                    disable=not (self.is_main and self.progress))  # fmt: skip

    def __call__(self, student: VideoDiT, step: int, tracker: Any) -> dict[str, float]:
        """Every validation metric at ``step``; videos and tables go to ``tracker`` (rank 0)."""
        with self._progress_bar(step) as bar:
            metrics = self._validate(student, step, tracker, lambda: bar.update(1))
            bar.refresh()  # draw the full bar: ``mininterval`` may have skipped the last update
            return metrics

    def _validate(
        self, student: VideoDiT, step: int, tracker: Any, tick: Callable[[], None]
    ) -> dict[str, float]:
        metrics = self.step.validation_gap(student, self.batches, on_batch=tick)
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
                teacher_latents=self._teacher.get("latents"),
                student_schedule=self.student_schedule,
                guidance=self.guidance,
                on_step=tick,
            )
            if len(latents) == 2 and "latents" not in self._teacher:
                self._teacher["latents"] = latents[1]
            self._student.setdefault("first", (step, latents[0]))
            self._student["latest"] = (step, latents[0])
            metrics.update(gap)
            if self.is_main:
                videos = [decode_videos(lat, self.decode) for lat in latents]
                paths = write_side_by_side(videos, self.out_dir, f"step_{step:08d}", self.fps)
                for k, path in enumerate(paths):
                    tracker.log_video(f"samples/{k}", path, step, caption=batch["caption"][k])
                if self.score_videos:
                    metrics.update(self._score(videos, batch["caption"], step, tracker))
                    tick()
        return metrics

    def _score(
        self, videos: list[torch.Tensor], captions: list[str], step: int, tracker: Any
    ) -> dict[str, float]:
        """Score the student's (and, once, the teacher's) videos; log the table; the means."""
        if videos[0].shape[1] < 3:
            if not self._teacher.get("warned"):
                log.warning("validation videos have %d frames: not scored (the metrics need 3)",
                            videos[0].shape[1])  # fmt: skip
                self._teacher["warned"] = True
            return {}
        start = time.perf_counter()
        teacher = videos[1] if len(videos) == 2 else None
        scored = {"student": score_samples(videos[0], teacher, fps=self.fps, captions=captions)}
        if teacher is not None:
            if "scores" not in self._teacher:
                self._teacher["scores"] = score_samples(teacher, fps=self.fps, captions=captions)
            scored["teacher"] = self._teacher["scores"]
        columns = ["model", "sample", "caption", *VALIDATION_METRICS]
        rows = [
            [model, k, captions[k], *(row.get(m) for m in VALIDATION_METRICS)]
            for model, rows_ in scored.items()
            for k, row in enumerate(rows_)
        ]
        tracker.log_table("val/sample_metrics", columns, rows, step)
        means = {}
        for model, rows_ in scored.items():
            for name in VALIDATION_METRICS:
                values = [r[name] for r in rows_ if name in r]
                if values:
                    means[f"val/{model}/{name}"] = sum(values) / len(values)
        means["val/metrics_s"] = time.perf_counter() - start
        return means

    def frame_strip(self, path: Path, *, frames: int = 6) -> Path | None:
        """Write a PNG of frame strips per validation sample: the data clip (after the video
        encoder's round trip), the dense teacher, the student at its first validation and at
        its latest, all from the same noise; None when no videos were sampled.

        ``frames``: how many evenly spaced frames of each video.
        """
        if "latest" not in self._student:
            return None
        num = self._student["latest"][1].shape[0]
        captions = list(self.batches[0]["caption"][:num])
        rows = [("data clip", self.batches[0]["latents"][:num].float().cpu())]
        if "latents" in self._teacher:
            rows.append(("dense teacher", self._teacher["latents"]))
        seen = set()
        for key in ("first", "latest"):
            step, latents = self._student[key]
            if step not in seen:
                rows.append((f"{self.student_label}, step {step}", latents))
                seen.add(step)
        videos = [(label, decode_videos(lat, self.decode)) for label, lat in rows]
        return plot_frame_strip(videos, captions, path, frames=frames)
