"""Measured motion of synthetic clips against their captions and manifests."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from metrics_media import moving_shape, static, two_shapes

from stafinetune.data.encoders import TinyVideoEncoder
from stafinetune.data.synthetic import (
    caption_for,
    generate_synthetic,
    render_clip,
    sample_clip_spec,
    write_mp4,
)
from stafinetune.diffusion.sampling import to_uint8_video
from stafinetune.metrics.motion import (
    IntendedMotion,
    angle_error,
    estimate_motion,
    intended_from_manifest,
    motion_errors,
    parse_caption,
)
from stafinetune.metrics.video_io import read_video

CASES = [
    (3, "right", "circle", "red", "dark blue", 64),
    (2, "up and left", "diamond", "yellow", "black", 64),
    (4, "down", "square", "purple", "grey", 128),
    (1, "down and right", "circle", "cyan", "dark green", 128),
]


def intended(motions) -> list[IntendedMotion]:
    return intended_from_manifest({"background": "grey", "shapes": [asdict(m) for m in motions]})


def test_parse_caption():
    one = parse_caption("a red circle moving right at 3 pixels per frame on a dark blue background")
    assert one == [IntendedMotion("red", "circle", 0.0, 3.0)]
    two = parse_caption(
        "a cyan square moving up at 1 pixel per frame and a orange diamond moving down and left "
        "at 4 pixels per frame on a grey background"
    )
    assert [(m.colour, m.shape, m.speed) for m in two] == [
        ("cyan", "square", 1.0),
        ("orange", "diamond", 4.0),
    ]
    assert two[0].direction_deg == pytest.approx(90.0) and two[1].direction_deg == pytest.approx(
        225.0
    )
    with pytest.raises(ValueError, match="a cat sleeping"):
        parse_caption("a cat sleeping")


def test_caption_and_manifest_agree(tmp_path):
    manifest = generate_synthetic(tmp_path, num_clips=6, frames=5, height=64, width=64, fps=8)
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        from_caption = parse_caption(row["caption"])
        from_motion = intended_from_manifest(row["motion"])
        assert len(from_caption) == len(from_motion)
        for c, m in zip(from_caption, from_motion, strict=True):
            assert (c.colour, c.shape) == (m.colour, m.shape)
            assert (
                c.speed == pytest.approx(m.speed)
                and angle_error(c.direction_deg, m.direction_deg) < 1e-9
            )


def test_angle_error_wraps():
    assert angle_error(350.0, 10.0) == pytest.approx(20.0)
    assert angle_error(0.0, 180.0) == 180.0
    assert angle_error(float("nan"), 0.0) == 180.0


@pytest.mark.parametrize(("speed", "direction", "shape", "colour", "background", "size"), CASES)
def test_rendered_clip_measures_its_own_motion(speed, direction, shape, colour, background, size):
    video, motion = moving_shape(
        speed, direction, size=size, shape=shape, colour=colour, background=background
    )
    caption = caption_for(background, [motion])
    for err in (motion_errors(video, caption), motion_errors(video, intended([motion]))):
        assert err["direction_error_deg"] < 1.0 and err["speed_error"] < 0.05


def test_mp4_round_trip_keeps_the_motion(tmp_path):
    for i, (speed, direction, shape, colour, background, size) in enumerate(CASES):
        video, motion = moving_shape(
            speed, direction, size=size, shape=shape, colour=colour, background=background
        )
        write_mp4(tmp_path / f"{i}.mp4", video, fps=8)
        decoded = read_video(tmp_path / f"{i}.mp4")
        err = motion_errors(decoded, caption_for(background, [motion]))
        assert err["direction_error_deg"] < 5.0 and err["speed_error"] < 0.3, (i, err)


def test_two_shapes_are_told_apart_by_colour():
    video, motions = two_shapes()
    measured = estimate_motion(video)
    assert len(measured) == 2
    err = motion_errors(measured, caption_for("grey", motions))
    assert err["direction_error_deg"] < 1.0 and err["speed_error"] < 0.05
    # Swapping which colour does what is caught: the colours pin the match.
    swapped = [
        IntendedMotion(m.colour, m.shape, i.direction_deg, i.speed)
        for m, i in zip(intended(motions), intended(motions)[::-1], strict=True)
    ]
    assert motion_errors(measured, swapped)["direction_error_deg"] > 60.0


def test_static_and_reversed_clips_score_badly():
    video, motion = moving_shape(3, "down and left", size=64)
    caption = caption_for("dark blue", [motion])
    still = motion_errors(static(video), caption)
    assert still["direction_error_deg"] == 180.0  # no motion, no direction
    assert still["speed_error"] == pytest.approx(3.0) and still["speed_error_rel"] == pytest.approx(
        1.0
    )
    backwards = motion_errors(torch.from_numpy(video).flip(0), caption)
    assert backwards["direction_error_deg"] > 175.0 and backwards["speed_error"] < 0.05


def test_blank_video_has_no_shapes():
    blank = np.full((5, 32, 32, 3), 40, np.uint8)
    assert estimate_motion(blank) == []
    err = motion_errors(blank, [IntendedMotion("red", "circle", 0.0, 2.0)])
    assert err == {"direction_error_deg": 180.0, "speed_error": 2.0, "speed_error_rel": 1.0}


def _encoder_round_trip(video: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> the tiny video encoder's latents -> decoded uint8 frames."""
    pixels = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    encoder = TinyVideoEncoder(16)
    return to_uint8_video(encoder.decode(encoder.encode(pixels))[0])


def test_data_clips_keep_their_motion_through_the_tiny_encoder():
    # The embedded default's clips (17 x 128 x 128, one or two shapes), as a model trained on
    # their latents would at best draw them: a blocky low-pass copy. Their measured motion
    # still matches the caption; the same copies held still or played backwards do not.
    direction, speed, still, backwards = [], [], [], []
    for i in range(6):
        background, motions = sample_clip_spec(np.random.default_rng([0, i]), 17, 128, 128)
        caption = caption_for(background, motions)
        video = _encoder_round_trip(render_clip(background, motions, 17, 128, 128))
        err = motion_errors(video, caption)
        direction.append(err["direction_error_deg"])
        speed.append(err["speed_error"])
        still.append(motion_errors(static(video.numpy()), caption)["direction_error_deg"])
        backwards.append(motion_errors(video.flip(0), caption)["direction_error_deg"])
    assert max(direction) < 10.0 and np.mean(direction) < 3.0, direction
    assert np.mean(speed) < 0.3, speed
    assert min(still) == 180.0
    assert min(backwards) > 170.0, backwards
