"""Training noise levels follow the shifted distribution: a Kolmogorov-Smirnov test of the
sigmas the step draws against the analytic CDF of s*u / (1 + (s-1)*u)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from stafinetune.config import DistillConfig
from stafinetune.diffusion.flow_matching import sample_sigmas
from stafinetune.training.distill import draw_noise

N = 20_000
# Kolmogorov distribution: P(sqrt(N) * D > 1.95) ~ 1e-3 for a correct sampler
KS_LIMIT = 1.95 / math.sqrt(N)


def _cdf(x: torch.Tensor, sampling: str, shift: float) -> torch.Tensor:
    """P(sigma <= x) for sigma = s*u / (1 + (s-1)*u), computed in float64.

    The map is increasing in u, with inverse u = x / (s - (s-1)*x); u is uniform on (0, 1)
    or logit-normal (P(u <= v) = Phi(logit v)).
    """
    x = x.double()
    u = x / (shift - (shift - 1) * x)
    if sampling == "uniform":
        return u
    return torch.special.ndtr(torch.logit(u))


def _ks_distance(samples: torch.Tensor, cdf: torch.Tensor) -> float:
    """sup |empirical CDF - cdf| for ``samples`` sorted ascending and ``cdf`` at them."""
    n = samples.numel()
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 8.0])
def test_sampled_sigmas_follow_the_shifted_distribution(sampling: str, shift: float):
    sigma = sample_sigmas(
        N, sampling=sampling, shift=shift, generator=torch.Generator().manual_seed(0)
    )
    assert sigma.shape == (N,) and 0 < sigma.min() and sigma.max() < 1
    sigma = sigma.sort().values
    assert _ks_distance(sigma, _cdf(sigma, sampling, shift)) < KS_LIMIT
    if shift > 1:  # the test tells the shift apart: the unshifted CDF is far off
        assert _ks_distance(sigma, _cdf(sigma, sampling, 1.0)) > 10 * KS_LIMIT


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_the_training_step_draws_sigmas_with_the_configured_shift(sampling: str):
    # what DistillStep.forward_backward draws per micro-batch, from distill.* settings
    cfg = dataclasses.replace(DistillConfig(), timestep_sampling=sampling, timestep_shift=3.0)
    noise, sigma = draw_noise(torch.zeros(N, 2), cfg, torch.Generator().manual_seed(1))
    assert noise.shape == (N, 2)
    sigma = sigma.sort().values
    assert _ks_distance(sigma, _cdf(sigma, sampling, 3.0)) < KS_LIMIT
    assert _ks_distance(sigma, _cdf(sigma, sampling, 1.0)) > 10 * KS_LIMIT
