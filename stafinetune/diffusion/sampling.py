"""Flow-matching sampling with per-step STA windows.

The model predicts the velocity v = noise - x0 at noise level sigma (timestep 1000 * sigma).
A :class:`Schedule` says which levels a sampler visits and how it moves between them:
Euler (integrate dx/dsigma = v, deterministic) or stochastic (predict x0 = x - sigma v and
re-noise it to the next level with fresh noise, as few-step students trained by
distribution matching sample; diffusers' ``FlowMatchEulerDiscreteScheduler`` with
``stochastic_sampling=True`` does the same). Step ``i`` passes ``step_index=i`` so
mask-strategy windows and ``dense_first_steps`` apply per step.
:class:`ClassifierFreeGuidance` wraps a model with the same call signature, so the sampler
integrates the guided velocity unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# ``condition`` tensors that follow the prompt (HunyuanVideo 1.5's glyph stream): guidance's
# negative forward takes the negative prompt's own, every other condition tensor is shared
PROMPT_CONDITION = ("text_2", "text_2_mask")


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) decreasing noise levels from 1 to 0, shifted towards high noise by ``shift``."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@dataclass(frozen=True)
class Schedule:
    """The noise levels a sampler visits and how it moves between them.

    Attributes:
        sigmas: the ``steps`` levels the model is evaluated at, decreasing, in (0, 1]; the
            sampler ends at 0 after the last.
        stochastic: between levels, predict x0 and re-noise it to the next level with fresh
            noise (few-step students); else an Euler step along the velocity.
    """

    sigmas: tuple[float, ...]
    stochastic: bool = False

    def __post_init__(self) -> None:
        levels = [float(s) for s in self.sigmas]
        if not levels:
            raise ValueError("a sampling schedule needs at least 1 noise level")
        if not all(0.0 < s <= 1.0 for s in levels) or any(
            a <= b for a, b in zip(levels, levels[1:], strict=False)
        ):
            raise ValueError(f"schedule sigmas must decrease within (0, 1], got {levels}")
        object.__setattr__(self, "sigmas", tuple(levels))

    @classmethod
    def flow(cls, steps: int, shift: float = 1.0, *, stochastic: bool = False) -> Schedule:
        """``steps`` evenly spaced levels from 1 (``flow_sigmas``), shifted by ``shift``."""
        return cls(tuple(flow_sigmas(steps, shift)[:-1].tolist()), stochastic)

    @property
    def steps(self) -> int:
        """Model evaluations of one sample."""
        return len(self.sigmas)

    def levels(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(steps + 1,) float32 levels, the final 0 included."""
        return torch.tensor([*self.sigmas, 0.0], dtype=torch.float32, device=device)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what an export records)."""
        return {"steps": self.steps, "sigmas": list(self.sigmas), "stochastic": self.stochastic}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming what is wrong."""
        try:
            schedule = cls(tuple(float(s) for s in data["sigmas"]), bool(data["stochastic"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"a schedule needs sigmas and stochastic, got {data!r}") from err
        if "steps" in data and int(data["steps"]) != schedule.steps:
            raise ValueError(f"schedule steps={data['steps']} but it lists {schedule.steps} sigmas")
        return schedule


def schedule_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    stochastic: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Move latents ``x`` (B, C, T, H, W) at level ``sigma`` to ``sigma_next`` given the model's
    velocity ``v``: an Euler step, or x0 = x - sigma v re-noised with fresh noise drawn from
    ``generator`` (on the CPU, then moved) when ``stochastic``."""
    if not stochastic:
        return x + (sigma_next - sigma) * v
    x0 = x - sigma * v
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    return (1.0 - sigma_next) * x0 + sigma_next * noise


@torch.no_grad()
def sample_latents(
    dit: nn.Module,
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    pooled_text: torch.Tensor | None = None,
    *,
    steps: int | None = None,
    shift: float = 1.0,
    schedule: Schedule | None = None,
    generator: torch.Generator | None = None,
    autocast_bf16: bool = False,
    on_step: Callable[[], None] | None = None,
    image_latents: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    condition: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample clean latents from ``noise``.

    Args:
        dit: a ``VideoDiT`` (any module with its call signature).
        noise: (B, C, T, H, W) starting latents at the first level (1 for ``steps``).
        text, text_mask, pooled_text: the conditioning, as in training.
        steps, shift: an Euler schedule of ``steps`` levels shifted by ``shift`` (Wan uses
            3-5 at 480p-720p); or
        schedule: any :class:`Schedule` (a few-step student's own).
        generator: the fresh noise of a stochastic schedule (CPU generator).
        autocast_bf16: run the model under bf16 autocast (CUDA).
        on_step: called after every Euler step (a progress bar's update).
        image_latents, image_embeds: an image-to-video model's condition (B, Ci, T, H, W) and
            image states (B, N, Di), the same at every step (``VideoDiT.forward``). A
            first-frame condition (B, C, 1, H, W) (Wan 2.2 TI2V) is re-imposed on the first
            latent frame after every step, as diffusers' pipeline does
            (:func:`impose_first_frame`).
        condition: the family's further inputs (``VideoDiT.forward``; HunyuanVideo 1.5's
            glyph stream ``text_2`` (B, L2, D2), ``text_2_mask`` (B, L2)), or None.
    Returns:
        (B, C, T, H, W) float32 latents; ``step_index`` runs 0..steps-1.
    """
    if (steps is None) == (schedule is None):
        raise ValueError("sample_latents takes exactly one of steps= and schedule=")
    if schedule is None:
        schedule = Schedule.flow(steps, shift)  # type: ignore[arg-type]
    sigmas = schedule.levels(noise.device)
    x = noise.float()
    batch = x.shape[0]
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    )
    image = image_kwargs(image_latents, image_embeds, condition)
    x = impose_first_frame(x, image_latents)
    for i in range(schedule.steps):
        timestep = (sigmas[i] * 1000.0).expand(batch)
        with ctx:
            v = dit(x, timestep, text, text_mask, pooled_text, step_index=i, **image)
        x = schedule_step(
            x, v.float(), sigmas[i], sigmas[i + 1], stochastic=schedule.stochastic,
            generator=generator,
        )  # fmt: skip
        x = impose_first_frame(x, image_latents)
        if on_step is not None:
            on_step()
    return x


def impose_first_frame(x: torch.Tensor, image_latents: torch.Tensor | None) -> torch.Tensor:
    """``x`` (B, C, T, H, W) with its first latent frame replaced by a first-frame condition
    ``image_latents`` (B, C, 1, H, W); unchanged without one (text-to-video, or Wan 2.1 I2V
    whose condition spans every frame and is taken on channels)."""
    if image_latents is None or image_latents.shape[2] != 1 or x.shape[2] == 1:
        return x
    return torch.cat([image_latents.to(x), x[:, :, 1:]], dim=2)


def image_kwargs(
    image_latents: torch.Tensor | None,
    image_embeds: torch.Tensor | None,
    condition: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The image keyword arguments of a ``VideoDiT`` call (none for a text-to-video model),
    and its ``condition`` when there is one."""
    kwargs: dict[str, Any] = {}
    if image_latents is not None:
        kwargs |= {"image_latents": image_latents, "image_embeds": image_embeds}
    if condition is not None:
        kwargs["condition"] = condition
    return kwargs


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance: ``v = v_neg + scale * (v_cond - v_neg)``.

    Called like the wrapped DiT; the conditional and the negative forward run as one batch of
    2B. With ``scale == 1`` the guided velocity is the conditional one, so only that forward
    runs (as diffusers' pipelines do).

    Args:
        dit: the model (a ``VideoDiT`` or any module with its call signature).
        negative: the negative prompt's ``(text (1, L, Dt), text_mask (1, L), pooled_text
            (1, Dp))`` (plain CFG: the empty prompt), broadcast over the batch; a fourth
            item, a dict of (1, ...) tensors, holds its ``PROMPT_CONDITION`` tensors (the
            glyph stream of a HunyuanVideo 1.5 text encoder).
        scale: the guidance scale, >= 0 (0: the negative prompt's velocity alone).
    """

    def __init__(
        self,
        dit: nn.Module,
        negative: tuple[Any, ...],
        scale: float,
    ) -> None:
        super().__init__()
        if not scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.dit = dit
        self.scale = float(scale)
        self.negative = negative

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        pooled_text: torch.Tensor | None = None,
        *,
        step_index: int | None = None,
        image_latents: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        condition: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The guided velocity (B, C, T, H, W) for noisy ``latents`` (B, C, T, H, W); both
        forwards see the image condition, as in diffusers' image-to-video pipelines, and the
        negative one its own prompt's ``PROMPT_CONDITION`` tensors."""
        if self.scale == 1.0:
            return self.dit(latents, timestep, text, text_mask, pooled_text, step_index=step_index,
                            **image_kwargs(image_latents, image_embeds, condition))  # fmt: skip
        neg_text, neg_mask, neg_pooled = self.negative_inputs(latents.shape[0], text)
        negative = self.negative_condition(condition)  # None, or (B, ...) tensors
        paired = {}  # the conditional and the negative condition tensors, (2B, ...) each
        if condition is not None and negative is not None:
            paired["condition"] = {k: torch.cat([v, negative[k]]) for k, v in condition.items()}
        pooled = None if pooled_text is None else torch.cat([pooled_text, neg_pooled])  # (2B, Dp)
        out = self.dit(
            torch.cat([latents, latents]),  # (2B, C, T, H, W)
            torch.cat([timestep, timestep]),  # (2B,)
            torch.cat([text, neg_text]),  # (2B, L, Dt)
            torch.cat([text_mask, neg_mask]),  # (2B, L)
            pooled,
            step_index=step_index,
            **{k: torch.cat([v, v]) if v is not None else None  # (2B, ...)
               for k, v in image_kwargs(image_latents, image_embeds).items()},
            **paired,
        )  # fmt: skip
        cond, neg = out.chunk(2)
        return self.combine(cond, neg)

    def negative_inputs(
        self, batch: int, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The negative prompt's (text (B, L, Dt), text_mask (B, L), pooled_text (B, Dp)) for a
        batch of ``batch`` prompts whose text states are ``text`` (B, L, Dt), on its device."""
        neg_text, neg_mask, neg_pooled = (t.to(text.device) for t in self.negative[:3])
        if neg_text.shape[1:] != text.shape[1:]:
            raise ValueError(
                f"negative prompt states {tuple(neg_text.shape[1:])} differ from the prompt's "
                f"{tuple(text.shape[1:])} (L, Dt): encode both with one text encoder"
            )
        return (
            neg_text.expand(batch, -1, -1),
            neg_mask.expand(batch, -1),
            neg_pooled.expand(batch, -1),
        )

    def negative_condition(
        self, condition: Mapping[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor] | None:
        """The negative forward's ``condition`` (B, ...) tensors: ``condition``'s, with the
        negative prompt's own ``PROMPT_CONDITION`` tensors broadcast over the batch."""
        if condition is None:
            return None
        own = self.negative[3] if len(self.negative) > 3 else {}
        missing = [k for k in PROMPT_CONDITION if k in condition and k not in own]
        if missing:
            raise ValueError(
                f"the prompts carry {missing} but the negative prompt does not: encode both "
                "with one text encoder"
            )
        out = dict(condition)
        for key, value in own.items():
            if key in condition:
                out[key] = value.to(condition[key]).expand(condition[key].shape)
        return out

    def combine(self, cond: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """The guided velocity (B, C, T, H, W) float32 from the conditional and the negative
        velocities (B, C, T, H, W)."""
        cond, neg = cond.float(), neg.float()
        return neg + self.scale * (cond - neg)


def to_uint8_video(video: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return (
        ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
    )
