"""One distillation step: noised inputs -> dense teacher -> STA student -> losses -> backward.

:class:`DistillStep` holds what does not change between steps (the frozen teacher, the loss
weights, devices and precision) and offers the two calls the loop and the evaluation need:
:meth:`DistillStep.losses` (one forward of both models, every loss term) and
:meth:`DistillStep.forward_backward` (the micro-batches of one optimiser step, backward
included). The optimiser step itself stays in the loop.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stafinetune.build import autocast
from stafinetune.config import DistillConfig
from stafinetune.diffusion.flow_matching import add_noise, sample_sigmas, velocity_target
from stafinetune.diffusion.losses import distillation_losses
from stafinetune.models import ActivationStore, VideoDiT
from stafinetune.models.offload import ActivationOffloader, HostCopy
from stafinetune.parallel.sequence import SequenceParallel


class CastingStore(ActivationStore):
    """A detached capture store that keeps each attention output in ``dtype`` (None: as
    computed), cast as it is recorded so a full-precision copy never accumulates.

    With an ``offloader`` (``offload.teacher_attention``) each output goes to host memory as
    it is recorded (``host[layer]``, a ``HostCopy``) instead of staying in ``layers``.
    """

    def __init__(
        self, layers: Iterable[int] | None, dtype: torch.dtype | None,
        offloader: ActivationOffloader | None = None,
    ) -> None:  # fmt: skip
        super().__init__(layers, detach=True)
        self.dtype = dtype
        self.offloader = offloader
        self.host: dict[int, HostCopy] = {}

    def record(self, layer: int, o: torch.Tensor, qkv: tuple, state: Any) -> None:
        o = o if self.dtype is None else o.to(self.dtype)
        if self.offloader is None:
            super().record(layer, o, qkv, state)
        elif self.wanted is None or layer in self.wanted:
            self.host[layer] = self.offloader.to_host(o.detach())
            self.canvas, self.text_len = state.canvas, state.text_len


def capture_dtype(name: str) -> torch.dtype | None:
    """``distill.teacher_attn_dtype``: ``auto`` -> None (keep), ``bf16`` -> torch.bfloat16."""
    return {"auto": None, "bf16": torch.bfloat16}[name]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch dict's tensors to ``device`` (other values pass through)."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def model_inputs(
    batch: dict[str, Any],
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``VideoDiT.forward`` for noisy latents ``x_t`` at ``sigma`` (B,)."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    inputs = {
        "latents": cast(x_t),  # (B, C, T, H, W)
        "timestep": cast(sigma * 1000.0),  # (B,)
        "text": cast(batch["text"]),  # (B, L, Dt)
        "text_mask": batch["text_mask"].to(device),  # (B, L)
        "pooled_text": cast(batch["pooled_text"]),  # (B, Dp)
    }
    if "image_latents" in batch:  # image-to-video: the clip's first-frame condition
        inputs["image_latents"] = cast(batch["image_latents"])  # (B, C, T or 1, H, W)
        embeds = batch.get("image_embeds")  # none for a first-frame condition
        inputs["image_embeds"] = None if embeds is None else cast(embeds)  # (B, N, Di)
    if "text_2" in batch:  # HunyuanVideo 1.5's glyph stream, through the family's condition
        inputs["condition"] = {
            "text_2": cast(batch["text_2"]),  # (B, L2, D2)
            "text_2_mask": batch["text_2_mask"].to(device),  # (B, L2)
        }
    return inputs


def given_first_frame(model: VideoDiT) -> bool:
    """Whether ``model`` takes its first latent frame as a clean condition (Wan 2.2 TI2V
    image-to-video), which the losses then leave out."""
    dims = model.image_dims
    return dims is not None and dims.first_frame


def draw_noise(
    x0: torch.Tensor,
    cfg: DistillConfig,
    generator: torch.Generator,
    *,
    sigma_range: tuple[float, float] = (0.0, 1.0),
    boundary: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (B, C, T, H, W) and noise levels sigma (B,) for clean latents ``x0``, on the CPU
    from ``generator`` (so that nothing drawing from the global RNG can shift them).

    ``sigma_range``: draw only levels in (lo, hi) (one expert of a two-expert model).
    ``boundary``: both experts of a two-expert model train: one level drawn from the whole
    distribution picks the side of ``boundary`` (so each expert gets its share of the noise
    levels), and the whole batch draws from that side, so that one expert runs it.
    """
    noise = torch.randn(x0.shape, generator=generator)
    shape = {"sampling": cfg.timestep_sampling, "shift": cfg.timestep_shift}
    if boundary is not None:
        first = float(sample_sigmas(1, **shape, generator=generator)[0])
        sigma_range = (boundary, 1.0) if first >= boundary else (0.0, boundary)
    sigma = sample_sigmas(x0.shape[0], **shape, generator=generator, sigma_range=sigma_range)
    return noise, sigma


@dataclass
class DistillStep:
    """Loss computation of the run (see the module docstring).

    Attributes:
        cfg: loss weights, captured layers and timestep sampling.
        teacher: the frozen dense teacher, or None (plain flow matching).
        device: the student's device; losses are computed there.
        bf16: bf16 autocast for the student.
        teacher_bf16: bf16 autocast for the teacher (on its own device).
        teacher_module: what to call for the teacher's forward (a sharding engine around
            ``teacher``); defaults to ``teacher``.
        sequence: the sequence split of both models (``parallel.sp > 1``): attention outputs
            are then local shards and their loss is reduced over the sp group.
        target_offload: keeps the teacher's captured attention outputs in host memory
            (``offload.teacher_attention``) until the attention loss and its backward read them.
        sigma_range, boundary: the noise levels drawn (``draw_noise``): one expert's range of
            a two-expert model (``model.expert=high/low``), or the boundary between the
            experts when both train (``model.expert=both``).
    """

    cfg: DistillConfig
    teacher: VideoDiT | None
    device: torch.device
    bf16: bool
    teacher_bf16: bool
    teacher_module: nn.Module | None = None
    sequence: SequenceParallel | None = None
    target_offload: ActivationOffloader | None = None
    sigma_range: tuple[float, float] = (0.0, 1.0)
    boundary: float | None = None

    def __post_init__(self) -> None:
        if self.teacher_module is None:
            self.teacher_module = self.teacher

    @torch.no_grad()
    def teacher_forward(
        self, batch: dict[str, Any], x_t: torch.Tensor, sigma: torch.Tensor, capture: bool
    ) -> tuple[torch.Tensor, Mapping[int, torch.Tensor] | None]:
        """The teacher's output (B, C, T, H, W) fp32 and, if ``capture``, its attention outputs,
        both on the student's device (with ``target_offload``: read from host memory one layer
        at a time, as the loss asks for them)."""
        assert self.teacher is not None
        param = next(self.teacher.parameters())
        inputs = model_inputs(batch, x_t, sigma, param.device, param.dtype)
        with autocast(param.device, self.teacher_bf16):
            if capture:
                store = CastingStore(
                    self.cfg.layers, capture_dtype(self.cfg.teacher_attn_dtype), self.target_offload
                )
                with self.teacher.capture(store=store):
                    out = self.teacher_module(**inputs)
                if self.target_offload is not None:
                    attn = self.target_offload.targets(store.host)
                else:
                    attn = {i: a.to(self.device) for i, a in store.layers.items()}
            else:
                out, attn = self.teacher_module(**inputs), None
        return out.to(self.device, torch.float32), attn

    def losses(
        self,
        module: nn.Module,
        model: VideoDiT,
        batch: dict[str, Any],
        noise: torch.Tensor,
        sigma: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Every loss term of one forward (see ``distillation_losses``).

        Args:
            module: what to call (the student or its data-parallel wrapper).
            model: the unwrapped student (its ``capture()`` records attention outputs).
            batch: a batch dict on ``device``; ``noise`` (B, C, T, H, W), ``sigma`` (B,).
        """
        x0 = batch["latents"]
        terms = self.losses_at(module, model, batch, add_noise(x0, noise, sigma), sigma,
                               target=velocity_target(x0, noise))  # fmt: skip
        del terms["prediction"]
        return terms

    def losses_at(
        self,
        module: nn.Module,
        model: VideoDiT,
        batch: dict[str, Any],
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        *,
        target: torch.Tensor,
        teacher_out: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every loss term at the noisy latents ``x_t`` (B, C, T, H, W) and levels ``sigma``
        (B,), against the velocity ``target``; plus ``prediction``, the student's velocity.

        ``teacher_out``: the teacher's velocity there when the caller has it (a few-step
        method's guided teacher); the teacher still runs when its attention is captured.
        """
        cfg = self.cfg
        want_attn = cfg.w_attn > 0
        teacher_attn = None
        if self.teacher is not None and (want_attn or teacher_out is None):
            out, teacher_attn = self.teacher_forward(batch, x_t, sigma, capture=want_attn)
            teacher_out = out if teacher_out is None else teacher_out
        inputs = model_inputs(batch, x_t, sigma, self.device)
        with autocast(self.device, self.bf16):
            if want_attn:
                with model.capture(layers=cfg.layers) as store:
                    pred = module(**inputs)
                student_attn = store.layers
            else:
                pred, student_attn = module(**inputs), None
        mse = None
        if self.sequence is not None:
            num_video = math.prod(model.canvas_for(x_t.shape))
            mse = functools.partial(self.sequence.mean_squared_error, num_video=num_video)
        keeping = (
            self.target_offload.keeping_targets()
            if self.target_offload is not None and teacher_attn is not None
            else contextlib.nullcontext()
        )  # the loss saves host copies of the targets for its backward
        with keeping:
            terms = distillation_losses(
                attn_mse=mse,
                student_out=pred.float(),
                target=target,
                teacher_out=teacher_out,
                student_attn=student_attn,
                teacher_attn=teacher_attn,
                w_data=cfg.w_data,
                w_out=cfg.w_out,
                w_attn=cfg.w_attn,
                layers=cfg.layers,
                given_first_frame=given_first_frame(model),
            )
        terms["prediction"] = pred.float()
        return terms

    def validation_gap(
        self, student: VideoDiT, batches: list[dict[str, Any]],
        on_batch: Callable[[], None] | None = None,
    ) -> dict[str, float]:  # fmt: skip
        """The ``val/*`` gaps on fixed batches (``validation.validation_gap``)."""
        from .validation import validation_gap

        return validation_gap(self, student, batches, on_batch=on_batch)

    def forward_backward(
        self,
        student: Any,
        next_batch: Callable[[], dict[str, Any]],
        generator: torch.Generator,
        grad_accum: int,
    ) -> tuple[dict[str, float], int, int]:
        """Forward and backward of the ``grad_accum`` micro-batches of one optimiser step.

        ``student`` is the run's engine (``stafinetune.parallel.engine``): its ``backward``
        averages gradients over the micro-batches, and they are reduced over ranks on the last
        one only.
        Returns:
            (the mean of each loss term over the micro-batches, samples processed, video tokens
            processed: each batch counted at its own bucket's canvas).
        """
        sums: dict[str, float] = {}
        samples = tokens = 0
        for micro in range(grad_accum):
            batch = to_device(next_batch(), self.device)
            noise, sigma = draw_noise(batch["latents"], self.cfg, generator,
                                      sigma_range=self.sigma_range, boundary=self.boundary)  # fmt: skip
            last = micro == grad_accum - 1
            with student.grad_sync(last):
                terms = self.losses(
                    student.module,
                    student.model,
                    batch,
                    noise.to(self.device),
                    sigma.to(self.device),
                )
                student.backward(terms["total"], last)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / grad_accum
            latents = batch["latents"]
            samples += latents.shape[0]
            tokens += latents.shape[0] * math.prod(student.model.canvas_for(latents.shape))
        return sums, samples, tokens
