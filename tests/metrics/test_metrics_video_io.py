"""Decoding mp4s into (F, H, W, 3) uint8, and clear errors for files that are not videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_media import moving_shape

from stafinetune.data.synthetic import write_mp4
from stafinetune.metrics.video_io import VideoReadError, as_video, load_video, read_video


def test_round_trip_at_native_size(tmp_path):
    video, _ = moving_shape(2, size=64, frames=9)
    video = np.ascontiguousarray(video[:, :48])  # not square: H 48, W 64
    write_mp4(tmp_path / "clip.mp4", video, fps=12)
    decoded, fps = load_video(tmp_path / "clip.mp4")
    assert decoded.dtype == torch.uint8 and decoded.shape == (9, 48, 64, 3)
    assert fps == pytest.approx(12.0)
    # H.264 at crf 16 + yuv420p rounding (about 2 levels on flat colours): close to the source.
    assert (decoded.float() - torch.from_numpy(video).float()).abs().mean() < 6.0
    assert torch.equal(read_video(tmp_path / "clip.mp4"), decoded)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("garbage.mp4", bytes(range(256)) * 20, "not a readable container"),
        ("empty.mp4", b"", "empty file"),
        ("missing.mp4", None, "no such file"),
    ],
)
def test_unreadable_files_are_named(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VideoReadError, match=reason) as info:
        read_video(path)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_truncated_file_is_named(tmp_path):
    video, _ = moving_shape(2, size=64, frames=40)
    write_mp4(tmp_path / "full.mp4", video, fps=8)
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    try:
        frames = read_video(tmp_path / "cut.mp4")
    except VideoReadError as exc:
        assert "cut.mp4" in str(exc)
    else:  # decoders may return the frames before the cut; never more than were written
        assert 0 < len(frames) < 40


def test_as_video_checks_layout():
    assert as_video(np.zeros((2, 4, 4, 3), np.uint8)).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="reference must be uint8"):
        as_video(torch.zeros(2, 4, 4, 3), name="reference")
    with pytest.raises(TypeError, match="list"):
        as_video([[0]])
