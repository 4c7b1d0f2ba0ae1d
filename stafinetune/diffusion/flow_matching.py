"""Rectified-flow (flow-matching) training objective, as used by Wan 2.1 and HunyuanVideo.

x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity
v = noise - x0, and the model's timestep input is ``1000 * sigma``.
"""

from __future__ import annotations

import torch


def sample_sigmas(
    batch: int,
    *,
    sampling: str,
    shift: float,
    generator: torch.Generator | None = None,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Draw noise levels sigma in (0, 1), shape (B,).

    Args:
        sampling: "uniform" or "logit_normal" (sigmoid of a standard normal, as SD3).
        shift: timestep shift s >= 1 moving mass to high noise: s*u / (1 + (s-1)*u).
        sigma_range: (lo, hi): draw from the same distribution conditioned on lo <= sigma <= hi
            (one expert's noise range of a two-expert model), by its inverse CDF.
    """
    if sampling not in ("uniform", "logit_normal"):
        raise ValueError(
            f"distill.timestep_sampling must be uniform or logit_normal, got {sampling!r}"
        )
    lo, hi = sigma_range
    if (lo, hi) == (0.0, 1.0):
        if sampling == "uniform":
            u = torch.rand(batch, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(batch, generator=generator))
    else:
        # the shift is monotone: sigma in [lo, hi] <=> u in [a, b] with u = sigma / (s - (s-1) sigma)
        a, b = (torch.tensor(x / (shift - (shift - 1) * x), dtype=torch.float64) for x in (lo, hi))
        r = torch.rand(batch, generator=generator, dtype=torch.float64)
        if sampling == "uniform":
            u = (a + (b - a) * r).float()
        else:  # a standard normal truncated to [logit(a), logit(b)]
            ca, cb = (torch.special.ndtr(torch.logit(x)) for x in (a, b))
            u = torch.sigmoid(torch.special.ndtri(ca + (cb - ca) * r)).float()
    u = u.clamp(1e-4, 1 - 1e-4)
    return shift * u / (1 + (shift - 1) * u)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma for latents (B, C, T, H, W) and sigma (B,)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = noise - x0."""
    return noise - x0
