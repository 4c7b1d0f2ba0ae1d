"""Decode an mp4 into uint8 RGB frames at native size, and check video tensors.

Every metric takes a video as a uint8 tensor ``(F, H, W, 3)`` (frames, height, width, RGB).
Reading goes through decord like the training data (``stafinetune.data.video``), so metrics see
the same pixels the data pipeline sees; PyAV opens the container first because it fails
cleanly on garbage that decord handles badly.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch


class VideoReadError(RuntimeError):
    """A video file that cannot be decoded; the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read video {os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def load_video(path: str | os.PathLike) -> tuple[torch.Tensor, float]:
    """Decode every frame of ``path`` at native size: ``(video (F, H, W, 3) uint8, fps)``.

    ``fps`` is the container's average frame rate (0.0 when the file declares none).
    Raises :class:`VideoReadError` naming the file when it is missing, empty, not a video,
    truncated, or not 3-channel.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "empty file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
    except VideoReadError:
        raise
    except Exception as exc:  # PyAV raises many error types for garbage input
        raise VideoReadError(
            path, f"not a readable container ({type(exc).__name__}: {exc})"
        ) from None
    try:
        import decord  # lazily: it loads the ffmpeg libraries at import time

        decord.bridge.set_bridge("native")
        reader = decord.VideoReader(str(path), num_threads=1)
        fps = float(reader.get_avg_fps() or 0.0)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()  # (F, H, W, C)
    except Exception as exc:  # decord.DECORDError and friends
        first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise VideoReadError(path, f"decoding failed ({first_line})") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise VideoReadError(path, f"decoded frames of shape {tuple(frames.shape)}")
    return torch.from_numpy(np.ascontiguousarray(frames, dtype=np.uint8)), fps


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """Decode every frame of ``path`` at native size into a uint8 tensor ``(F, H, W, 3)``.

    Raises :class:`VideoReadError` naming the file for unreadable input.
    """
    return load_video(path)[0]


def as_video(
    video: torch.Tensor | np.ndarray, *, min_frames: int = 1, name: str = "video"
) -> torch.Tensor:
    """Check and return ``video`` as a CPU uint8 tensor ``(F, H, W, 3)``.

    Accepts a torch tensor or a numpy array of that layout; raises ValueError naming ``name``
    and the offending shape or dtype otherwise, or when it has fewer than ``min_frames`` frames.
    """
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(video).__name__}")
    if video.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (F, H, W, 3), got {tuple(video.shape)}")
    if video.shape[0] < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} frames, got {video.shape[0]}")
    return video.detach().cpu()
