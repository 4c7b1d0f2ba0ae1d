"""DINO / CLIP features load from local transformers folders; the pixel proxy is the fallback."""

from __future__ import annotations

import pytest
import torch
from metrics_media import moving_shape, static

from stafinetune.metrics.features import (
    ClipFeatures,
    DinoFeatures,
    PixelFeatures,
    build_frame_features,
    centre_crop,
    resize_short_side,
)
from stafinetune.metrics.vbench import background_consistency, subject_consistency


@pytest.fixture(scope="module")
def clip_videos():
    moving, _ = moving_shape(4, "down and right", size=64, frames=9)
    return torch.from_numpy(static(moving)), torch.from_numpy(moving)


@pytest.mark.parametrize(
    ("folder", "cls", "source", "dim"),
    [
        ("dinov2", DinoFeatures, "dino:dinov2", 32),
        ("dino_vit", DinoFeatures, "dino:vit", 32),
        ("clip_vision", ClipFeatures, "clip:clip_vision_projection", 16),
        ("clip_full", ClipFeatures, "clip:clip", 24),
    ],
)
def test_local_weights_load_and_score(weights_root, clip_videos, folder, cls, source, dim):
    still, moving = clip_videos
    features = build_frame_features(
        weights_root / folder, "dino" if cls is DinoFeatures else "clip"
    )
    assert isinstance(features, cls) and features.source == source
    out = features(moving)
    assert out.shape == (len(moving), dim) and torch.isfinite(out).all()
    metric = subject_consistency if cls is DinoFeatures else background_consistency
    assert metric(still, features) == pytest.approx(1.0, abs=1e-6)
    # Random weights still see the shape move: the features come from the frames via the network.
    assert not torch.allclose(out[0], out[-1], atol=1e-5)
    assert metric(moving, features) < 1.0 - 1e-5


def test_wrong_or_missing_folder_is_named(weights_root, tmp_path):
    with pytest.raises(ValueError, match="clip_full.*'clip'"):
        DinoFeatures(weights_root / "clip_full")
    with pytest.raises(ValueError, match="dinov2.*'dinov2'"):
        ClipFeatures(weights_root / "dinov2")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        DinoFeatures(tmp_path / "nothing")


def test_default_is_the_pixel_proxy(clip_videos):
    still, moving = clip_videos
    proxy = build_frame_features(None, "dino")
    assert isinstance(proxy, PixelFeatures) and proxy.source == "pixel_proxy"
    assert proxy(moving).shape == (len(moving), 3 * 16 * 16)
    assert subject_consistency(still) == pytest.approx(1.0, abs=1e-12)
    assert 0.5 < subject_consistency(moving) < 1.0
    assert build_frame_features(proxy, "clip") is proxy  # built extractors pass through


def test_resize_and_crop_follow_torchvision_geometry():
    x = torch.rand(2, 3, 64, 96)
    assert resize_short_side(x, 224, "bilinear").shape == (2, 3, 224, 336)
    assert resize_short_side(torch.rand(1, 3, 100, 30), 224, "bicubic").shape == (1, 3, 746, 224)
    grid = torch.arange(5 * 8, dtype=torch.float32).view(1, 1, 5, 8)
    # torchvision: top = round((5 - 3) / 2) = 1, left = round((8 - 3) / 2) = round(2.5) = 2
    assert torch.equal(centre_crop(grid, 3), grid[..., 1:4, 2:5])
