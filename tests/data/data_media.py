"""Helpers that write small real (and deliberately broken) video files for the tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from stafinetune.data import DataConfig
from stafinetune.data.synthetic import write_mp4


def small_config(root, **overrides) -> DataConfig:
    """The embedded default at a test size (12 clips, 3 shards) under ``root``."""
    values = dict(root=str(root), num_clips=12, shard_size=5, num_workers=0, encode_batch_size=4)
    values.update(overrides)
    return DataConfig(**values)


def moving_bar(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB frames ``(f, h, w, 3)``: a bright bar sliding right over a noisy background."""
    rng = np.random.default_rng(seed)
    video = (rng.random((frames, height, width, 3)) * 60).astype(np.uint8)
    for f in range(frames):
        x = (4 * f) % max(1, width - 8)
        video[f, :, x : x + 8] = (230, 200, 40)
    return video


def good_mp4(path: Path, frames: int = 21, height: int = 72, width: int = 96, fps: int = 8) -> Path:
    write_mp4(path, moving_bar(frames, height, width), fps)
    return path


def truncated_mp4(path: Path, tmp: Path) -> Path:
    """A faststart mp4 cut at 60%: the header parses, the packet data ends early."""
    good_mp4(tmp, frames=40)
    data = tmp.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def garbage(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def grayscale_mov(path: Path, frames: int = 21, size: int = 64) -> Path:
    """A one-channel (gray) PNG-in-MOV clip: decord would silently expand it to RGB."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "gray"
        for f in range(frames):
            img = np.full((size, size, 3), 10 * f, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def huge_mp4(path: Path, width: int = 8192, height: int = 4608) -> Path:
    """One black frame at 8192x4608 (37.7 Mpx): small on disk, absurd to decode."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(
            np.zeros((height * 3 // 2, width), np.uint8), format="yuv420p"
        )
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
