"""VBench-style temporal metrics on clips whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_media import alternating, moving_shape, static

from stafinetune.metrics.vbench import (
    consistency_from_features,
    dynamic_degree,
    dynamic_degree_rule,
    flow_peak_magnitudes,
    motion_smoothness,
    subject_consistency,
    temporal_flickering,
)


def test_static_clip_does_not_flicker_or_move():
    video = static(moving_shape(3)[0])
    assert temporal_flickering(video) == 1.0
    assert dynamic_degree(video) == 0.0
    assert np.all(flow_peak_magnitudes(video) < 0.05)
    assert motion_smoothness(video) == pytest.approx(1.0, abs=1e-4)


def test_flickering_is_the_vbench_formula():
    # Flat frames alternating 100 / 110: every pair differs by 10 everywhere.
    assert temporal_flickering(alternating(100, 110)) == pytest.approx((255 - 10) / 255, abs=1e-12)
    smooth = moving_shape(2)[0]
    # Alternating between two unrelated pictures flickers more than a shape gliding.
    flicker = np.where(np.arange(len(smooth))[:, None, None, None] % 2 == 0, smooth, smooth[::-1])
    assert temporal_flickering(flicker) < temporal_flickering(smooth) < 1.0


@pytest.mark.parametrize("direction", ["right", "down and right"])
@pytest.mark.parametrize("speed", [2, 4])
def test_flow_magnitude_matches_the_shape_speed(speed, direction):
    video, _ = moving_shape(speed, direction, size=64)
    peaks = flow_peak_magnitudes(video)
    assert peaks.shape == (len(video) - 1,)
    assert float(np.median(peaks)) == pytest.approx(speed, abs=0.25)


def test_dynamic_threshold_scales_with_resolution():
    # VBench's threshold is 6 px at a 256-px short side: 1.5 px at 64, 3 px at 128.
    assert dynamic_degree_rule(17, 64, 64) == (1, 1.5, 4)
    assert dynamic_degree_rule(17, 128, 128) == (1, 3.0, 4)
    assert dynamic_degree(moving_shape(2, size=64)[0]) == 1.0  # 2 > 1.5
    assert dynamic_degree(moving_shape(2, size=128)[0]) == 0.0  # 2 < 3
    assert dynamic_degree(moving_shape(4, size=128)[0]) == 1.0  # 4 > 3


def test_dynamic_rule_samples_at_8_fps_like_vbench():
    # 24 fps: every 3rd frame -> 11 of 33 frames, count_num = round(2.75) = 3.
    assert dynamic_degree_rule(33, 256, 448, fps=24) == (3, 6.0, 3)
    # Below 8 fps the threshold grows by 8 / fps; Python rounds 2.5 to 2 as VBench does.
    assert dynamic_degree_rule(10, 128, 128, fps=4) == (1, 6.0, 2)
    # At 24 fps a 1 px/frame shape moves 3 px between sampled frames (> 1.5 at 64 px).
    slow, _ = moving_shape(1, size=64, frames=33)
    assert dynamic_degree(slow) == 0.0
    assert dynamic_degree(slow, fps=24) == 1.0


def test_smooth_motion_beats_shuffled_frames():
    video, _ = moving_shape(3, "down and left", size=64)
    shuffled = video[np.random.default_rng(0).permutation(len(video))]
    smooth = motion_smoothness(video)
    assert smooth > 0.995
    assert motion_smoothness(shuffled) < smooth - 0.01


def test_consistency_formula():
    e0, e1 = torch.eye(2, dtype=torch.float64)
    # frame 1 equals frame 0 (1, 1); frame 2 is orthogonal to both: (0 + 0) / 2.
    assert consistency_from_features(torch.stack([e0, e0, e1])) == pytest.approx(0.5)
    # Negative cosines count as 0, as in VBench.
    assert consistency_from_features(torch.stack([e0, -e0])) == 0.0
    # Length does not matter, only direction.
    assert consistency_from_features(torch.stack([e0, 3 * e0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(F >= 2, D\)"):
        consistency_from_features(torch.ones(1, 4))


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="uint8"):
        temporal_flickering(np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        temporal_flickering(np.zeros((4, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness(np.zeros((2, 8, 8, 3), np.uint8))
    # Flat black frames still have a direction in the proxy feature space: no 0/0.
    assert subject_consistency(torch.zeros(3, 16, 16, 3, dtype=torch.uint8)) == pytest.approx(1.0)
