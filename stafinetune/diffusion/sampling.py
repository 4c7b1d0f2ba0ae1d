"""Flow-matching sampling (Euler) with per-step STA windows.

The model predicts the velocity v = noise - x0 at noise level sigma (timestep 1000 * sigma);
integrating dx/dsigma = v from sigma = 1 (pure noise) to 0 gives a sample. Step ``i`` passes
``step_index=i`` so mask-strategy windows and ``dense_first_steps`` apply per step.
:class:`ClassifierFreeGuidance` wraps a model with the same call signature, so the sampler
integrates the guided velocity unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) decreasing noise levels from 1 to 0, shifted towards high noise by ``shift``."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@torch.no_grad()
def sample_latents(
    dit: nn.Module,
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    pooled_text: torch.Tensor | None = None,
    *,
    steps: int,
    shift: float = 1.0,
    autocast_bf16: bool = False,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Integrate the flow from ``noise`` to a clean latent.

    Args:
        dit: a ``VideoDiT`` (any module with its call signature).
        noise: (B, C, T, H, W) starting latents at sigma = 1.
        text, text_mask, pooled_text: the conditioning, as in training.
        steps: Euler steps; ``step_index`` runs 0..steps-1.
        shift: timestep shift of the schedule (Wan uses 3-5 at 480p-720p).
        autocast_bf16: run the model under bf16 autocast (CUDA).
        on_step: called after every Euler step (a progress bar's update).
    Returns:
        (B, C, T, H, W) float32 latents.
    """
    sigmas = flow_sigmas(steps, shift).to(noise.device)
    x = noise.float()
    batch = x.shape[0]
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    )
    for i in range(steps):
        timestep = (sigmas[i] * 1000.0).expand(batch)
        with ctx:
            v = dit(x, timestep, text, text_mask, pooled_text, step_index=i)
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
        if on_step is not None:
            on_step()
    return x


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance: ``v = v_neg + scale * (v_cond - v_neg)``.

    Called like the wrapped DiT; the conditional and the negative forward run as one batch of
    2B. With ``scale == 1`` the guided velocity is the conditional one, so only that forward
    runs (as diffusers' pipelines do).

    Args:
        dit: the model (a ``VideoDiT`` or any module with its call signature).
        negative: the negative prompt's ``(text (1, L, Dt), text_mask (1, L), pooled_text
            (1, Dp))`` (plain CFG: the empty prompt), broadcast over the batch.
        scale: the guidance scale, >= 0 (0: the negative prompt's velocity alone).
    """

    def __init__(
        self,
        dit: nn.Module,
        negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
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
    ) -> torch.Tensor:
        """The guided velocity (B, C, T, H, W) for noisy ``latents`` (B, C, T, H, W)."""
        if self.scale == 1.0:
            return self.dit(latents, timestep, text, text_mask, pooled_text, step_index=step_index)
        batch = latents.shape[0]
        neg_text, neg_mask, neg_pooled = (t.to(latents.device) for t in self.negative)
        if neg_text.shape[1:] != text.shape[1:]:
            raise ValueError(
                f"negative prompt states {tuple(neg_text.shape[1:])} differ from the prompt's "
                f"{tuple(text.shape[1:])} (L, Dt): encode both with one text encoder"
            )
        pooled = None
        if pooled_text is not None:
            pooled = torch.cat([pooled_text, neg_pooled.expand(batch, -1)])  # (2B, Dp)
        out = self.dit(
            torch.cat([latents, latents]),  # (2B, C, T, H, W)
            torch.cat([timestep, timestep]),  # (2B,)
            torch.cat([text, neg_text.expand(batch, -1, -1)]),  # (2B, L, Dt)
            torch.cat([text_mask, neg_mask.expand(batch, -1)]),  # (2B, L)
            pooled,
            step_index=step_index,
        )
        cond, neg = out.float().chunk(2)
        return neg + self.scale * (cond - neg)


def to_uint8_video(video: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    return (
        ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()
    )
