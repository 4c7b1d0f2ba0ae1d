"""Few-step STA students: step distillation composed with STA distillation.

The student is the STA model with its windows at every step; it learns to sample in
``distill.fewstep.steps`` model evaluations (its :class:`~stafinetune.diffusion.sampling.
Schedule`) what the dense many-step teacher samples with guidance. Two methods share the
student's side (its schedule, its rollouts, its auxiliary per-step losses):

- :class:`DMD2Distill` (``distill=dmd2``), distribution matching in the DMD2 manner. Per
  student update: ``critic_ratio`` critic updates, each on fresh student samples (the critic
  learns the student's distribution by flow matching), then the student update. A student
  sample is made as the student samples at inference: from noise, ``k`` of its steps without
  gradients (``k`` uniform over its steps), then step ``k`` with gradients, whose x0
  prediction ``x`` is the sample. ``x`` is noised to a level ``t``; the teacher's guided x0
  prediction there is the real score, the critic's the fake score, and the student's loss
  ``0.5 * ||x - sg(x - g)||^2`` with ``g = (fake - real) / mean|x - real|`` moves ``x`` towards
  the teacher's distribution and away from its own (``g`` carries no gradient).
- :class:`TrajectoryDistill` (``distill=trajectory``): on the teacher's own trajectory from
  noise, the teacher's guided Euler steps from a student level ``s_k`` down to ``s_k+1`` are
  the target of the student's one Euler step (a deterministic schedule).

Both return the same metrics shape as :class:`~stafinetune.training.distill.DistillStep` and
are driven by the same loop; the per-step terms (``distill.w_attn``, ``w_out``, ``w_data``)
add to the student's loss when set: for ``dmd2`` on noised data, for ``trajectory`` at the
teacher's state where the student's step starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stafinetune.build import autocast
from stafinetune.config import DistillConfig, FewStepConfig
from stafinetune.diffusion.flow_matching import add_noise, velocity_target
from stafinetune.diffusion.losses import dmd_loss
from stafinetune.diffusion.sampling import ClassifierFreeGuidance, Schedule, schedule_step
from stafinetune.models import VideoDiT
from stafinetune.models.offload import ActivationOffloader
from stafinetune.parallel.sequence import SequenceParallel

from .distill import DistillStep, draw_noise, model_inputs, to_device

Batch = dict[str, Any]
# (text, mask, pooled[, glyph condition]): ``build.encode_prompt``'s negative prompt
Negative = tuple[Any, ...]


def student_schedule(cfg: FewStepConfig) -> Schedule:
    """The schedule the student samples with: ``cfg.sigmas`` or ``cfg.steps`` shifted levels."""
    if cfg.sigmas is not None:
        return Schedule(tuple(cfg.sigmas), cfg.stochastic)
    return Schedule.flow(cfg.steps, cfg.shift, stochastic=cfg.stochastic)


def _uniform(batch: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """(batch,) levels uniform in [low, high] from ``generator``."""
    return low + (high - low) * torch.rand(batch, generator=generator)


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) levels shaped to broadcast over (B, C, T, H, W) ``like``."""
    return sigma.view(-1, *([1] * (like.ndim - 1))).to(like)


@dataclass
class FewStepBase:
    """What both few-step methods share (see the module docstring).

    Attributes:
        cfg: the ``distill`` group (``cfg.fewstep`` the student's schedule and guidance).
        teacher: the frozen dense teacher; ``teacher_module`` what to call for it.
        device, bf16, teacher_bf16: where the student computes, and the autocasts.
        negative: the encoded negative prompt ``(text (1, L, Dt), mask (1, L), pooled (1, Dp))``
            of the teacher's guidance, with its glyph stream for a text encoder with one
            (``build.encode_prompt``); None without guidance.
        sequence: the sequence split of the models (``parallel.sp > 1``).
        control_seed: seed of :attr:`control`, the generator of the draws that decide how
            many model calls a step makes (the student's step ``k``). It is the same on
            every rank, because sharded models (FSDP2, ZeRO-3) gather their weights in every
            call and all ranks must make the same calls; noise and levels differ per
            data-parallel rank (the trainer's generator).
        target_offload: the per-step terms' teacher attention outputs in host memory
            (``offload.teacher_attention``, see ``DistillStep``).
    """

    cfg: DistillConfig
    teacher: VideoDiT
    device: torch.device
    bf16: bool
    teacher_bf16: bool
    teacher_module: nn.Module | None = None
    negative: Negative | None = None
    sequence: SequenceParallel | None = None
    control_seed: int = 0
    target_offload: ActivationOffloader | None = None
    schedule: Schedule = field(init=False)
    control: torch.Generator = field(init=False)
    aux: DistillStep | None = field(init=False)

    def __post_init__(self) -> None:
        if self.teacher_module is None:
            self.teacher_module = self.teacher
        self.schedule = student_schedule(self.cfg.fewstep)
        self.control = torch.Generator().manual_seed(self.control_seed)
        if self.cfg.fewstep.guidance_scale != 1.0 and self.negative is None:
            raise ValueError("distill.fewstep.guidance_scale != 1 needs the negative prompt")
        per_step = self.cfg.w_attn + self.cfg.w_out + self.cfg.w_data > 0
        self.aux = None
        if per_step:
            self.aux = DistillStep(
                cfg=self.cfg, teacher=self.teacher, device=self.device, bf16=self.bf16,
                teacher_bf16=self.teacher_bf16, teacher_module=self.teacher_module,
                sequence=self.sequence, target_offload=self.target_offload,
            )  # fmt: skip

    # ----------------------------------------------------------------- the models' predictions
    def _call(
        self, module: nn.Module, x: torch.Tensor, sigma: torch.Tensor, batch: Batch, *, bf16: bool
    ) -> torch.Tensor:
        """``module``'s velocity (B, C, T, H, W) fp32 at latents ``x`` and levels ``sigma`` (B,),
        on the device of ``x``. The student attends with its step-independent windows at every
        step, as its exported one-step mask strategy makes it attend at inference."""
        inputs = model_inputs(batch, x, sigma, x.device)
        with autocast(x.device, bf16):
            v = module(**inputs)
        return v.float()

    @torch.no_grad()
    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The teacher's guided x0 prediction (B, C, T, H, W) fp32 of ``x_t`` at levels ``t``
        (B,), on the student's device: the real score of the student's samples."""
        param = next(self.teacher.parameters())
        model: nn.Module = self.teacher_module  # type: ignore[assignment]
        scale = self.cfg.fewstep.guidance_scale
        if scale != 1.0:
            assert self.negative is not None
            model = ClassifierFreeGuidance(model, self.negative, scale)
        x = x_t.to(param.device, param.dtype)
        tb = t.to(param.device)
        inputs = model_inputs(batch, x, tb, param.device, param.dtype)
        with autocast(param.device, self.teacher_bf16):
            v = model(**inputs)  # the guided call takes the same arguments
        v = v.float().to(self.device)
        return x_t - _per_sample(t, x_t) * v

    @torch.no_grad()
    def rollout(
        self, student: nn.Module, batch: Batch, noise: torch.Tensor, steps: int,
        generator: torch.Generator,
    ) -> torch.Tensor:  # fmt: skip
        """The student's latents at its level ``steps`` (B, C, T, H, W): ``steps`` of its own
        sampling steps from ``noise`` (fresh noise of a stochastic schedule from
        ``generator``), without gradients."""
        levels = self.schedule.levels()
        x = noise
        batch_size = x.shape[0]
        for i in range(steps):
            v = self._call(student, x, levels[i].expand(batch_size), batch, bf16=self.bf16)
            x = schedule_step(x, v, float(levels[i]), float(levels[i + 1]),
                              stochastic=self.schedule.stochastic, generator=generator)  # fmt: skip
        return x

    def student_x0(
        self, student: nn.Module, batch: Batch, x: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step`` of the student at latents ``x`` (with gradients): (its x0 prediction,
        its velocity), each (B, C, T, H, W) fp32."""
        sigma = self.schedule.levels()[step].expand(x.shape[0])
        v = self._call(student, x, sigma, batch, bf16=self.bf16)
        return x - float(sigma[0]) * v, v

    def aux_losses(self, engine: Any, batch: Batch, generator: torch.Generator) -> dict[str, Any]:
        """The per-step terms on noised data (empty when they are all 0)."""
        if self.aux is None:
            return {}
        noise, sigma = draw_noise(batch["latents"], self.cfg, generator)
        terms = self.aux.losses(engine.module, engine.model, batch, noise.to(self.device),
                                sigma.to(self.device))  # fmt: skip
        return {f"aux_{k}" if k != "total" else "aux": v for k, v in terms.items()}

    def validation_gap(
        self, student: VideoDiT, batches: list[Batch], on_batch: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """The per-step gaps on fixed batches when auxiliary terms are on (else nothing: a
        few-step student is judged by its samples)."""
        if self.aux is None:
            for _ in batches:
                if on_batch is not None:
                    on_batch()
            return {}
        from .validation import validation_gap

        return validation_gap(self.aux, student, batches, on_batch=on_batch)

    def student_losses(
        self, student: Any, batch: Batch, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The student's loss terms on one micro-batch (each method's own)."""
        raise NotImplementedError

    def forward_backward(
        self, student: Any, next_batch: Callable[[], Batch], generator: torch.Generator,
        grad_accum: int,
    ) -> tuple[dict[str, float], int, int]:  # fmt: skip
        """The student's micro-batches, forward and backward (the loop steps its optimiser).
        Returns the mean of each loss term over the micro-batches, samples and video tokens."""
        sums: dict[str, float] = {}
        samples = tokens = 0
        for micro in range(grad_accum):
            batch = to_device(next_batch(), self.device)
            last = micro == grad_accum - 1
            with student.grad_sync(last):
                terms = self.student_losses(student, batch, generator)
                student.backward(terms["total"], last)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / grad_accum
            n, t = self._count(batch["latents"], student.model)
            samples, tokens = samples + n, tokens + t
        return sums, samples, tokens

    @staticmethod
    def _count(latents: torch.Tensor, model: VideoDiT) -> tuple[int, int]:
        return latents.shape[0], latents.shape[0] * math.prod(model.canvas_for(latents.shape))


@dataclass
class DMD2Distill(FewStepBase):
    """Distribution matching (``distill=dmd2``; see the module docstring).

    Attributes:
        critic_engine: the critic's engine (``stafinetune.parallel.engine``): its module is
            the fake score, trained by :meth:`critic_update`.
        critic_grad_clip: the critic's gradient clipping (``train.grad_clip``).
    """

    critic_engine: Any = None
    critic_grad_clip: float = 1.0

    def _sample(
        self, student: nn.Module, batch: Batch, generator: torch.Generator, *, grad: bool
    ) -> tuple[torch.Tensor, int]:
        """A student sample x0 (B, C, T, H, W) fp32 as the student makes it at inference, and
        the step ``k`` it came from (uniform over the student's steps, from :attr:`control`)."""
        k = int(torch.randint(0, self.schedule.steps, (1,), generator=self.control))
        noise = torch.randn(batch["latents"].shape, generator=generator).to(self.device)
        x = self.rollout(student, batch, noise, k, generator)
        with torch.set_grad_enabled(grad):
            x0, _ = self.student_x0(student, batch, x, k)
        return x0, k

    def _levels(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        fs = self.cfg.fewstep
        return _uniform(batch, fs.score_t_min, fs.score_t_max, generator).to(self.device)

    def critic_loss(self, sample: torch.Tensor, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of the critic on the (detached) student samples (B, C, T, H, W)."""
        engine = self.critic_engine
        t = self._levels(sample.shape[0], generator)
        noise = torch.randn(sample.shape, generator=generator).to(self.device)
        x_t = add_noise(sample, noise, t)
        v = self._call(engine.module, x_t, t, batch, bf16=self.bf16)
        return F.mse_loss(v, velocity_target(sample, noise))

    def critic_update(
        self, student: Any, next_batch: Callable[[], Batch], generator: torch.Generator,
        grad_accum: int,
    ) -> tuple[float, float]:  # fmt: skip
        """One optimiser step of the critic on fresh student samples; (loss, grad norm)."""
        engine = self.critic_engine
        engine.zero_grad()
        total = 0.0
        for micro in range(grad_accum):
            batch = to_device(next_batch(), self.device)
            sample, _ = self._sample(student.module, batch, generator, grad=False)
            last = micro == grad_accum - 1
            with engine.grad_sync(last):
                loss = self.critic_loss(sample, batch, generator)
                engine.backward(loss, last)
            total += float(loss.detach()) / grad_accum
        norm = engine.clip_grad_norm(self.critic_grad_clip)
        engine.step()
        if norm is None:
            norm = engine.last_grad_norm
        return total, float(norm)

    def student_losses(
        self, student: Any, batch: Batch, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The student's loss terms on one micro-batch: ``dmd`` (and the auxiliary terms)."""
        sample, _ = self._sample(student.module, batch, generator, grad=True)
        t = self._levels(sample.shape[0], generator)
        noise = torch.randn(sample.shape, generator=generator).to(self.device)
        with torch.no_grad():
            x_t = add_noise(sample.detach(), noise, t)
            real = self.teacher_x0(x_t, t, batch)
            fake = x_t - _per_sample(t, x_t) * self._call(
                self.critic_engine.module, x_t, t, batch, bf16=self.bf16
            )
        terms: dict[str, torch.Tensor] = {"dmd": dmd_loss(sample, real, fake)}
        terms.update(self.aux_losses(student, batch, generator))
        terms["total"] = terms["dmd"] + terms.get("aux", 0.0)
        return terms

    def forward_backward(
        self, student: Any, next_batch: Callable[[], Batch], generator: torch.Generator,
        grad_accum: int,
    ) -> tuple[dict[str, float], int, int]:  # fmt: skip
        """``critic_ratio`` critic updates, then the student's micro-batches (forward and
        backward; the loop steps the student's optimiser). Returns the student's mean loss
        terms plus ``critic`` and ``critic_grad_norm``, samples and video tokens."""
        critic_losses, norms = [], []
        for _ in range(self.cfg.fewstep.critic_ratio):
            loss, norm = self.critic_update(student, next_batch, generator, grad_accum)
            critic_losses.append(loss)
            norms.append(norm)
        sums, samples, tokens = super().forward_backward(student, next_batch, generator, grad_accum)
        sums["critic"] = sum(critic_losses) / len(critic_losses)
        sums["critic_grad_norm"] = sum(norms) / len(norms)
        return sums, samples, tokens


@dataclass
class TrajectoryDistill(FewStepBase):
    """Trajectory segments (``distill=trajectory``; see the module docstring).

    The student learns on the teacher's own trajectory from noise, the states it meets when
    it samples: for a drawn step ``k``, the teacher's guided Euler steps (``teacher_steps /
    steps`` per student step) carry the noise to the student's level ``s_k`` and on to
    ``s_k+1``; the student's velocity at ``(x_k, s_k)`` is trained towards the segment's
    average velocity ``(x_k+1 - x_k) / (s_k+1 - s_k)``. With ``distill.w_attn`` / ``w_out`` the
    per-step terms compare the student's attention outputs and velocity with the teacher's at
    the same state ``(x_k, s_k)``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule.stochastic:
            raise ValueError(
                "distill=trajectory trains Euler steps: set distill.fewstep.stochastic=false"
            )

    def fine_levels(self) -> list[list[float]]:
        """The teacher's levels within each student step: ``steps`` lists of ``teacher_steps /
        steps + 1`` levels, from the student's level down to the next one (0 at the end)."""
        sub = self.cfg.fewstep.teacher_steps // self.schedule.steps
        levels = self.schedule.levels().tolist()
        return [
            torch.linspace(a, b, sub + 1, dtype=torch.float64).float().tolist()
            for a, b in zip(levels, levels[1:], strict=False)
        ]

    @torch.no_grad()
    def teacher_segment(
        self, x: torch.Tensor, levels: list[float], batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's guided Euler steps from ``x`` through ``levels``: (the end state,
        the velocity of the first step), each (B, C, T, H, W) fp32."""
        y, first = x, None
        for a, b in zip(levels, levels[1:], strict=False):
            t = torch.full((x.shape[0],), a, device=self.device)
            v = (y - self.teacher_x0(y, t, batch)) / a  # the guided velocity
            first = v if first is None else first
            y = y + (b - a) * v
        assert first is not None
        return y, first

    def student_losses(
        self, student: Any, batch: Batch, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The student's loss terms on one micro-batch: ``trajectory`` (and the per-step ones
        at the same state)."""
        k = int(torch.randint(0, self.schedule.steps, (1,), generator=self.control))
        segments = self.fine_levels()
        x = torch.randn(batch["latents"].shape, generator=generator).to(self.device)
        for levels in segments[:k]:  # the teacher's trajectory down to the student's level k
            x, _ = self.teacher_segment(x, levels, batch)
        start, end = segments[k][0], segments[k][-1]
        target_end, teacher_v = self.teacher_segment(x, segments[k], batch)
        target = (target_end - x) / (end - start)  # the segment's average velocity
        sigma = torch.full((x.shape[0],), start, device=self.device)
        if self.aux is None:
            _, v = self.student_x0(student.module, batch, x, k)
            terms: dict[str, torch.Tensor] = {}
        else:
            terms = self.aux.losses_at(student.module, student.model, batch, x, sigma,
                                       target=target, teacher_out=teacher_v)  # fmt: skip
            v = terms.pop("prediction")
            terms = {f"aux_{n}" if n != "total" else "aux": t for n, t in terms.items()}
        terms["trajectory"] = F.mse_loss(v, target)
        terms["total"] = terms["trajectory"] + terms.get("aux", 0.0)
        return terms


def write_scheduler(folder: Path, schedule: Schedule) -> Path:
    """Write the diffusers scheduler a pipeline samples the student with: a
    ``FlowMatchEulerDiscreteScheduler`` that re-noises with fresh noise when the schedule is
    stochastic. Its levels are the schedule's own (``enable_sta`` installs them); the
    config's ``shift`` is 1 so that they are not shifted twice."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, stochastic_sampling=schedule.stochastic
    )
    scheduler.save_pretrained(str(folder))
    return folder
