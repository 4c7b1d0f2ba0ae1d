"""PSNR, SSIM, MS-SSIM, VMAF and the latent gap against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from metrics_media import moving_shape

from stafinetune.metrics.fidelity import (
    VMAF_AVAILABLE,
    fidelity_metrics,
    latent_gap,
    ms_ssim,
    ms_ssim_scales,
    psnr,
    ssim,
    vmaf,
)


def noisy(video: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, video.shape)
    return np.clip(video + noise, 0, 255).round().astype(np.uint8)


def flat(level: int, frames: int = 2, size: int = 32) -> np.ndarray:
    return np.full((frames, size, size, 3), level, np.uint8)


def ssim_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al.'s SSIM of one grey image pair, window by window (valid windows only)."""
    t = np.arange(11) - 5.0
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
            cov = (w * a * b).sum() - ma * mb
            scores.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(scores))


def test_identical_clips():
    video, _ = moving_shape(3, size=64)
    assert psnr(video, video) == math.inf
    assert ssim(video, video) == 1.0
    assert ms_ssim(video, video) == 1.0


def test_psnr_known_value():
    # Every value off by 5: MSE 25, PSNR = 10 log10(255^2 / 25).
    assert psnr(flat(100), flat(105)) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)


def test_ssim_matches_the_definition():
    # Flat images: no variance, so SSIM is the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    c1 = (0.01 * 255) ** 2
    assert ssim(flat(100), flat(120)) == pytest.approx(
        (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), abs=1e-6
    )
    # Textured images: window-by-window reference, same value in each RGB channel.
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (21, 26)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 25, x.shape), 0, 255).round()
    to_video = lambda a: np.repeat(a[None, :, :, None], 3, axis=-1).astype(np.uint8)  # noqa: E731
    assert ssim(to_video(x), to_video(y)) == pytest.approx(ssim_by_hand(x, y), abs=1e-5)


def test_noise_lowers_ssim_and_ms_ssim():
    video, _ = moving_shape(3, size=64)
    light, heavy = noisy(video, 4), noisy(video, 25)
    assert 1.0 > ssim(light, video) > ssim(heavy, video) > 0.0
    assert 1.0 > ms_ssim(light, video) > ms_ssim(heavy, video) > 0.0
    assert psnr(light, video) > psnr(heavy, video)


def test_ms_ssim_scales_by_frame_size():
    assert [ms_ssim_scales(s, s) for s in (32, 64, 128, 160, 176, 720)] == [2, 3, 4, 4, 5, 5]


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"video \(2, 32, 32, 3\) vs reference \(2, 48, 32, 3\)"):
        fidelity_metrics(flat(0), np.zeros((2, 48, 32, 3), np.uint8))


def test_latent_gap():
    a = torch.zeros(2, 16, 5, 8, 8)
    assert latent_gap(a, a + 0.5) == pytest.approx(0.25)
    assert latent_gap(a, a) == 0.0
    with pytest.raises(ValueError, match=r"\(2, 16, 5, 8, 8\) vs \(2, 16, 5, 8, 4\)"):
        latent_gap(a, a[..., :4])


@pytest.mark.skipif(not VMAF_AVAILABLE, reason="vmaf-torch is not installed")
def test_vmaf_orders_distortions():
    video, _ = moving_shape(3, size=64, frames=9)
    clean = fidelity_metrics(video, video)
    assert set(clean) == {"psnr", "ssim", "ms_ssim", "vmaf"}
    assert 0.0 <= vmaf(noisy(video, 25), video) < clean["vmaf"] <= 100.0
